"""mixed_scale_dwconv (DESIGN.md §2) and sparse_attn.nn.MixedScaleFFN on the reference and native
CPU backends: native against the float64 reference, forward and every gradient; gradcheck,
opcheck, torch.compile, input checks, state_dict parity with DRSformer's FeedForward,
determinism. (Triton: test_mixed_scale_dwconv_triton.py; CUDA: ..._gpu.py.)"""
import pytest
import torch

import sparse_attn
from benchmarks.memory import saved_bytes
from benchmarks.official import FeedForward
from helpers import compiled_once, forward_and_grads, opcheck_every_custom_op
from mixed_scale_dwconv_cases import NAMES, SHAPES, assert_close_to_reference, make_inputs, on, why_unavailable
from sparse_attn import backends
from sparse_attn.reference import mixed_scale_dwconv as reference

NATIVE_CPU = why_unavailable("native")
requires_native = pytest.mark.skipif(NATIVE_CPU is not None, reason=str(NATIVE_CPU))


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
    checked = opcheck_every_custom_op(on("native"), make_inputs((2, 6, 5, 7), torch.float64, bias))
    assert len(checked) == 2, checked  # the forward and the backward op


@requires_native
def test_native_is_deterministic_and_independent_of_threads():
    inputs = make_inputs((2, 10, 40, 140), torch.float32)
    grad = torch.randn(2, 10, 40, 140)
    first = forward_and_grads(on("native"), inputs, grad)
    second = forward_and_grads(on("native"), inputs, grad)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = forward_and_grads(on("native"), inputs, grad)
    finally:
        torch.set_num_threads(threads)
    for run in (second, single):
        for name, a, b in zip(("out",) + NAMES, run, first):
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
@pytest.mark.parametrize("backend", ["reference", pytest.param("native", marks=requires_native)])
@pytest.mark.parametrize("bias", [False, True])
def test_mixed_scale_ffn_loads_official_state_dict(backend, bias):
    """DRSformer level 1: dim 48, expansion 2.66 -> h = 127 (2h = 254)."""
    official = FeedForward(48, 2.66, bias).double()
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


IMAGE_SIZES = ((9, 13), (12, 7), (5, 20))


@requires_native
def test_compiled_op_forward_and_backward_do_not_recompile_for_new_image_sizes():
    """Inductor, forward and backward of the op: one compilation serves every H x W."""
    with compiled_once(on("native")) as compiled:
        for height, width in IMAGE_SIZES:
            inputs = make_inputs((2, 6, height, width), torch.float32)
            grad = torch.randn(2, 6, height, width)
            want, got = forward_and_grads(on("native"), inputs, grad), forward_and_grads(compiled, inputs, grad)
            torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)
            for name, a, b in zip(NAMES, got[1:], want[1:]):
                torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, msg=name)


@requires_native
def test_compiled_mixed_scale_ffn_runs_without_graph_breaks_or_recompiles():
    """The whole module, fullgraph: inference under inductor, training under aot_eager.

    (Inductor's CPU lowering of the 1x1 convolutions' backward specialises on H x W, a PyTorch
    limitation of nn.Conv2d that is independent of the fused op, so training is traced with
    aot_eager, which still runs the op's fake and autograd registrations with symbolic sizes.)
    """
    model = sparse_attn.nn.MixedScaleFFN(8, 2.66, True, backend="native")
    with compiled_once(model) as compiled, torch.no_grad():
        for height, width in IMAGE_SIZES:
            x = torch.randn(2, 8, height, width)
            torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)

    with compiled_once(model, backend="aot_eager") as compiled:
        for height, width in IMAGE_SIZES:
            x = torch.randn(2, 8, height, width)
            x_eager, x_compiled = x.clone().requires_grad_(), x.clone().requires_grad_()
            out_eager, out_compiled = model(x_eager), compiled(x_compiled)
            torch.testing.assert_close(out_compiled, out_eager, rtol=1e-5, atol=1e-5)
            out_eager.sum().backward()
            out_compiled.sum().backward()
            torch.testing.assert_close(x_compiled.grad, x_eager.grad, rtol=1e-5, atol=1e-5)


@requires_native
def test_mixed_scale_ffn_saves_less_for_backward():
    """The fused core saves x and out (out is also project_out's input): far less than the
    official module's per-branch maps."""
    official = FeedForward(48, 2.66, False)
    ours = sparse_attn.nn.MixedScaleFFN(48, 2.66, False, backend="native")
    x = torch.randn(1, 48, 32, 32, requires_grad=True)
    assert saved_bytes(lambda: ours(x))[0] <= 0.35 * saved_bytes(lambda: official(x))[0]
