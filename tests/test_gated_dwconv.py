"""gated_dwconv (DESIGN.md §5) and the modules on it: every backend against the reference, forward
and every gradient, for every activation; gradcheck, opcheck, torch.compile, input checks,
determinism, what backward saves, the activation codes shared with the kernels, and Restormer's
GDFN / the deblurring network's gate on the op."""
import pytest
import torch
import torch.nn.functional as F

import sparse_attn
from helpers import assert_deterministic
from benchmarks.memory import saved_bytes
from block_ops_cases import GATED_NAMES, GATED_SHAPES, assert_gated_close, gated_fn, gated_inputs
from helpers import forward_and_grads, requires_cuda
from sparse_attn import backends, encodings
from sparse_attn.reference import gated_dwconv as reference
from sparse_attn.reference.gated_dwconv import ACTIVATIONS

NATIVE_CPU = backends.why_unavailable("native", "cpu")
requires_native = pytest.mark.skipif(NATIVE_CPU is not None, reason=f"native backend: {NATIVE_CPU}")
_shape_id = lambda s: "x".join(map(str, s))  # noqa: E731


@requires_native
def test_encodings_agree_with_the_cpp_kernels():
    """sparse_attn.encodings is the one source (Python, Triton); the C++ copies must agree."""
    cpp = torch.ops.sparse_attn.encoding("gated_dwconv_activation_codes", 0)
    assert cpp == [encodings.GATE_ACTIVATION_CODES[name] for name in ("gelu", "prelu", "relu2", "identity")]
    assert tuple(encodings.GATE_ACTIVATION_CODES) == ACTIVATIONS
    for hidden in (1, 3, 127, 1021):
        ours = encodings.gated_grad_offsets(hidden)
        assert torch.ops.sparse_attn.encoding("gated_dwconv_grad_layout", hidden) == [ours[name] for name in
                                                                                      encodings.GATED_GRAD_LAYOUT]
        # weight (2h·9), bias (2h), one slope partial per group (h), without gaps or overlaps
        assert [ours["bias"], ours["slope"] - ours["bias"], ours["total"] - ours["slope"]] == [18 * hidden, 2 * hidden,
                                                                                               hidden]


# ---------------------------------------------------------------------------------------------
# The reference and native CPU against the float64 reference
# ---------------------------------------------------------------------------------------------
@requires_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", GATED_SHAPES, ids=_shape_id)
def test_native_matches_reference(shape, bias, dtype):
    assert_gated_close("native", shape, dtype, bias, "gelu")


@requires_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("activation", [a for a in ACTIVATIONS if a != "gelu"])
@pytest.mark.parametrize("shape", [(2, 6, 37, 133), (1, 6, 1, 7)], ids=_shape_id)
def test_native_matches_reference_for_every_activation(shape, activation, dtype):
    assert_gated_close("native", shape, dtype, True, activation)


@requires_native
def test_native_float_gelu_is_within_a_few_ulp_of_erf():
    """The CPU kernels' float erf (a rational approximation that vectorises) over [-8, 8]: a
    centre-tap weight makes z = x, and a second half of ones makes out = gelu(x)."""
    values = torch.linspace(-8, 8, 40001, dtype=torch.float64)
    x = torch.cat([values, torch.ones_like(values)]).reshape(1, 2, 1, -1)
    weight = torch.zeros(2, 1, 3, 3, dtype=torch.float64)
    weight[:, 0, 1, 1] = 1
    for dtype in (torch.float32, torch.float64):
        out = sparse_attn.gated_dwconv(x.to(dtype), weight.to(dtype), backend="native").double().flatten()
        error = (out - F.gelu(values.to(dtype).double())).abs() / values.abs().clamp(min=1)
        assert error.max() <= (5e-7 if dtype == torch.float32 else 1e-15), f"{dtype}: {error.max():.3g}"


