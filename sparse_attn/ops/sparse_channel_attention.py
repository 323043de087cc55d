"""Top-k channel attention: contract, backend dispatch, autograd (DESIGN.md §1).

    q̂ = q / max(‖q‖, 1e-12), k̂ likewise (over N);   S = τ_h q̂k̂ᵀ
    P = Σ_r weights[r] · φ_r(S)  with φ_r a softmax (or relu²) over the topk[r] largest of each row
    out = P v

DRSformer's TKSA is four softmax branches with topk = (d/2, 2d/3, 3d/4, 4d/5); Restormer's MDTA
is one dense branch (topk = (d,), weights = [1]).
"""
import numbers

import torch

from ..encodings import ACTIVATION_CODES, ACTIVATION_NAMES
from ..reference import sparse_channel_attention as reference_attention
from . import _library

try:
    from ..kernels import sparse_channel_attention as triton_launchers
except ImportError:  # no Triton here: the backend says so when asked for
    triton_launchers = None


# ---------------------------------------------------------------------------------------------
# Contract
# ---------------------------------------------------------------------------------------------
def _check_arguments(q, k, v, temperature, weights, topk, activation="softmax"):
    """Validate the inputs; returns the kernel arguments: q, k, v, temperature as (heads,),
    weights as (R,), topk and the activation codes as lists of R entries."""
    for name, t in (("q", q), ("k", k), ("v", v), ("temperature", temperature)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a tensor, got {type(t).__name__}")
    if not isinstance(weights, torch.Tensor):
        weights = torch.as_tensor(weights, dtype=q.dtype, device=q.device)
    if q.dim() != 4:
        raise ValueError(f"q: expected shape (B, heads, d, N), got {tuple(q.shape)}")
    for name, t in (("k", k), ("v", v)):
        if t.shape != q.shape:
            raise ValueError(f"{name}: expected the shape of q {tuple(q.shape)}, got {tuple(t.shape)}")
    for name, t in (("q", q), ("k", k), ("v", v), ("temperature", temperature), ("weights", weights)):
        if not t.is_floating_point():
            raise TypeError(f"{name}: expected a floating-point tensor, got {t.dtype}")
        if t.dtype != q.dtype:
            raise TypeError(f"{name}: expected q's dtype {q.dtype}, got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name}: expected q's device {q.device}, got {t.device}")
    batch, heads, d, n = q.shape
    if batch == 0 or d == 0 or n == 0:
        raise ValueError(f"q: every dimension must be non-empty, got {tuple(q.shape)}")
    if temperature.numel() != heads:
        raise ValueError(f"temperature: expected {heads} values (one per head), got shape "
                         f"{tuple(temperature.shape)}")
    if isinstance(topk, numbers.Integral):
        topk = (topk,)
    topk = tuple(topk)
    for r, t in enumerate(topk):
        if isinstance(t, bool) or not isinstance(t, numbers.Integral):
            raise TypeError(f"topk[{r}]: expected an integer, got {type(t).__name__}")
        if not 1 <= t <= d:
            raise ValueError(f"topk[{r}] = {t} is outside 1..d = 1..{d}")
    if not 1 <= len(topk) <= 8:
        raise ValueError(f"topk: expected 1 to 8 branches, got {len(topk)}")
    if weights.numel() != len(topk):
        raise ValueError(f"weights: expected {len(topk)} values (one per topk branch), got "
                         f"shape {tuple(weights.shape)}")
    activation = (activation,) * len(topk) if isinstance(activation, str) else tuple(activation)
    if len(activation) != len(topk):
        raise ValueError(f"activation: expected one name or {len(topk)} (one per branch), got "
                         f"{len(activation)}")
    for r, a in enumerate(activation):
        if a not in ACTIVATION_CODES:
            raise ValueError(f"activation[{r}]: expected one of {tuple(ACTIVATION_CODES)}, got {a!r}")
    # The kernels' arguments: contiguous parameters, plain lists of ints.
    return (q, k, v, temperature.reshape(heads).contiguous(), weights.reshape(len(topk)).contiguous(),
            [int(t) for t in topk], [ACTIVATION_CODES[a] for a in activation])


def _reference(q, k, v, temperature, weights, topk, activation_codes):
    return reference_attention(q, k, v, temperature, weights, topk, [ACTIVATION_NAMES[c] for c in activation_codes])




# ---------------------------------------------------------------------------------------------
# Autograd: the native and Triton ops share the contract (outputs: out and, for backward, the
# normalised Gram matrix and the channel norms in the accumulation dtype), so they share these.
# ---------------------------------------------------------------------------------------------
def _fake_forward(q, k, v, temperature, weights, topk, activation):
    batch, heads, d, _ = q.shape
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            q.new_empty((batch, heads, d, d), dtype=acc),
            q.new_empty((batch, heads, d), dtype=acc),
            q.new_empty((batch, heads, d), dtype=acc))


