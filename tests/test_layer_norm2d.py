"""layer_norm2d (DESIGN.md §5) and sparse_attn.nn.LayerNorm2d: every backend against the
reference, forward and every gradient; gradcheck, opcheck, torch.compile, input checks,
determinism, what backward saves, and the module on the op."""
import pytest
import torch

import sparse_attn
from helpers import assert_deterministic
from benchmarks.memory import saved_bytes
from block_ops_cases import (LAYER_NORM_NAMES, LAYER_NORM_SHAPES, assert_layer_norm_close, layer_norm_fn,
                             layer_norm_inputs)
from helpers import forward_and_grads, requires_cuda
from sparse_attn import backends
from sparse_attn.reference import layer_norm2d as reference

NATIVE_CPU = backends.why_unavailable("native", "cpu")
requires_native = pytest.mark.skipif(NATIVE_CPU is not None, reason=f"native backend: {NATIVE_CPU}")
_shape_id = lambda s: "x".join(map(str, s))  # noqa: E731


# ---------------------------------------------------------------------------------------------
# The reference and native CPU against the float64 reference
# ---------------------------------------------------------------------------------------------
@requires_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", LAYER_NORM_SHAPES, ids=_shape_id)
def test_native_matches_reference(shape, bias, dtype):
    assert_layer_norm_close("native", shape, dtype, bias)


@pytest.mark.parametrize("bias", [True, False])
def test_reference_is_restormer_layer_norm(bias):
    """Upstream's to_3d -> LayerNorm over the last dim -> to_4d, written out."""
    x, weight, b = layer_norm_inputs((2, 6, 5, 7), torch.float64, bias)
    t = x.flatten(2).transpose(1, 2)
    sigma = t.var(-1, keepdim=True, unbiased=False)
    if b is None:
        want = t / torch.sqrt(sigma + 1e-5) * weight
    else:
        want = (t - t.mean(-1, keepdim=True)) / torch.sqrt(sigma + 1e-5) * weight + b
    want = want.transpose(1, 2).reshape(x.shape)
    torch.testing.assert_close(sparse_attn.layer_norm2d(x, weight, b, backend="reference"), want,
                               rtol=1e-13, atol=1e-13)


@requires_native
def test_native_noncontiguous_inputs_and_eps():
    x, weight, bias = layer_norm_inputs((2, 6, 9, 11), torch.float64)
    for xi in (x.to(memory_format=torch.channels_last), x.transpose(2, 3).contiguous().transpose(2, 3)):
        for eps in (1e-5, 0.5):
            torch.testing.assert_close(sparse_attn.layer_norm2d(xi, weight[::1], bias, eps, backend="native"),
                                       reference(x, weight, bias, eps), rtol=0, atol=1e-12)
    strided_weight = torch.stack([weight, weight], 1)[:, 0]
    torch.testing.assert_close(sparse_attn.layer_norm2d(x, strided_weight, bias, backend="native"),
                               reference(x, weight, bias), rtol=0, atol=1e-12)


@pytest.mark.parametrize("backend", ["reference", pytest.param("native", marks=requires_native)])
@pytest.mark.parametrize("bias", [True, False])
def test_gradcheck(backend, bias):
    inputs = [t.requires_grad_() if t is not None else None for t in layer_norm_inputs((2, 5, 3, 4), torch.float64, bias)]
    assert torch.autograd.gradcheck(layer_norm_fn(backend), inputs, eps=1e-6, atol=1e-7)


@requires_native
@pytest.mark.parametrize("bias", [True, False])
def test_opcheck(bias):
    inputs = [t.requires_grad_() if t is not None else None for t in layer_norm_inputs((2, 5, 3, 4), torch.float64, bias)]
    opcheck_forward_and_backward(torch.ops.sparse_attn.layer_norm2d_forward, torch.ops.sparse_attn.layer_norm2d_backward,
                                 inputs)


def opcheck_forward_and_backward(forward_op, backward_op, inputs, eps=1e-5):
    """torch.library.opcheck of a forward op on (x, weight, bias) and of its backward op on that
    forward's statistics."""
    torch.library.opcheck(forward_op.default, (*inputs, eps))
    x, weight, bias = [t.detach() if t is not None else None for t in inputs]
    out, mean, rstd = forward_op(x, weight, bias, eps)
    torch.library.opcheck(backward_op.default, (torch.randn_like(out), x, weight, bias, mean, rstd))


@requires_native
def test_native_is_deterministic_and_independent_of_threads():
    """Several tasks of 2048 pixels per image: the weight gradients are summed in one order."""
    inputs = layer_norm_inputs((2, 48, 70, 90), torch.float32)
    grad = torch.randn(2, 48, 70, 90)
    fn = layer_norm_fn("native")
    assert_deterministic(fn, inputs, grad, LAYER_NORM_NAMES)


@requires_native
def test_native_saves_x_and_per_pixel_statistics_only():
    """x (C values per pixel) and two statistics per pixel, against the reference's several
    full-size intermediates."""
    x, weight, bias = layer_norm_inputs((1, 48, 32, 32), torch.float32)
    x.requires_grad_()
    weight.requires_grad_()
    saved_native, _ = saved_bytes(lambda: sparse_attn.layer_norm2d(x, weight, bias, backend="native"))
    assert saved_native <= x.numel() * 4 * (1 + 2 / 48) + weight.numel() * 4 * 2


