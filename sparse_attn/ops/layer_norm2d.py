"""Channel LayerNorm of the Restormer family: contract, backend dispatch, autograd (DESIGN.md §5).

    bias given (WithBias):  out = (x − μ)/√(σ² + eps)·weight + bias
    bias None (BiasFree):   out = x/√(σ² + eps)·weight

μ, σ² over the C channels of every pixel of an NCHW map (σ² biased). No to_3d / to_4d copies;
backward saves x and the per-pixel μ and 1/√(σ² + eps) only.
"""
import math

import torch

from ..reference import layer_norm2d as reference_layer_norm2d
from . import _library

try:
    from ..kernels import layer_norm2d as triton_launchers
except ImportError:  # no Triton here: the backend says so when asked for
    triton_launchers = None


# ---------------------------------------------------------------------------------------------
# Contract
# ---------------------------------------------------------------------------------------------
def _check_arguments(x, weight, bias=None, eps=1e-5):
    """Validate x, weight, the optional bias and eps; returns the kernels' arguments."""
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
    return x, weight, bias, eps if isinstance(eps, float) else float(eps)


# ---------------------------------------------------------------------------------------------
# Autograd and fake (meta) implementations: the native op and the Triton op share the contract
# (out, and the per-pixel mean and 1/√(σ² + eps) that backward takes with x), so they share the
# autograd formula.
# ---------------------------------------------------------------------------------------------
def _fake_forward(x, weight, bias, eps):
    batch, _, height, width = x.shape
    stats = x.new_empty((batch, height, width), dtype=torch.promote_types(x.dtype, torch.float32))
    return torch.empty_like(x, memory_format=torch.contiguous_format), stats, torch.empty_like(stats)


def _fake_backward(grad_out, x, weight, bias, mean, rstd):
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            torch.empty_like(weight, memory_format=torch.contiguous_format), torch.empty_like(weight))


def _setup_context(ctx, inputs, output):
    x, weight, bias, _ = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, weight, bias, mean, rstd)
    ctx.has_bias = bias is not None


def _backward(ctx, backward_op, grad_out, _grad_mean, _grad_rstd):
    x, weight, bias, mean, rstd = ctx.saved_tensors
    grad_x, grad_weight, grad_bias = backward_op(grad_out, x, weight, bias, mean, rstd)
    return grad_x, grad_weight, grad_bias if ctx.has_bias else None, None


# ---------------------------------------------------------------------------------------------
# Backends
# ---------------------------------------------------------------------------------------------
def _native_limits(x, *_):
    """The CUDA kernels: one thread per pixel in a one-dimensional grid of 256-thread blocks,
    and the weight-gradient grid's second dimension over the channels."""
    if x.device.type != "cuda":
        return None
    batch, channels, height, width = x.shape
    if batch * height * width >= 2**31 * 256:
        return f"its CUDA kernels take B * H * W below 2^39, got {batch * height * width}"
    if channels >= 65536:
        return f"its CUDA kernels take C below 65536, got {channels}"
    return None


_OP = _library.plug(_library.OpTable(
    name="layer_norm2d",
    arguments=_check_arguments,
    reference=reference_layer_norm2d,
    result=_library.first_output,
    fake_forward=_fake_forward,
    fake_backward=_fake_backward,
    setup_context=_setup_context,
    backward=_backward,
    native=_library.Kernels(
        forward="layer_norm2d_forward", backward="layer_norm2d_backward",
        dtypes={"cpu": (torch.float32, torch.float64), "cuda": (torch.float32, torch.float64)},
        limits=_native_limits),
    triton=_library.Kernels(
        forward="layer_norm2d_triton_forward", backward="layer_norm2d_triton_backward",
        dtypes=_library.TRITON_DTYPES,
        launchers=triton_launchers),
))


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
    return _OP(backend, x, weight, bias, eps)
