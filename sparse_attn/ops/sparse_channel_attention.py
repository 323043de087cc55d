"""Top-k channel attention: contract, backend dispatch, autograd (DESIGN.md §1).

    q̂ = q / max(‖q‖, 1e-12), k̂ likewise (over N);   S = τ_h q̂k̂ᵀ
    P = Σ_r weights[r] · φ_r(S)  with φ_r a softmax (or relu²) over the topk[r] largest of each row
    out = P v

DRSformer's TKSA is four softmax branches with topk = (d/2, 2d/3, 3d/4, 4d/5); Restormer's MDTA
is one dense branch (topk = (d,), weights = [1]).
"""
import numbers

import torch

from .. import backends
from ..reference import sparse_channel_attention as reference_attention

try:
    from ..kernels import sparse_channel_attention as triton_kernels
except ImportError:  # no Triton here: backends.why_unavailable says so when "triton" is asked for
    triton_kernels = None

ACTIVATION_CODES = {"softmax": 0, "relu2": 1}  # as in the schema in csrc/ops.cpp
_NATIVE_OP = "sparse_channel_attention_forward"
_TRITON_FORWARD = "sparse_channel_attention_triton_forward"
_TRITON_BACKWARD = "sparse_channel_attention_triton_backward"
_HALF_AND_SINGLE = (torch.float32, torch.float16, torch.bfloat16)
_DTYPES = {
    "native": {"cpu": (torch.float32, torch.float64), "cuda": _HALF_AND_SINGLE + (torch.float64,)},
    # On CPU tensors Triton is its interpreter, whose bf16 products are wrong (numpy has no bf16).
    "triton": {"cpu": (torch.float32, torch.float16), "cuda": _HALF_AND_SINGLE},
}


# ---------------------------------------------------------------------------------------------
# Contract
# ---------------------------------------------------------------------------------------------
def _check_arguments(q, k, v, temperature, weights, topk, activation):
    """Validate the inputs; returns temperature as (heads,), weights as (R,), topk and
    activation as tuples of R entries."""
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
            raise ValueError(f"activation[{r}]: expected 'softmax' or 'relu2', got {a!r}")
    return temperature.reshape(heads), weights.reshape(len(topk)), tuple(int(t) for t in topk), activation


# ---------------------------------------------------------------------------------------------
# Dispatch
# ---------------------------------------------------------------------------------------------
def _triton_ready(d):
    if triton_kernels is None:
        return False
    if d > triton_kernels.MAX_D:
        return f"its kernels take at most {triton_kernels.MAX_D} channels per head, got d = {d}"
    return True


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
    temperature, weights, topk, activation = _check_arguments(q, k, v, temperature, weights, topk, activation)
    name = backends.resolve(backend, q, op=_NATIVE_OP, dtypes=_DTYPES, triton_ready=_triton_ready(q.shape[2]))
    if name == "reference":
        return reference_attention(q, k, v, temperature, weights, topk, activation)
    codes = [ACTIVATION_CODES[a] for a in activation]
    forward_op = getattr(torch.ops.sparse_attn, _NATIVE_OP if name == "native" else _TRITON_FORWARD)
    return forward_op(q, k, v, temperature.contiguous(), weights.contiguous(), list(topk), codes)[0]


# ---------------------------------------------------------------------------------------------
# Autograd and fake (meta) implementations: the native op and the Triton op share the contract
# (same outputs; gram and norms saved for backward), so they share the autograd formula.
# ---------------------------------------------------------------------------------------------
def _accumulation_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _fake_forward(q, k, v, temperature, weights, topk, activation):
    batch, heads, d, _ = q.shape
    acc = _accumulation_dtype(q.dtype)
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            q.new_empty((batch, heads, d, d), dtype=acc),
            q.new_empty((batch, heads, d), dtype=acc),
            q.new_empty((batch, heads, d), dtype=acc))


def _fake_backward(grad_out, q, k, v, temperature, weights, gram, q_norm, k_norm, topk, activation):
    contiguous = torch.contiguous_format
    return (torch.empty_like(q, memory_format=contiguous), torch.empty_like(k, memory_format=contiguous),
            torch.empty_like(v, memory_format=contiguous), torch.empty_like(temperature),
            torch.empty_like(weights))


def _setup_context(ctx, inputs, output):
    q, k, v, temperature, weights, topk, activation = inputs
    _, gram, q_norm, k_norm = output
    ctx.save_for_backward(q, k, v, temperature, weights, gram, q_norm, k_norm)
    ctx.topk, ctx.activation = topk, activation
    ctx.mark_non_differentiable(gram, q_norm, k_norm)


def _backward_with(backward_op):
    """The autograd formula of a forward op whose backward is ``backward_op``."""
    def backward(ctx, grad_out, _grad_gram, _grad_q_norm, _grad_k_norm):
        q, k, v, temperature, weights, gram, q_norm, k_norm = ctx.saved_tensors
        grads = backward_op(grad_out, q, k, v, temperature, weights, gram, q_norm, k_norm,
                            ctx.topk, ctx.activation)
        return (*grads, None, None)
    return backward


if backends.why_unavailable("native", "cpu") is None:
    torch.library.register_fake(f"sparse_attn::{_NATIVE_OP}", _fake_forward)
    torch.library.register_fake("sparse_attn::sparse_channel_attention_backward", _fake_backward)
    torch.library.register_autograd(f"sparse_attn::{_NATIVE_OP}",
                                    _backward_with(torch.ops.sparse_attn.sparse_channel_attention_backward),
                                    setup_context=_setup_context)

if triton_kernels is not None:
    # triton_op derives the fake implementations by running these functions on fake tensors,
    # and lets torch.compile see the kernels the launchers start through wrap_triton.
    @torch.library.triton_op(f"sparse_attn::{_TRITON_FORWARD}", mutates_args=())
    def _triton_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, temperature: torch.Tensor,
                        weights: torch.Tensor, topk: list[int], activation: list[int]
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return triton_kernels.forward(q, k, v, temperature, weights, topk, activation)

    @torch.library.triton_op(f"sparse_attn::{_TRITON_BACKWARD}", mutates_args=())
    def _triton_backward(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         temperature: torch.Tensor, weights: torch.Tensor, gram: torch.Tensor,
                         q_norm: torch.Tensor, k_norm: torch.Tensor, topk: list[int], activation: list[int]
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return triton_kernels.backward(grad_out, q, k, v, temperature, weights, gram, q_norm, k_norm,
                                       topk, activation)

    torch.library.register_autograd(f"sparse_attn::{_TRITON_FORWARD}", _backward_with(_triton_backward),
                                    setup_context=_setup_context)
