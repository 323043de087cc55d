"""Mixed-scale depthwise core of DRSformer's MSFN: contract, backend dispatch, autograd
(DESIGN.md §2).

    y3 = relu(dwconv3x3(x)),  y5 = relu(dwconv5x5(x))
    x1 = cat(y3[:, :h], y5[:, :h]),  x2 = cat(y3[:, h:], y5[:, h:])
    out = cat(relu(conv3x3(x1, groups=h)), relu(conv5x5(x2, groups=h)))

The native and Triton kernels read x once per use and write out once: y3, y5, x1, x2 never exist
in full. Backward saves x and out (which ``project_out`` saves anyway) and recomputes the first
stage tile by tile.
"""
import torch

from .. import encodings
from ..reference import mixed_scale_dwconv as reference_mixed_scale_dwconv
from . import _library

try:
    from ..kernels import mixed_scale_dwconv as triton_launchers
except ImportError:  # no Triton here: the backend says so when asked for
    triton_launchers = None

_WEIGHT_NAMES = ("w3", "w5", "w3_1", "w5_1")
_BIAS_NAMES = ("b3", "b5", "b3_1", "b5_1")


# ---------------------------------------------------------------------------------------------
# Contract
# ---------------------------------------------------------------------------------------------
def _expected_shapes(channels):
    hidden = channels // 2
    weights = {"w3": (channels, 1, 3, 3), "w5": (channels, 1, 5, 5),
               "w3_1": (hidden, 2, 3, 3), "w5_1": (hidden, 2, 5, 5)}
    biases = {"b3": (channels,), "b5": (channels,), "b3_1": (hidden,), "b5_1": (hidden,)}
    return weights, biases


def _check_arguments(x, w3, w5, w3_1, w5_1, b3=None, b5=None, b3_1=None, b5_1=None):
    """Validate x, the four weights and the (optional) four biases; returns them as the kernels'
    arguments."""
    weights, biases = (w3, w5, w3_1, w5_1), (b3, b5, b3_1, b5_1)
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x: expected a tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"x: expected shape (B, 2h, H, W), got {tuple(x.shape)}")
    if any(s == 0 for s in x.shape):
        raise ValueError(f"x: every dimension must be non-empty, got {tuple(x.shape)}")
    channels = x.shape[1]
    if channels % 2 != 0:
        raise ValueError(f"x: expected an even number of channels (2h), got {channels}")
    if not x.is_floating_point():
        raise TypeError(f"x: expected a floating-point tensor, got {x.dtype}")
    weight_shapes, bias_shapes = _expected_shapes(channels)
    named = [(n, t, weight_shapes[n]) for n, t in zip(_WEIGHT_NAMES, weights)]
    named += [(n, t, bias_shapes[n]) for n, t in zip(_BIAS_NAMES, biases) if t is not None]
    for name, t, shape in named:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a tensor{' or None' if name in _BIAS_NAMES else ''}, "
                            f"got {type(t).__name__}")
        if tuple(t.shape) != shape:
            raise ValueError(f"{name}: expected shape {shape} for x with {channels} channels, "
                             f"got {tuple(t.shape)}")
        if t.dtype != x.dtype:
            raise TypeError(f"{name}: expected x's dtype {x.dtype}, got {t.dtype}")
        if t.device != x.device:
            raise ValueError(f"{name}: expected x's device {x.device}, got {t.device}")
    return (x, *weights, *biases)


# ---------------------------------------------------------------------------------------------
# Autograd and fake (meta) implementations: the native op and the Triton op share the contract
# (same inputs and output; x and out saved for backward), so they share the autograd formula.
# ---------------------------------------------------------------------------------------------
def _fake_forward(x, w3, w5, w3_1, w5_1, b3, b5, b3_1, b5_1):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _fake_backward(grad_out, x, out, w3, w5, w3_1, w5_1, b3, b5):
    channels = x.shape[1]
    hidden = channels // 2
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            torch.empty_like(w3, memory_format=torch.contiguous_format),
            torch.empty_like(w5, memory_format=torch.contiguous_format),
            torch.empty_like(w3_1, memory_format=torch.contiguous_format),
            torch.empty_like(w5_1, memory_format=torch.contiguous_format),
            x.new_empty((channels,)), x.new_empty((channels,)), x.new_empty((hidden,)), x.new_empty((hidden,)))