@requires_native
def test_auto_runs_native_on_cpu_and_reference_for_other_dtypes():
    x, weight, bias = layer_norm_inputs((1, 6, 5, 5), torch.bfloat16)
    torch.testing.assert_close(sparse_attn.layer_norm2d(x, weight, bias), reference(x, weight, bias))
    with pytest.raises(backends.BackendUnavailable, match="float32, float64"):
        sparse_attn.layer_norm2d(x, weight, bias, backend="native")


# ---------------------------------------------------------------------------------------------
# Input checks
# ---------------------------------------------------------------------------------------------
def test_input_errors_name_the_argument():
    x, weight, bias = layer_norm_inputs((1, 6, 5, 5), torch.float32)
    call = sparse_attn.layer_norm2d
    with pytest.raises(TypeError, match="x: expected a tensor"):
        call(x.numpy(), weight, bias)
    with pytest.raises(ValueError, match=r"x: expected shape \(B, C, H, W\)"):
        call(x[0], weight, bias)
    with pytest.raises(ValueError, match="x: every dimension must be non-empty"):
        call(x[:, :, :0], weight, bias)
    with pytest.raises(TypeError, match="x: expected a floating-point tensor"):
        call(x.long(), weight, bias)
    with pytest.raises(ValueError, match=r"weight: expected shape \(6,\)"):
        call(x, weight[:5], bias)
    with pytest.raises(ValueError, match=r"bias: expected shape \(6,\)"):
        call(x, weight, bias[None])
    with pytest.raises(TypeError, match="weight: expected x's dtype"):
        call(x, weight.double(), bias)
    with pytest.raises(ValueError, match="bias: expected x's device"):
        call(x, weight, bias.to("meta"))
    with pytest.raises(TypeError, match="bias: expected a tensor or None"):
        call(x, weight, 0.5)
    for eps in (-1.0, float("nan"), "1e-5"):
        with pytest.raises(ValueError, match="eps: expected a finite number"):
            call(x, weight, bias, eps)
    with pytest.raises(ValueError, match="backend"):
        call(x, weight, bias, backend="cuda")


# ---------------------------------------------------------------------------------------------
# torch.compile
# ---------------------------------------------------------------------------------------------
def compile_counted(fn, backend):
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    counter = CompileCounterWithBackend(backend)
    return torch.compile(fn, backend=counter, fullgraph=True, dynamic=True), counter


IMAGE_SIZES = ((9, 13), (12, 7), (5, 20))


@requires_native
def test_compiled_op_forward_and_backward_do_not_recompile_for_new_image_sizes():
    fn = layer_norm_fn("native")
    compiled, counter = compile_counted(fn, "inductor")
    first_frames = None
    for height, width in IMAGE_SIZES:
        inputs = layer_norm_inputs((2, 6, height, width), torch.float32)
        grad = torch.randn(2, 6, height, width)
        want, got = forward_and_grads(fn, inputs, grad), forward_and_grads(compiled, inputs, grad)
        torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)
        for name, a, b in zip(LAYER_NORM_NAMES, got[1:], want[1:]):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, msg=name)
        # The first compilation may count twice: Dynamo restarts its analysis once to specialise
        # the float eps. What matters is that no new image size compiles again.
        first_frames = first_frames or counter.frame_count
    assert first_frames <= 2 and counter.frame_count == first_frames, (
        f"compiled {counter.frame_count} times for {len(IMAGE_SIZES)} image sizes")


# ---------------------------------------------------------------------------------------------
# nn.LayerNorm2d runs on the op
# ---------------------------------------------------------------------------------------------
@requires_native
@pytest.mark.parametrize("kind", ["WithBias", "BiasFree"])
def test_layer_norm_2d_module_runs_the_op(kind):
    """The module on `native` gives the op's result and saves what the op saves (x and two
    statistics per pixel); on `reference` it is the reference."""
    norm = sparse_attn.nn.LayerNorm2d(48, kind, backend="native")
    with torch.no_grad():
        norm.body.weight.normal_()
    x = torch.randn(1, 48, 16, 16, requires_grad=True)
    bias = norm.body.bias
    assert torch.equal(norm(x), sparse_attn.layer_norm2d(x, norm.body.weight, bias, backend="native"))
    saved, _ = saved_bytes(lambda: norm(x))
    assert saved <= x.numel() * 4 * (1 + 2 / 48) + 48 * 4 * 2
    with sparse_attn.use_backend("reference"):
        plain = sparse_attn.nn.LayerNorm2d(48, kind)
        plain.load_state_dict(norm.state_dict())
        assert torch.equal(plain(x), reference(x, norm.body.weight, bias))


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
@pytest.mark.parametrize("shape", LAYER_NORM_SHAPES + [(2, 48, 130, 70)], ids=_shape_id)
def test_native_cuda_matches_reference(shape, bias, dtype):
    assert_layer_norm_close("native", shape, dtype, bias, device="cuda")


@requires_cuda
@requires_native_cuda
def test_native_cuda_is_deterministic_and_gradchecks():
    inputs = layer_norm_inputs((2, 48, 130, 70), torch.float32, device="cuda")
    grad = torch.randn(2, 48, 130, 70, device="cuda")
    fn = layer_norm_fn("native")
    first, second = forward_and_grads(fn, inputs, grad), forward_and_grads(fn, inputs, grad)
    assert torch.equal(first[0], second[0])
    for name, a, b in zip(LAYER_NORM_NAMES, first[1:], second[1:]):
        assert torch.equal(a, b), f"{name} differs between runs"
    small = [t.requires_grad_() for t in layer_norm_inputs((2, 5, 3, 4), torch.float64, device="cuda")]
    assert torch.autograd.gradcheck(fn, small, eps=1e-6, atol=1e-7)
