"""depthwise_conv2d (DESIGN.md §5): the reference and native CPU against the float64 reference
(forward and every gradient, every kernel size, dilations 1 to 3), gradcheck, opcheck,
torch.compile, determinism, what backward saves, input checks, and the modules that run on it."""
import pytest
import torch
import torch.nn.functional as F

import sparse_attn
from benchmarks.memory import saved_bytes
from block_ops_cases import (DEPTHWISE_CASES, DEPTHWISE_NAMES, assert_depthwise_close, depthwise_fn,
                             depthwise_inputs)
from helpers import assert_deterministic, forward_and_grads
from sparse_attn import backends

NATIVE_CPU = backends.why_unavailable("native", "cpu")
requires_native = pytest.mark.skipif(NATIVE_CPU is not None, reason=f"native backend: {NATIVE_CPU}")
_case_id = lambda c: "B{}C{}_{}x{}_k{}d{}".format(*c)  # noqa: E731
_shape_id = lambda s: "x".join(map(str, s))  # noqa: E731


@requires_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("case", DEPTHWISE_CASES, ids=_case_id)
def test_native_matches_reference(case, bias, dtype):
    assert_depthwise_close("native", case, dtype, bias)


@requires_native
@pytest.mark.parametrize("case", [(1, 16, 256, 256, 7, 2), (1, 16, 256, 256, 3, 1)], ids=_case_id)
def test_native_matches_reference_on_a_large_output(case):
    # 4 MiB of float32 output, the size from which the AVX-512 forward writes with streaming stores
    assert_depthwise_close("native", case, torch.float32, bias=True)


@pytest.mark.parametrize("kernel,dilation", [(1, 1), (3, 1), (5, 2), (7, 2)])
def test_reference_is_a_same_size_grouped_conv2d(kernel, dilation):
    x, weight, bias = depthwise_inputs((2, 4, 9, 8), kernel, torch.float64)
    conv = torch.nn.Conv2d(4, 4, kernel, padding=dilation * (kernel - 1) // 2, dilation=dilation, groups=4,
                           dtype=torch.float64)
    with torch.no_grad():
        conv.weight.copy_(weight)
        conv.bias.copy_(bias)
    torch.testing.assert_close(sparse_attn.depthwise_conv2d(x, weight, bias, dilation, backend="reference"), conv(x),
                               rtol=0, atol=0)


@requires_native
def test_native_noncontiguous_inputs():
    x, weight, bias = depthwise_inputs((2, 6, 9, 11), 5, torch.float64)
    want = sparse_attn.depthwise_conv2d(x, weight, bias, 2, backend="reference")
    for xi in (x.to(memory_format=torch.channels_last), x.transpose(2, 3).contiguous().transpose(2, 3)):
        got = sparse_attn.depthwise_conv2d(xi, weight.transpose(2, 3).contiguous().transpose(2, 3), bias, 2,
                                           backend="native")
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


@pytest.mark.parametrize("backend", ["reference", pytest.param("native", marks=requires_native)])
@pytest.mark.parametrize("kernel,dilation", [(1, 1), (3, 1), (5, 2), (7, 1)])
def test_gradcheck(backend, kernel, dilation):
    inputs = [t.requires_grad_() for t in depthwise_inputs((2, 3, 6, 7), kernel, torch.float64)]
    assert torch.autograd.gradcheck(depthwise_fn(backend, dilation), inputs, eps=1e-6, atol=1e-7)


@requires_native
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(2, 4, 5, 7), (1, 1, 5, 6)], ids=_shape_id)
def test_opcheck(shape, bias):
    # one channel: the weight's and bias's gradients must not be views of one buffer
    x, weight, b = [t.requires_grad_() if t is not None else None
                    for t in depthwise_inputs(shape, 3, torch.float64, bias)]
    ops = torch.ops.sparse_attn
    torch.library.opcheck(ops.depthwise_conv2d_forward.default, (x, weight, b, 2))
    x, weight, b = [t.detach() if t is not None else None for t in (x, weight, b)]
    torch.library.opcheck(ops.depthwise_conv2d_backward.default, (torch.randn_like(x), x, weight, b, 2))


