"""mixed_scale_dwconv (DESIGN.md §2) and sparse_attn.nn.MixedScaleFFN: every backend against the
reference, forward and every gradient; gradcheck, opcheck, torch.compile, input checks,
state_dict parity with DRSformer's FeedForward, determinism."""
import pytest
import torch
from torch import nn

import sparse_attn
from sparse_attn import backends
from sparse_attn.reference import mixed_scale_dwconv as reference

from benchmarks.memory import saved_bytes

from conftest import requires_cuda
from mixed_scale_dwconv_cases import (NAMES, SHAPES, assert_close_to_reference, forward_and_grads, make_inputs,
                                     opcheck_forward_and_backward)

NATIVE_CPU = backends.why_unavailable("native", "cpu")
requires_native = pytest.mark.skipif(NATIVE_CPU is not None, reason=f"native backend: {NATIVE_CPU}")


# ---------------------------------------------------------------------------------------------
# Native CPU against the reference
# ---------------------------------------------------------------------------------------------
@requires_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_native_matches_reference(shape, bias, dtype):
    assert_close_to_reference("native", shape, dtype, bias)


@requires_native
def test_native_noncontiguous_inputs():
    x, *params = make_inputs((2, 6, 9, 11), torch.float64)
    x_cl = x.to(memory_format=torch.channels_last)
    x_t = x.transpose(2, 3).contiguous().transpose(2, 3)
    w3_t = params[0].transpose(2, 3).contiguous().transpose(2, 3)
    want = reference(x, *params)
    for xi, w3 in ((x_cl, params[0]), (x_t, w3_t)):
        out = sparse_attn.mixed_scale_dwconv(xi, w3, *params[1:], backend="native")
        torch.testing.assert_close(out, want, rtol=0, atol=1e-12)


@requires_native
@pytest.mark.parametrize("bias", [True, False])
def test_native_gradcheck(bias):
    inputs = [t.requires_grad_() if t is not None else None for t in make_inputs((2, 6, 4, 5), torch.float64, bias)]
    fn = lambda *a: sparse_attn.mixed_scale_dwconv(*a, backend="native")  # noqa: E731
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7)


@requires_native
@pytest.mark.parametrize("bias", [True, False])
def test_opcheck(bias):
    inputs = [t.requires_grad_() if t is not None else None for t in make_inputs((2, 6, 5, 7), torch.float64, bias)]
    ops = torch.ops.sparse_attn
    opcheck_forward_and_backward(ops.mixed_scale_dwconv_forward, ops.mixed_scale_dwconv_backward, inputs)


@requires_native
def test_native_is_deterministic_and_independent_of_threads():
    inputs = make_inputs((2, 10, 40, 140), torch.float32)
    grad = torch.randn(2, 10, 40, 140)
    fn = lambda *a: sparse_attn.mixed_scale_dwconv(*a, backend="native")  # noqa: E731
    first = forward_and_grads(fn, inputs, grad)
    second = forward_and_grads(fn, inputs, grad)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = forward_and_grads(fn, inputs, grad)
    finally:
        torch.set_num_threads(threads)
    for run in (second, single):
        assert torch.equal(run[0], first[0])
        for name, a, b in zip(NAMES, run[1], first[1]):
            assert torch.equal(a, b), f"{name} differs between runs"


@requires_native
def test_auto_runs_native_on_cpu_and_reference_for_other_dtypes():
    x, *params = make_inputs((1, 6, 5, 5), torch.float32)
    assert backends.explain(sparse_attn.mixed_scale_dwconv, x, *params).chosen == "native"
    bf = [t.bfloat16() for t in (x, *params)]
    out = sparse_attn.mixed_scale_dwconv(*bf)  # falls back to the reference in bfloat16
    torch.testing.assert_close(out, reference(*bf))
    with pytest.raises(backends.BackendUnavailable, match="float32, float64"):
        sparse_attn.mixed_scale_dwconv(*bf, backend="native")


def test_reference_backend_is_the_reference():
    inputs = make_inputs((2, 6, 5, 9), torch.float64)
    assert torch.equal(sparse_attn.mixed_scale_dwconv(*inputs, backend="reference"), reference(*inputs))


# ---------------------------------------------------------------------------------------------
# Input checks
# ---------------------------------------------------------------------------------------------
def _replace(inputs, index, value):
    return [value if i == index else t for i, t in enumerate(inputs)]


