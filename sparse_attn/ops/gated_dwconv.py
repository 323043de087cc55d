"""Gated depthwise core of Restormer's GDFN: contract, backend dispatch, autograd (DESIGN.md §5).

    z = dwconv3x3(x) + bias            x: (B, 2h, H, W), zero padding 1
    out = act(z[:, :h]) · z[:, h:]     (B, h, H, W)

act: "gelu" (exact, erf), "prelu" (one learnable slope ``activation_weight``, as ELF's FFN),
"relu2" or "identity". The kernels read x once and write out once; backward saves x only and
recomputes z tile by tile.
"""
import torch

from .. import encodings
from ..encodings import GATE_ACTIVATION_CODES, GATE_ACTIVATION_NAMES
from ..reference import gated_dwconv as reference_gated_dwconv
from . import _library

try:
    from ..kernels import gated_dwconv as triton_launchers
except ImportError:  # no Triton here: the backend says so when asked for
    triton_launchers = None

ACTIVATIONS = tuple(GATE_ACTIVATION_CODES)


# ---------------------------------------------------------------------------------------------
# Contract
# ---------------------------------------------------------------------------------------------
def _check_arguments(x, weight, bias=None, activation="gelu", activation_weight=None):
    """Validate the arguments; returns the kernels' arguments (the activation as its code)."""
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
    if activation not in GATE_ACTIVATION_CODES:
        raise ValueError(f"activation: expected one of {ACTIVATIONS}, got {activation!r}")
    if activation == "prelu" and activation_weight is None:
        raise ValueError("activation_weight: prelu needs its slope, a tensor of shape (1,)")
    if activation != "prelu" and activation_weight is not None:
        raise ValueError(f"activation_weight: only prelu takes one, got one for {activation!r}")
    named = [("weight", weight, (channels, 1, 3, 3)), ("bias", bias, (channels,)),
             ("activation_weight", activation_weight, (1,))]
    for name, t, shape in named:
        if t is None and name != "weight":
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a tensor{' or None' if name != 'weight' else ''}, got {type(t).__name__}")
        if tuple(t.shape) != shape:
            raise ValueError(f"{name}: expected shape {shape} for x with {channels} channels, got {tuple(t.shape)}")
        if t.dtype != x.dtype:
            raise TypeError(f"{name}: expected x's dtype {x.dtype}, got {t.dtype}")
        if t.device != x.device:
            raise ValueError(f"{name}: expected x's device {x.device}, got {t.device}")
    return x, weight, bias, GATE_ACTIVATION_CODES[activation], activation_weight


def _reference(x, weight, bias, code, activation_weight):
    return reference_gated_dwconv(x, weight, bias, GATE_ACTIVATION_NAMES[code], activation_weight)


# ---------------------------------------------------------------------------------------------
# Autograd and fake (meta) implementations: the native op and the Triton op share the contract
# (same inputs and output; x saved for backward), so they share the autograd formula.
# ---------------------------------------------------------------------------------------------
def _fake_forward(x, weight, bias, activation, activation_weight):
    batch, channels, height, width = x.shape
    return x.new_empty((batch, channels // 2, height, width))


def _fake_backward(grad_out, x, weight, bias, activation, activation_weight):
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            torch.empty_like(weight, memory_format=torch.contiguous_format), x.new_empty((x.shape[1],)),
            x.new_empty((1,)))


def _setup_context(ctx, inputs, output):
    x, weight, bias, activation, activation_weight = inputs
    # Only x (and the parameters): z is recomputed from x in backward.
    ctx.save_for_backward(x, weight, bias, activation_weight)
    ctx.activation = activation
    ctx.has_bias, ctx.has_slope = bias is not None, activation_weight is not None


def _backward(ctx, backward_op, grad_out):
    x, weight, bias, activation_weight = ctx.saved_tensors
    grad_x, grad_weight, grad_bias, grad_slope = backward_op(grad_out, x, weight, bias, ctx.activation,
                                                             activation_weight)
    return grad_x, grad_weight, grad_bias if ctx.has_bias else None, None, grad_slope if ctx.has_slope else None


# ---------------------------------------------------------------------------------------------
# Backends
# ---------------------------------------------------------------------------------------------
_CUDA_GRID = encodings.cuda_grid("gated_dwconv")


def _native_limits(x, *_):
    """The CUDA kernels index a plane with 32-bit integers and use one-dimensional grids of one
    block per (image, channel group, tile)."""
    if x.device.type != "cuda" or _CUDA_GRID is None:
        return None
    tile_h, tile_w, grid_limit = _CUDA_GRID
    batch, channels, height, width = x.shape
    if height * width >= 2**31:
        return f"its CUDA kernels take H * W below 2^31, got {height} * {width}"
    if batch * (channels // 2) * -(-height // tile_h) * -(-width // tile_w) >= grid_limit:
        return (f"its CUDA kernels take fewer than {grid_limit} tiles of {tile_h} x {tile_w} pixels "
                "per channel group and image")
    return None


_OP = _library.plug(_library.OpTable(
    name="gated_dwconv",
    arguments=_check_arguments,
    reference=_reference,
    fake_forward=_fake_forward,
    fake_backward=_fake_backward,
    setup_context=_setup_context,
    backward=_backward,
    native=_library.Kernels(
        forward="gated_dwconv_forward", backward="gated_dwconv_backward",
        dtypes={"cpu": (torch.float32, torch.float64), "cuda": (torch.float32, torch.float64)},
        limits=_native_limits),
    triton=_library.Kernels(
        forward="gated_dwconv_triton_forward", backward="gated_dwconv_triton_backward",
        dtypes=_library.TRITON_DTYPES,
        launchers=triton_launchers),
))


def gated_dwconv(x, weight, bias=None, activation="gelu", activation_weight=None, backend="auto"):
    """The depthwise core of Restormer's gated-Dconv feed-forward network (between
    ``project_in`` and ``project_out``), fused.

    Args:
        x: (B, 2h, H, W) floating-point tensor.
        weight: (2h, 1, 3, 3) depthwise weight (``dwconv``); bias: (2h,) or None.
        activation: the gate, "gelu" (exact), "prelu", "relu2" or "identity".
        activation_weight: prelu's slope, shape (1,) (``nn.PReLU()``'s weight); None otherwise.
        backend: "auto", "reference", "native" or "triton" (see ``sparse_attn.backends``).

    Returns:
        (B, h, H, W) of x's dtype: ``act(z1) * z2`` with ``z1, z2 = dwconv(x).chunk(2, dim=1)``.
    """
    return _OP(backend, x, weight, bias, activation, activation_weight)
