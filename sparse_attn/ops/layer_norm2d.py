"""Channel LayerNorm of the Restormer family: contract, backend dispatch, autograd (DESIGN.md §5).

    bias given (WithBias):  out = (x − μ)/√(σ² + eps)·weight + bias
    bias None (BiasFree):   out = x/√(σ² + eps)·weight

μ, σ² over the C channels of every pixel of an NCHW map (σ² biased). No to_3d / to_4d copies;
backward saves x and the per-pixel μ and 1/√(σ² + eps) only.
"""
import math

import torch

from .. import backends
from ..reference import layer_norm2d as reference_layer_norm2d

try:
    import triton

    from ..kernels import layer_norm2d as triton_kernels
except ImportError:  # no Triton here: backends.why_unavailable says so when "triton" is asked for
    triton_kernels = None

_NATIVE_OP = "layer_norm2d_forward"
_NATIVE_BACKWARD = "layer_norm2d_backward"
_TRITON_FORWARD = "layer_norm2d_triton_forward"
_TRITON_BACKWARD = "layer_norm2d_triton_backward"
_DTYPES = {
    "native": {"cpu": (torch.float32, torch.float64), "cuda": (torch.float32, torch.float64)},
    # On CPU tensors Triton is its interpreter, whose bf16 arithmetic is wrong (numpy has no bf16).
    "triton": {"cpu": (torch.float32, torch.float16),
               "cuda": (torch.float32, torch.float16, torch.bfloat16)},
}


# ---------------------------------------------------------------------------------------------
# Contract
# ---------------------------------------------------------------------------------------------
def _check_arguments(x, weight, bias, eps):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x: expected a tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"x: expected shape (B, C, H, W), got {tuple(x.shape)}")
    if any(s == 0 for s in x.shape):
        raise ValueError(f"x: every dimension must be non-empty, got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"x: expected a floating-point tensor, got {x.dtype}")
    channels = x.shape[1]
    for name, t in (("weight", weight), ("bias", bias)):
        if t is None and name == "bias":
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a tensor{' or None' if name == 'bias' else ''}, got {type(t).__name__}")
        if tuple(t.shape) != (channels,):
            raise ValueError(f"{name}: expected shape ({channels},) for x with {channels} channels, got {tuple(t.shape)}")
        if t.dtype != x.dtype:
            raise TypeError(f"{name}: expected x's dtype {x.dtype}, got {t.dtype}")
        if t.device != x.device:
            raise ValueError(f"{name}: expected x's device {x.device}, got {t.device}")
    # (a chained comparison, not math.isfinite, which torch.compile cannot trace; NaN fails it)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 <= eps < math.inf:
        raise ValueError(f"eps: expected a finite number >= 0, got {eps!r}")


# ---------------------------------------------------------------------------------------------
# Dispatch
# ---------------------------------------------------------------------------------------------
def layer_norm2d(x, weight, bias=None, eps=1e-5, backend="auto"):
    """LayerNorm over the channels of every pixel of an NCHW map (Restormer's ``LayerNorm``
    without its to_3d / to_4d copies).

    Args:
        x: (B, C, H, W) floating-point tensor.
        weight: (C,) scale.
        bias: (C,) shift, or None. With a bias x is centred (``WithBias``); without, x itself is
            divided by the standard deviation (``BiasFree``, as upstream: the variance is still
            taken about the mean).
        eps: added to the biased variance (1e-5 upstream).
        backend: "auto", "reference", "native" or "triton" (see ``sparse_attn.backends``).

    Returns:
        (B, C, H, W) of x's dtype.
    """
    _check_arguments(x, weight, bias, eps)
    name = backends.resolve(backend, x, op=_NATIVE_OP, dtypes=_DTYPES, triton_ready=triton_kernels is not None)
    if name == "reference":
        return reference_layer_norm2d(x, weight, bias, eps)
    forward_op = getattr(torch.ops.sparse_attn, _NATIVE_OP if name == "native" else _TRITON_FORWARD)
    return forward_op(x, weight, bias, eps if isinstance(eps, float) else float(eps))[0]


# ---------------------------------------------------------------------------------------------
# Autograd and fake (meta) implementations, shared by the native and the Triton ops
# ---------------------------------------------------------------------------------------------
def _stats_dtype(x):
    return torch.promote_types(x.dtype, torch.float32)


def _fake_forward(x, weight, bias, eps):
    batch, _, height, width = x.shape
    stats = x.new_empty((batch, height, width), dtype=_stats_dtype(x))
    return torch.empty_like(x, memory_format=torch.contiguous_format), stats, torch.empty_like(stats)


def _fake_backward(grad_out, x, weight, bias, mean, rstd):
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            torch.empty_like(weight, memory_format=torch.contiguous_format), torch.empty_like(weight))


def _setup_context(ctx, inputs, output):
    x, weight, bias, _ = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, weight, bias, mean, rstd)
    ctx.has_bias = bias is not None


def _backward_with(backward_op):
    """The autograd formula of a forward op whose backward is ``backward_op``."""
    def backward(ctx, grad_out, _grad_mean, _grad_rstd):
        x, weight, bias, mean, rstd = ctx.saved_tensors
        grad_x, grad_weight, grad_bias = backward_op(grad_out, x, weight, bias, mean, rstd)
        return grad_x, grad_weight, grad_bias if ctx.has_bias else None, None
    return backward


if backends.why_unavailable("native", "cpu", op=_NATIVE_OP) is None:
    torch.library.register_fake(f"sparse_attn::{_NATIVE_OP}", _fake_forward)
    torch.library.register_fake(f"sparse_attn::{_NATIVE_BACKWARD}", _fake_backward)
    torch.library.register_autograd(f"sparse_attn::{_NATIVE_OP}",
                                    _backward_with(getattr(torch.ops.sparse_attn, _NATIVE_BACKWARD)),
                                    setup_context=_setup_context)

if triton_kernels is not None:
    # As mixed_scale_dwconv: triton_op for compiled kernels, an opaque custom op (with the native
    # op's fakes) in the interpreter.
    _kernels_compiled = isinstance(triton_kernels.layer_norm2d_forward_kernel, triton.runtime.JITFunction)
    _define = torch.library.triton_op if _kernels_compiled else torch.library.custom_op
    _triton_forward = _define(f"sparse_attn::{_TRITON_FORWARD}", triton_kernels.forward, mutates_args=())
    _triton_backward = _define(f"sparse_attn::{_TRITON_BACKWARD}", triton_kernels.backward, mutates_args=())
    if not _kernels_compiled:
        torch.library.register_fake(f"sparse_attn::{_TRITON_FORWARD}", _fake_forward)
        torch.library.register_fake(f"sparse_attn::{_TRITON_BACKWARD}", _fake_backward)
    torch.library.register_autograd(f"sparse_attn::{_TRITON_FORWARD}", _backward_with(_triton_backward),
                                    setup_context=_setup_context)