def test_input_errors_name_the_argument():
    inputs = make_inputs((1, 6, 5, 5), torch.float32)
    x, w3, w5, w3_1, w5_1, b3, b5, b3_1, b5_1 = inputs
    call = sparse_attn.mixed_scale_dwconv
    with pytest.raises(TypeError, match="x: expected a tensor"):
        call(x.numpy(), *inputs[1:])
    with pytest.raises(ValueError, match=r"x: expected shape \(B, 2h, H, W\)"):
        call(x[0], *inputs[1:])
    with pytest.raises(ValueError, match="x: expected an even number of channels"):
        call(torch.randn(1, 5, 5, 5), *inputs[1:])
    with pytest.raises(ValueError, match="x: every dimension must be non-empty"):
        call(x[:, :, :0], *inputs[1:])
    with pytest.raises(TypeError, match="x: expected a floating-point tensor"):
        call(x.long(), *inputs[1:])
    for index, name, bad in ((1, "w3", w5), (2, "w5", w3), (3, "w3_1", w3), (4, "w5_1", w5_1[:, :1]),
                             (5, "b3", b3_1), (6, "b5", b5[:2]), (7, "b3_1", b3), (8, "b5_1", b5)):
        with pytest.raises(ValueError, match=f"{name}: expected shape"):
            call(*_replace(inputs, index, bad))
    with pytest.raises(TypeError, match="w5: expected x's dtype"):
        call(*_replace(inputs, 2, w5.double()))
    with pytest.raises(TypeError, match="b3_1: expected x's dtype"):
        call(*_replace(inputs, 7, b3_1.double()))
    with pytest.raises(ValueError, match="w3_1: expected x's device"):
        call(*_replace(inputs, 3, w3_1.to("meta")))
    with pytest.raises(TypeError, match="b5: expected a tensor or None"):
        call(*_replace(inputs, 6, 0.5))
    with pytest.raises(ValueError, match="backend"):
        call(*inputs, backend="cuda")


# ---------------------------------------------------------------------------------------------
# MixedScaleFFN
# ---------------------------------------------------------------------------------------------
class OfficialFeedForward(nn.Module):
    """DRSformer's FeedForward in plain PyTorch, with the structure of the official code."""

    def __init__(self, dim, ffn_expansion_factor, bias):
        super().__init__()
        hidden_features = int(dim * ffn_expansion_factor)
        self.project_in = nn.Conv2d(dim, hidden_features * 2, kernel_size=1, bias=bias)
        self.dwconv3x3 = nn.Conv2d(hidden_features * 2, hidden_features * 2, kernel_size=3, stride=1,
                                   padding=1, groups=hidden_features * 2, bias=bias)
        self.dwconv5x5 = nn.Conv2d(hidden_features * 2, hidden_features * 2, kernel_size=5, stride=1,
                                   padding=2, groups=hidden_features * 2, bias=bias)
        self.relu3 = nn.ReLU()
        self.relu5 = nn.ReLU()
        self.dwconv3x3_1 = nn.Conv2d(hidden_features * 2, hidden_features, kernel_size=3, stride=1,
                                     padding=1, groups=hidden_features, bias=bias)
        self.dwconv5x5_1 = nn.Conv2d(hidden_features * 2, hidden_features, kernel_size=5, stride=1,
                                     padding=2, groups=hidden_features, bias=bias)
        self.relu3_1 = nn.ReLU()
        self.relu5_1 = nn.ReLU()
        self.project_out = nn.Conv2d(hidden_features * 2, dim, kernel_size=1, bias=bias)

    def forward(self, x):
        x = self.project_in(x)
        x1_3, x2_3 = self.relu3(self.dwconv3x3(x)).chunk(2, dim=1)
        x1_5, x2_5 = self.relu5(self.dwconv5x5(x)).chunk(2, dim=1)
        x1 = torch.cat([x1_3, x1_5], dim=1)
        x2 = torch.cat([x2_3, x2_5], dim=1)
        x1 = self.relu3_1(self.dwconv3x3_1(x1))
        x2 = self.relu5_1(self.dwconv5x5_1(x2))
        x = torch.cat([x1, x2], dim=1)
        return self.project_out(x)


@pytest.mark.parametrize("backend", ["reference", pytest.param("native", marks=requires_native)])
@pytest.mark.parametrize("bias", [False, True])
def test_mixed_scale_ffn_loads_official_state_dict(backend, bias):
    """DRSformer level 1: dim 48, expansion 2.66 -> h = 127 (2h = 254)."""
    official = OfficialFeedForward(48, 2.66, bias).double()
    ours = sparse_attn.nn.MixedScaleFFN(48, 2.66, bias, backend=backend).double()
    assert set(ours.state_dict()) == set(official.state_dict())
    ours.load_state_dict(official.state_dict())
    x = torch.randn(2, 48, 11, 6, dtype=torch.float64)
    grad = torch.randn_like(x)
    x_ours, x_official = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_ours, out_official = ours(x_ours), official(x_official)
    torch.testing.assert_close(out_ours, out_official, rtol=1e-10, atol=1e-12)
    out_ours.backward(grad)
    out_official.backward(grad)
    torch.testing.assert_close(x_ours.grad, x_official.grad, rtol=1e-10, atol=1e-12)
    params = dict(official.named_parameters())
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, params[name].grad, rtol=1e-10, atol=1e-11, msg=name)