def test_reference_is_restormer_gate():
    x, weight, bias, _ = gated_inputs((1, 8, 6, 5), torch.float64)
    z = F.conv2d(x, weight, bias, padding=1, groups=8)
    torch.testing.assert_close(sparse_attn.gated_dwconv(x, weight, bias, backend="reference"),
                               F.gelu(z[:, :4]) * z[:, 4:], rtol=0, atol=0)
    slope = torch.tensor([-0.3], dtype=torch.float64)
    torch.testing.assert_close(sparse_attn.gated_dwconv(x, weight, bias, "prelu", slope, backend="reference"),
                               torch.where(z[:, :4] > 0, z[:, :4], -0.3 * z[:, :4]) * z[:, 4:], rtol=0, atol=0)


@requires_native
def test_native_noncontiguous_inputs():
    x, weight, bias, _ = gated_inputs((2, 6, 9, 11), torch.float64)
    want = reference(x, weight, bias)
    weight_t = weight.transpose(2, 3).contiguous().transpose(2, 3)
    for xi, wi in ((x.to(memory_format=torch.channels_last), weight), (x.transpose(2, 3).contiguous().transpose(2, 3),
                                                                        weight_t)):
        torch.testing.assert_close(sparse_attn.gated_dwconv(xi, wi, bias, backend="native"), want, rtol=0, atol=1e-12)


@pytest.mark.parametrize("backend", ["reference", pytest.param("native", marks=requires_native)])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_gradcheck(backend, activation):
    inputs = [t.requires_grad_() if t is not None else None
              for t in gated_inputs((2, 4, 4, 5), torch.float64, True, activation)]
    assert torch.autograd.gradcheck(gated_fn(backend, activation), inputs, eps=1e-6, atol=1e-7)


def opcheck_forward_and_backward(forward_op, backward_op, inputs, code):
    """torch.library.opcheck of a forward op on (x, weight, bias, code, slope) and of its backward."""
    x, weight, bias, slope = inputs
    torch.library.opcheck(forward_op.default, (x, weight, bias, code, slope))
    x, weight, bias, slope = [t.detach() if t is not None else None for t in inputs]
    out = forward_op(x, weight, bias, code, slope)
    torch.library.opcheck(backward_op.default, (torch.randn_like(out), x, weight, bias, code, slope))


@requires_native
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("activation", ["gelu", "prelu"])
def test_opcheck(bias, activation):
    inputs = [t.requires_grad_() if t is not None else None
              for t in gated_inputs((2, 4, 5, 7), torch.float64, bias, activation)]
    ops = torch.ops.sparse_attn
    opcheck_forward_and_backward(ops.gated_dwconv_forward, ops.gated_dwconv_backward, inputs,
                                 ACTIVATIONS.index(activation))


@requires_native
def test_native_is_deterministic_and_independent_of_threads():
    inputs = gated_inputs((2, 10, 40, 140), torch.float32, True, "prelu")
    grad = torch.randn(2, 5, 40, 140)
    fn = gated_fn("native", "prelu")
    assert_deterministic(fn, inputs, grad, GATED_NAMES)


@requires_native
def test_native_saves_x_only():
    x, weight, bias, _ = gated_inputs((1, 48, 32, 32), torch.float32)
    x.requires_grad_()
    weight.requires_grad_()
    saved, _ = saved_bytes(lambda: sparse_attn.gated_dwconv(x, weight, bias, backend="native"))
    assert saved <= (x.numel() + weight.numel() + bias.numel()) * 4


@requires_native
def test_auto_runs_native_on_cpu_and_reference_for_other_dtypes():
    x, weight, bias, _ = gated_inputs((1, 6, 5, 5), torch.bfloat16)
    torch.testing.assert_close(sparse_attn.gated_dwconv(x, weight, bias), reference(x, weight, bias))
    with pytest.raises(backends.BackendUnavailable, match="float32, float64"):
        sparse_attn.gated_dwconv(x, weight, bias, backend="native")


