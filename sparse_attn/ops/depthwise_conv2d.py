"""Depthwise convolution with "same" zero padding: contract, backend dispatch, autograd
(DESIGN.md §5).

    out[c] = bias[c] + sum_{i,j} weight[c, 0, i, j] · x[c, y + (i - r)·d, x + (j - r)·d]

r = (K - 1) / 2, d the dilation, stride 1, zeros outside the image. The 3x3 on q, k, v of every
channel attention (``qkv_dwconv``) and the depthwise experts of DRSformer's MEFC (K = 1…7,
dilation 1 or 2) run on it: PyTorch's CPU convolution takes these shapes through slow paths
(see the README's benchmark figures). Backward saves x only.
"""
import torch

from .. import encodings
from ..reference import depthwise_conv2d as reference_depthwise_conv2d
from . import _library

try:
    from ..kernels import depthwise_conv2d as triton_launchers
except ImportError:  # no Triton here: the backend says so when asked for
    triton_launchers = None

KERNEL_SIZES = (1, 3, 5, 7)


# ---------------------------------------------------------------------------------------------
# Contract
# ---------------------------------------------------------------------------------------------
def _check_arguments(x, weight, bias=None, dilation=1):
    """Validate the arguments; returns the kernels' arguments."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x: expected a tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"x: expected shape (B, C, H, W), got {tuple(x.shape)}")
    if any(s == 0 for s in x.shape):
        raise ValueError(f"x: every dimension must be non-empty, got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"x: expected a floating-point tensor, got {x.dtype}")
    if isinstance(dilation, bool) or not isinstance(dilation, int) or dilation < 1:
        raise ValueError(f"dilation: expected a positive integer, got {dilation!r}")
    channels = x.shape[1]
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight: expected a tensor, got {type(weight).__name__}")
    k = weight.shape[-1] if weight.dim() == 4 else None
    if weight.dim() != 4 or tuple(weight.shape[:3]) != (channels, 1, k) or k not in KERNEL_SIZES:
        raise ValueError(f"weight: expected shape (C, 1, K, K) with C = {channels} (x's channels) and K one of "
                         f"{KERNEL_SIZES}, got {tuple(weight.shape)}")
    for name, t, shape in (("weight", weight, None), ("bias", bias, (channels,))):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a tensor or None, got {type(t).__name__}")
        if shape is not None and tuple(t.shape) != shape:
            raise ValueError(f"{name}: expected shape {shape} for x with {channels} channels, got {tuple(t.shape)}")
        if t.dtype != x.dtype:
            raise TypeError(f"{name}: expected x's dtype {x.dtype}, got {t.dtype}")
        if t.device != x.device:
            raise ValueError(f"{name}: expected x's device {x.device}, got {t.device}")
    return x, weight, bias, dilation


# ---------------------------------------------------------------------------------------------
# Autograd and fake (meta) implementations, shared by the native and the Triton op
# ---------------------------------------------------------------------------------------------
def _fake_forward(x, weight, bias, dilation):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _fake_backward(grad_out, x, weight, bias, dilation):
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            torch.empty_like(weight, memory_format=torch.contiguous_format), x.new_empty((x.shape[1],)))


def _setup_context(ctx, inputs, output):
    x, weight, bias, dilation = inputs
    ctx.save_for_backward(x, weight, bias)
    ctx.dilation, ctx.has_bias = dilation, bias is not None


def _backward(ctx, backward_op, grad_out):
    x, weight, bias = ctx.saved_tensors
    grad_x, grad_weight, grad_bias = backward_op(grad_out, x, weight, bias, ctx.dilation)
    return grad_x, grad_weight, grad_bias if ctx.has_bias else None, None


# ---------------------------------------------------------------------------------------------
# Backends
# ---------------------------------------------------------------------------------------------
_CUDA_GRID = encodings.cuda_grid("depthwise_conv2d")


def _native_limits(x, weight, bias, dilation):
    """The CUDA kernels index a plane with 32-bit integers and use a one-dimensional grid of one
    block per (image, channel, dilation phase, tile of the phase's lattice)."""
    if x.device.type != "cuda" or _CUDA_GRID is None:
        return None
    tile_h, tile_w, grid_limit = _CUDA_GRID
    batch, channels, height, width = x.shape
    if height * width >= 2**31:
        return f"its CUDA kernels take H * W below 2^31, got {height} * {width}"
    # as cuda_blocks_per_plane in csrc/common/depthwise_conv2d_grid.h
    lattice_h, lattice_w = -(-height // dilation), -(-width // dilation)
    per_plane = (min(dilation, height) * min(dilation, width) * -(-lattice_h // tile_h) * -(-lattice_w // tile_w))
    if batch * channels * per_plane >= grid_limit:
        return (f"its CUDA kernels take fewer than {grid_limit} blocks (one per image, channel, dilation phase and "
                f"tile of {tile_h} x {tile_w} lattice pixels), got {batch * channels * per_plane}")
    return None


_OP = _library.plug(_library.OpTable(
    name="depthwise_conv2d",
    arguments=_check_arguments,
    reference=reference_depthwise_conv2d,
    fake_forward=_fake_forward,
    fake_backward=_fake_backward,
    setup_context=_setup_context,
    backward=_backward,
    native=_library.Kernels(
        forward="depthwise_conv2d_forward", backward="depthwise_conv2d_backward",
        dtypes={"cpu": (torch.float32, torch.float64), "cuda": (torch.float32, torch.float64)},
        limits=_native_limits),
    triton=None if triton_launchers is None else _library.Kernels(
        forward="depthwise_conv2d_triton_forward", backward="depthwise_conv2d_triton_backward",
        dtypes=_library.TRITON_DTYPES, launchers=triton_launchers),
))


def depthwise_conv2d(x, weight, bias=None, dilation=1, backend="auto"):
    """A depthwise convolution that keeps the map's size: ``F.conv2d(x, weight, bias,
    padding=dilation * (K - 1) // 2, dilation=dilation, groups=C)``, fused.

    Args:
        x: (B, C, H, W) floating-point tensor.
        weight: (C, 1, K, K), K one of 1, 3, 5, 7 (an ``nn.Conv2d(C, C, K, groups=C)``'s weight).
        bias: (C,) or None.
        dilation: the spacing of the taps (1, or 2 for DRSformer's dilated experts).
        backend: "auto", "reference", "native" or "triton" (see ``sparse_attn.backends``).

    Returns:
        (B, C, H, W) of x's dtype.
    """
    return _OP(backend, x, weight, bias, dilation)