def _compile_counted(fn, backend):
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    counter = CompileCounterWithBackend(backend)
    return torch.compile(fn, backend=counter, fullgraph=True, dynamic=True), counter


IMAGE_SIZES = ((9, 13), (12, 7), (5, 20))


@requires_native
def test_compiled_op_forward_and_backward_do_not_recompile_for_new_image_sizes():
    """Inductor, forward and backward of the op: one compilation serves every H x W."""
    fn = lambda *a: sparse_attn.mixed_scale_dwconv(*a, backend="native")  # noqa: E731
    compiled, counter = _compile_counted(fn, "inductor")
    for height, width in IMAGE_SIZES:
        inputs = make_inputs((2, 6, height, width), torch.float32)
        grad = torch.randn(2, 6, height, width)
        want, got = forward_and_grads(fn, inputs, grad), forward_and_grads(compiled, inputs, grad)
        torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)
        for name, a, b in zip(NAMES, got[1], want[1]):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, msg=name)
    assert counter.frame_count == 1, f"compiled {counter.frame_count} times for {len(IMAGE_SIZES)} image sizes"


@requires_native
def test_compiled_mixed_scale_ffn_runs_without_graph_breaks_or_recompiles():
    """The whole module, fullgraph: inference under inductor, training under aot_eager.

    (Inductor's CPU lowering of the 1x1 convolutions' backward specialises on H x W, a PyTorch
    limitation of nn.Conv2d that is independent of the fused op, so training is traced with
    aot_eager, which still runs the op's fake and autograd registrations with symbolic sizes.)
    """
    model = sparse_attn.nn.MixedScaleFFN(8, 2.66, True, backend="native")
    compiled, counter = _compile_counted(model, "inductor")
    with torch.no_grad():
        for height, width in IMAGE_SIZES:
            x = torch.randn(2, 8, height, width)
            torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)
    assert counter.frame_count == 1, f"inference compiled {counter.frame_count} times"

    compiled, counter = _compile_counted(model, "aot_eager")
    for height, width in IMAGE_SIZES:
        x = torch.randn(2, 8, height, width)
        x_eager, x_compiled = x.clone().requires_grad_(), x.clone().requires_grad_()
        out_eager, out_compiled = model(x_eager), compiled(x_compiled)
        torch.testing.assert_close(out_compiled, out_eager, rtol=1e-5, atol=1e-5)
        out_eager.sum().backward()
        out_compiled.sum().backward()
        torch.testing.assert_close(x_compiled.grad, x_eager.grad, rtol=1e-5, atol=1e-5)
    assert counter.frame_count == 1, f"training compiled {counter.frame_count} times"


@requires_native
def test_mixed_scale_ffn_saves_less_for_backward():
    """The fused core saves x and out (out is also project_out's input): far less than the
    official module's per-branch maps."""
    official = OfficialFeedForward(48, 2.66, False)
    ours = sparse_attn.nn.MixedScaleFFN(48, 2.66, False, backend="native")
    x = torch.randn(1, 48, 32, 32, requires_grad=True)
    assert saved_bytes(lambda: ours(x))[0] <= 0.35 * saved_bytes(lambda: official(x))[0]


# ---------------------------------------------------------------------------------------------
# CUDA (run where a GPU is present)
# ---------------------------------------------------------------------------------------------
def _native_cuda_reason():
    if not torch.cuda.is_available():
        return "needs a CUDA device"
    return backends.why_unavailable("native", "cuda")


requires_native_cuda = pytest.mark.skipif(_native_cuda_reason() is not None, reason=str(_native_cuda_reason()))


@requires_cuda
@requires_native_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_native_cuda_matches_reference(shape, bias, dtype):
    assert_close_to_reference("native", shape, dtype, bias, device="cuda")


@requires_cuda
@requires_native_cuda
def test_native_cuda_is_deterministic_and_gradchecks():
    inputs = make_inputs((2, 10, 40, 140), torch.float32, device="cuda")
    grad = torch.randn(2, 10, 40, 140, device="cuda")
    fn = lambda *a: sparse_attn.mixed_scale_dwconv(*a, backend="native")  # noqa: E731
    first, second = forward_and_grads(fn, inputs, grad), forward_and_grads(fn, inputs, grad)
    assert torch.equal(first[0], second[0])
    for name, a, b in zip(NAMES, first[1], second[1]):
        assert torch.equal(a, b), f"{name} differs between runs"
    small = [t.requires_grad_() for t in make_inputs((2, 6, 4, 5), torch.float64, device="cuda")]
    assert torch.autograd.gradcheck(fn, small, eps=1e-6, atol=1e-7)