def _setup_context(ctx, inputs, output):
    x, w3, w5, w3_1, w5_1, b3, b5, b3_1, b5_1 = inputs
    # out carries the second stage's relu mask; the first stage is recomputed from x.
    ctx.save_for_backward(x, output, w3, w5, w3_1, w5_1, b3, b5)
    ctx.has_bias = tuple(b is not None for b in (b3, b5, b3_1, b5_1))


def _backward(ctx, backward_op, grad_out):
    x, out, w3, w5, w3_1, w5_1, b3, b5 = ctx.saved_tensors
    grads = backward_op(grad_out, x, out, w3, w5, w3_1, w5_1, b3, b5)
    bias_grads = tuple(g if given else None for g, given in zip(grads[5:], ctx.has_bias))
    return (*grads[:5], *bias_grads)


# ---------------------------------------------------------------------------------------------
# Backends
# ---------------------------------------------------------------------------------------------
_CUDA_GRID = encodings.cuda_grid("mixed_scale_dwconv")


def _native_limits(x, *_):
    """The CUDA kernels' grid: one block per (batch and channel, tile row, tile column)."""
    if x.device.type != "cuda" or _CUDA_GRID is None:
        return None
    tile_h, _tile_w, grid_limit = _CUDA_GRID
    batch, channels, height, width = x.shape
    if batch * channels >= grid_limit:
        return f"its CUDA kernels take B * 2h below {grid_limit}, got {batch} * {channels}"
    if -(-height // tile_h) >= grid_limit:
        return f"its CUDA kernels take H below {grid_limit * tile_h}, got {height}"
    if height * width >= 2**31:
        return f"its CUDA kernels take H * W below 2^31, got {height} * {width}"
    return None


_OP = _library.plug(_library.OpTable(
    name="mixed_scale_dwconv",
    arguments=_check_arguments,
    reference=reference_mixed_scale_dwconv,
    fake_forward=_fake_forward,
    fake_backward=_fake_backward,
    setup_context=_setup_context,
    backward=_backward,
    native=_library.Kernels(
        forward="mixed_scale_dwconv_forward", backward="mixed_scale_dwconv_backward",
        dtypes={"cpu": (torch.float32, torch.float64), "cuda": (torch.float32, torch.float64)},
        limits=_native_limits),
    triton=_library.Kernels(
        forward="mixed_scale_dwconv_triton_forward", backward="mixed_scale_dwconv_triton_backward",
        dtypes=_library.TRITON_DTYPES,
        launchers=triton_launchers),
))


def mixed_scale_dwconv(x, w3, w5, w3_1, w5_1, b3=None, b5=None, b3_1=None, b5_1=None, backend="auto"):
    """The depthwise core of DRSformer's mixed-scale feed-forward network (between
    ``project_in`` and ``project_out``), fused.

    Args:
        x: (B, 2h, H, W) floating-point tensor.
        w3, w5: (2h, 1, 3, 3) and (2h, 1, 5, 5) depthwise weights (``dwconv3x3``, ``dwconv5x5``).
        w3_1, w5_1: (h, 2, 3, 3) and (h, 2, 5, 5) grouped weights (``dwconv3x3_1``, ``dwconv5x5_1``).
        b3, b5, b3_1, b5_1: the matching biases, (2h,), (2h,), (h,), (h,), or None.
        backend: "auto", "reference", "native" or "triton" (see ``sparse_attn.backends``).

    Returns:
        out: (B, 2h, H, W) of x's dtype: ``relu(conv3x3(x1))`` in the first h channels and
        ``relu(conv5x5(x2))`` in the last h.
    """
    return _OP(backend, x, w3, w5, w3_1, w5_1, b3, b5, b3_1, b5_1)