# ---------------------------------------------------------------------------------------------
# Input checks
# ---------------------------------------------------------------------------------------------
def test_input_errors_name_the_argument():
    x, weight, bias, _ = gated_inputs((1, 6, 5, 5), torch.float32)
    slope = torch.tensor([0.25])
    call = sparse_attn.gated_dwconv
    with pytest.raises(TypeError, match="x: expected a tensor"):
        call(x.numpy(), weight, bias)
    with pytest.raises(ValueError, match=r"x: expected shape \(B, 2h, H, W\)"):
        call(x[0], weight, bias)
    with pytest.raises(ValueError, match="x: expected an even number of channels"):
        call(torch.randn(1, 5, 5, 5), weight, bias)
    with pytest.raises(ValueError, match="x: every dimension must be non-empty"):
        call(x[:, :, :0], weight, bias)
    with pytest.raises(TypeError, match="x: expected a floating-point tensor"):
        call(x.long(), weight, bias)
    with pytest.raises(ValueError, match=r"weight: expected shape \(6, 1, 3, 3\)"):
        call(x, weight[:, :, :2], bias)
    with pytest.raises(ValueError, match=r"bias: expected shape \(6,\)"):
        call(x, weight, bias[:3])
    with pytest.raises(TypeError, match="weight: expected x's dtype"):
        call(x, weight.double(), bias)
    with pytest.raises(ValueError, match="bias: expected x's device"):
        call(x, weight, bias.to("meta"))
    with pytest.raises(TypeError, match="bias: expected a tensor or None"):
        call(x, weight, 0.5)
    with pytest.raises(ValueError, match="activation: expected one of"):
        call(x, weight, bias, "silu")
    with pytest.raises(ValueError, match="activation_weight: prelu needs its slope"):
        call(x, weight, bias, "prelu")
    with pytest.raises(ValueError, match="activation_weight: only prelu takes one"):
        call(x, weight, bias, "gelu", slope)
    with pytest.raises(ValueError, match=r"activation_weight: expected shape \(1,\)"):
        call(x, weight, bias, "prelu", torch.ones(6))
    with pytest.raises(TypeError, match="activation_weight: expected x's dtype"):
        call(x, weight, bias, "prelu", slope.double())
    with pytest.raises(ValueError, match="backend"):
        call(x, weight, bias, backend="cuda")


# ---------------------------------------------------------------------------------------------
# torch.compile
# ---------------------------------------------------------------------------------------------
IMAGE_SIZES = ((9, 13), (12, 7), (5, 20))


@requires_native
def test_compiled_op_forward_and_backward_do_not_recompile_for_new_image_sizes():
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("inductor")
    fn = gated_fn("native", "prelu")
    compiled = torch.compile(fn, backend=counter, fullgraph=True, dynamic=True)
    for height, width in IMAGE_SIZES:
        inputs = gated_inputs((2, 6, height, width), torch.float32, True, "prelu")
        grad = torch.randn(2, 3, height, width)
        want, got = forward_and_grads(fn, inputs, grad), forward_and_grads(compiled, inputs, grad)
        torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)
        for name, a, b in zip(GATED_NAMES, got[1:], want[1:]):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, msg=name)
    assert counter.frame_count == 1, f"compiled {counter.frame_count} times for {len(IMAGE_SIZES)} image sizes"


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
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("shape", GATED_SHAPES + [(2, 254, 67, 130)], ids=_shape_id)
def test_native_cuda_matches_reference(shape, activation, dtype):
    assert_gated_close("native", shape, dtype, True, activation, device="cuda")


@requires_cuda
@requires_native_cuda
def test_native_cuda_is_deterministic_and_gradchecks():
    inputs = gated_inputs((2, 10, 40, 140), torch.float32, True, "prelu", device="cuda")
    grad = torch.randn(2, 5, 40, 140, device="cuda")
    fn = gated_fn("native", "prelu")
    first, second = forward_and_grads(fn, inputs, grad), forward_and_grads(fn, inputs, grad)
    assert torch.equal(first[0], second[0])
    for name, a, b in zip(GATED_NAMES, first[1:], second[1:]):
        assert torch.equal(a, b), f"{name} differs between runs"
    small = [t.requires_grad_() for t in gated_inputs((2, 4, 4, 5), torch.float64, True, "prelu", device="cuda")]
    assert torch.autograd.gradcheck(fn, small, eps=1e-6, atol=1e-7)
