"""Gated depthwise core of Restormer's GDFN: contract, backend dispatch, autograd (DESIGN.md §5).

    z = dwconv3x3(x) + bias            x: (B, 2h, H, W), zero padding 1
    out = act(z[:, :h]) · z[:, h:]     (B, h, H, W)

act: "gelu" (exact, erf), "prelu" (one learnable slope ``activation_weight``, as ELF's FFN),
"relu2" or "identity". The kernels read x once and write out once; backward saves x only and
recomputes z tile by tile.
"""
import torch

from .. import backends
from ..reference import gated_dwconv as reference_gated_dwconv
from ..reference.gated_dwconv import ACTIVATIONS

try:
    import triton

    from ..kernels import gated_dwconv as triton_kernels
except ImportError:  # no Triton here: backends.why_unavailable says so when "triton" is asked for
    triton_kernels = None

_NATIVE_OP = "gated_dwconv_forward"
_NATIVE_BACKWARD = "gated_dwconv_backward"
_TRITON_FORWARD = "gated_dwconv_triton_forward"
_TRITON_BACKWARD = "gated_dwconv_triton_backward"
_DTYPES = {
    "native": {"cpu": (torch.float32, torch.float64), "cuda": (torch.float32, torch.float64)},
    # On CPU tensors Triton is its interpreter, whose bf16 arithmetic is wrong (numpy has no bf16).
    "triton": {"cpu": (torch.float32, torch.float16),
               "cuda": (torch.float32, torch.float16, torch.bfloat16)},
}


# ---------------------------------------------------------------------------------------------
# Contract
# ---------------------------------------------------------------------------------------------
def _check_arguments(x, weight, bias, activation, activation_weight):
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
    if activation not in ACTIVATIONS:
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


# ---------------------------------------------------------------------------------------------
# Dispatch
# ---------------------------------------------------------------------------------------------
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
    _check_arguments(x, weight, bias, activation, activation_weight)
    name = backends.resolve(backend, x, op=_NATIVE_OP, dtypes=_DTYPES, triton_ready=triton_kernels is not None)
    if name == "reference":
        return reference_gated_dwconv(x, weight, bias, activation, activation_weight)
    forward_op = getattr(torch.ops.sparse_attn, _NATIVE_OP if name == "native" else _TRITON_FORWARD)
    return forward_op(x, weight, bias, ACTIVATIONS.index(activation), activation_weight)


# ---------------------------------------------------------------------------------------------
# Autograd and fake (meta) implementations, shared by the native and the Triton ops
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
    ctx.save_for_backward(x, weight, bias, activation_weight)
    ctx.activation = activation
    ctx.has_bias, ctx.has_slope = bias is not None, activation_weight is not None


def _backward_with(backward_op):
    """The autograd formula of a forward op whose backward is ``backward_op``."""
    def backward(ctx, grad_out):
        x, weight, bias, activation_weight = ctx.saved_tensors
        grad_x, grad_weight, grad_bias, grad_slope = backward_op(grad_out, x, weight, bias, ctx.activation,
                                                                 activation_weight)
        return (grad_x, grad_weight, grad_bias if ctx.has_bias else None, None,
                grad_slope if ctx.has_slope else None)
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
    _kernels_compiled = isinstance(triton_kernels.gated_dwconv_forward_kernel, triton.runtime.JITFunction)
    _define = torch.library.triton_op if _kernels_compiled else torch.library.custom_op
    _triton_forward = _define(f"sparse_attn::{_TRITON_FORWARD}", triton_kernels.forward, mutates_args=())
    _triton_backward = _define(f"sparse_attn::{_TRITON_BACKWARD}", triton_kernels.backward, mutates_args=())
    if not _kernels_compiled:
        torch.library.register_fake(f"sparse_attn::{_TRITON_FORWARD}", _fake_forward)
        torch.library.register_fake(f"sparse_attn::{_TRITON_BACKWARD}", _fake_backward)
    torch.library.register_autograd(f"sparse_attn::{_TRITON_FORWARD}", _backward_with(_triton_backward),
                                    setup_context=_setup_context)