@requires_native
def test_native_is_deterministic_and_independent_of_threads():
    # several bands and images, so that the parameter gradients sum many per-task partials
    inputs = depthwise_inputs((2, 5, 90, 140), 7, torch.float32)
    assert_deterministic(depthwise_fn("native", 2), inputs, torch.randn(2, 5, 90, 140), DEPTHWISE_NAMES)


@requires_native
def test_native_saves_x_only():
    x, weight, bias = depthwise_inputs((1, 48, 32, 32), 5, torch.float32)
    x.requires_grad_()
    weight.requires_grad_()
    saved, _ = saved_bytes(lambda: sparse_attn.depthwise_conv2d(x, weight, bias, backend="native"))
    assert saved <= (x.numel() + weight.numel() + bias.numel()) * 4


@requires_native
def test_auto_runs_native_on_cpu_and_reference_for_other_dtypes():
    x, weight, bias = depthwise_inputs((1, 6, 5, 5), 3, torch.bfloat16)
    torch.testing.assert_close(sparse_attn.depthwise_conv2d(x, weight, bias),
                               F.conv2d(x, weight, bias, padding=1, groups=6))
    with pytest.raises(backends.BackendUnavailable, match="float32, float64"):
        sparse_attn.depthwise_conv2d(x, weight, bias, backend="native")


def test_input_errors_name_the_argument():
    x, weight, bias = depthwise_inputs((1, 6, 5, 5), 3, torch.float32)
    call = sparse_attn.depthwise_conv2d
    with pytest.raises(TypeError, match="x: expected a tensor"):
        call(x.numpy(), weight, bias)
    with pytest.raises(ValueError, match=r"x: expected shape \(B, C, H, W\)"):
        call(x[0], weight, bias)
    with pytest.raises(ValueError, match="x: every dimension must be non-empty"):
        call(x[:, :, :0], weight, bias)
    with pytest.raises(TypeError, match="x: expected a floating-point tensor"):
        call(x.long(), weight, bias)
    with pytest.raises(ValueError, match=r"weight: expected shape \(C, 1, K, K\) with C = 6"):
        call(x, weight[:3], bias)
    with pytest.raises(ValueError, match="K one of"):
        call(x, torch.randn(6, 1, 4, 4), bias)
    with pytest.raises(ValueError, match="K one of"):
        call(x, torch.randn(6, 1, 3, 5), bias)
    with pytest.raises(TypeError, match="weight: expected a tensor"):
        call(x, None, bias)
    with pytest.raises(ValueError, match=r"bias: expected shape \(6,\)"):
        call(x, weight, bias[:3])
    with pytest.raises(TypeError, match="weight: expected x's dtype"):
        call(x, weight.double(), bias)
    with pytest.raises(ValueError, match="bias: expected x's device"):
        call(x, weight, bias.to("meta"))
    with pytest.raises(TypeError, match="bias: expected a tensor or None"):
        call(x, weight, 0.5)
    for dilation in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="dilation: expected a positive integer"):
            call(x, weight, bias, dilation)
    with pytest.raises(ValueError, match="backend"):
        call(x, weight, bias, backend="cuda")


@requires_native
def test_compiled_op_forward_and_backward_do_not_recompile_for_new_image_sizes():
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("inductor")
    fn = depthwise_fn("native", 2)
    compiled = torch.compile(fn, backend=counter, fullgraph=True, dynamic=True)
    for height, width in ((9, 13), (12, 7), (5, 20)):
        inputs = depthwise_inputs((2, 6, height, width), 5, torch.float32)
        grad = torch.randn(2, 6, height, width)
        want, got = forward_and_grads(fn, inputs, grad), forward_and_grads(compiled, inputs, grad)
        torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)
        for name, a, b in zip(DEPTHWISE_NAMES, got[1:], want[1:]):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, msg=name)
    assert counter.frame_count == 1, f"compiled {counter.frame_count} times for 3 image sizes"