def _fake_backward(grad_out, q, k, v, temperature, weights, gram, q_norm, k_norm, topk, activation):
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v, temperature, weights))


def _setup_context(ctx, inputs, output):
    q, k, v, temperature, weights, topk, activation = inputs
    _, gram, q_norm, k_norm = output
    ctx.save_for_backward(q, k, v, temperature, weights, gram, q_norm, k_norm)
    ctx.topk, ctx.activation = topk, activation
    ctx.mark_non_differentiable(gram, q_norm, k_norm)


def _backward(ctx, backward_op, grad_out, _grad_gram, _grad_q_norm, _grad_k_norm):
    q, k, v, temperature, weights, gram, q_norm, k_norm = ctx.saved_tensors
    grads = backward_op(grad_out, q, k, v, temperature, weights, gram, q_norm, k_norm, ctx.topk, ctx.activation)
    return (*grads, None, None)


# ---------------------------------------------------------------------------------------------
# Backends
# ---------------------------------------------------------------------------------------------
def _triton_limits(q, *_):
    d = q.shape[2]
    if d > triton_launchers.MAX_D:
        return f"its kernels take at most {triton_launchers.MAX_D} channels per head, got d = {d}"
    return None


_OP = _library.plug(_library.OpTable(
    name="sparse_channel_attention",
    arguments=_check_arguments,
    reference=_reference,
    result=_library.first_output,
    fake_forward=_fake_forward,
    fake_backward=_fake_backward,
    setup_context=_setup_context,
    backward=_backward,
    native=_library.Kernels(
        forward="sparse_channel_attention_forward", backward="sparse_channel_attention_backward",
        dtypes={"cpu": (torch.float32, torch.float64), "cuda": (torch.float32, torch.float16, torch.bfloat16, torch.float64)}),
    triton=_library.Kernels(
        forward="sparse_channel_attention_triton_forward", backward="sparse_channel_attention_triton_backward",
        dtypes=_library.TRITON_DTYPES,
        limits=_triton_limits, launchers=triton_launchers),
))


def sparse_channel_attention(q, k, v, temperature, weights, topk, activation="softmax", backend="auto"):
    """Channel-wise top-k sparse attention of DRSformer (and, with ``topk=(d,)``, dense MDTA).

    Args:
        q, k, v: (B, heads, d, N) tensors of one floating dtype and device; N = H·W.
        temperature: per-head scale, (heads,) or (heads, 1, 1).
        weights: (R,) branch weights (DRSformer's attn1..attn4, concatenated).
        topk: R integers in 1..d, entries kept per row by each branch; ties in a row keep the
            lower column index.
        activation: "softmax" or "relu2", or a tuple with one per branch.
        backend: "auto", "reference", "native" or "triton" (see ``sparse_attn.backends``).

    Returns:
        out: (B, heads, d, N), of q's dtype.
    """
    return _OP(backend, q, k, v, temperature, weights, topk, activation)
