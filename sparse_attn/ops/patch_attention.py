"""Patch attention, PANet's pyramid attention core: contract, backend dispatch, autograd (DESIGN.md §3).

    K̂_m = K_m / max(‖K_m‖, key_eps)        3×3 patches (zero padding 1) of every level's key map
    s_pm = scale · ⟨Q_p, K̂_m⟩               Q_p: the 3×3 patch of q centred on pixel p
    A_p = softmax_m(s_p·)                    (with topk = t: over the t largest, ties to the lower m)
    out = fold(Σ_m A_pm V_m)                 every attended value patch pasted back centred on p

The kernels stream key tiles and never hold the N×M scores: they save q, keys, values, the key
inverse norms (B, M) and each query's log-sum-exp (B, N), and with topk each query's t-th
largest score and the last key index kept at that score (the tie rule, replayed exactly).
"""
import math
import numbers

import torch

from ..reference import patch_attention as reference_patch_attention
from . import _library

try:
    from ..kernels import patch_attention as triton_launchers
except ImportError:  # no Triton here: the backend says so when asked for
    triton_launchers = None


# ---------------------------------------------------------------------------------------------
# Contract
# ---------------------------------------------------------------------------------------------
def _check_level_maps(name, maps, q):
    if isinstance(maps, torch.Tensor) or not isinstance(maps, (list, tuple)):
        raise TypeError(f"{name}: expected a list or tuple of (B, C, H_l, W_l) tensors, got {type(maps).__name__}")
    if len(maps) == 0:
        raise ValueError(f"{name}: expected at least one level, got none")
    for level, t in enumerate(maps):
        where = f"{name}[{level}]"
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{where}: expected a tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{where}: expected shape (B, C, H_l, W_l), got {tuple(t.shape)}")
        if any(s == 0 for s in t.shape):
            raise ValueError(f"{where}: every dimension must be non-empty, got {tuple(t.shape)}")
        if t.shape[0] != q.shape[0]:
            raise ValueError(f"{where}: expected q's batch size {q.shape[0]}, got {t.shape[0]}")
        if t.dtype != q.dtype:
            raise TypeError(f"{where}: expected q's dtype {q.dtype}, got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{where}: expected q's device {q.device}, got {t.device}")


def _check_arguments(q, keys, values, scale=10.0, topk=None, key_eps=1e-4):
    """Validate the inputs; returns the kernel arguments: q, the key and value maps as lists,
    scale and key_eps as floats, topk as an int (0: every key, also for topk = M)."""
    if not isinstance(q, torch.Tensor):
        raise TypeError(f"q: expected a tensor, got {type(q).__name__}")
    if q.dim() != 4:
        raise ValueError(f"q: expected shape (B, Cq, H, W), got {tuple(q.shape)}")
    if any(s == 0 for s in q.shape):
        raise ValueError(f"q: every dimension must be non-empty, got {tuple(q.shape)}")
    if not q.is_floating_point():
        raise TypeError(f"q: expected a floating-point tensor, got {q.dtype}")
    _check_level_maps("keys", keys, q)
    _check_level_maps("values", values, q)
    if len(keys) != len(values):
        raise ValueError(f"values: expected one map per level of keys ({len(keys)} levels), got {len(values)}")
    for level, (k, v) in enumerate(zip(keys, values)):
        if k.shape[1] != q.shape[1]:
            raise ValueError(f"keys[{level}]: expected q's {q.shape[1]} channels, got {k.shape[1]}")
        if v.shape[1] != values[0].shape[1]:
            raise ValueError(f"values[{level}]: expected the {values[0].shape[1]} channels of values[0], "
                             f"got {v.shape[1]}")
        if v.shape[2:] != k.shape[2:]:
            raise ValueError(f"values[{level}]: expected the size of keys[{level}] {tuple(k.shape[2:])}, "
                             f"got {tuple(v.shape[2:])}")
    # Chained comparisons, not math.isfinite (torch.compile traces them; NaN fails them).
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not -math.inf < scale < math.inf:
        raise ValueError(f"scale: expected a finite number, got {scale!r}")
    if isinstance(key_eps, bool) or not isinstance(key_eps, numbers.Real) or not 0 < key_eps < math.inf:
        raise ValueError(f"key_eps: expected a finite number > 0, got {key_eps!r}")
    n_keys = sum(k.shape[2] * k.shape[3] for k in keys)
    if topk is not None:
        if isinstance(topk, bool) or not isinstance(topk, numbers.Integral):
            raise TypeError(f"topk: expected None or an integer, got {type(topk).__name__}")
        if not 1 <= topk <= n_keys:
            raise ValueError(f"topk = {topk} is outside 1..M = 1..{n_keys} (M: key positions over every level)")
    # Keeping all M keys is the dense softmax: the kernels take it as such (0), with no top-k.
    topk = 0 if topk is None or topk == n_keys else int(topk)
    return q, list(keys), list(values), float(scale), topk, float(key_eps)


def _reference(q, keys, values, scale, topk, key_eps):
    return reference_patch_attention(q, keys, values, scale, topk or None, key_eps)


# ---------------------------------------------------------------------------------------------
# Autograd: the native and Triton ops share the contract (outputs: out and, for backward, the
# key inverse norms, each query's log-sum-exp and its top-k threshold and last tied key kept).
# ---------------------------------------------------------------------------------------------
def _accumulation_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _fake_forward(q, keys, values, scale, topk, key_eps):
    batch, _, height, width = q.shape
    n_keys = sum(k.shape[2] * k.shape[3] for k in keys)
    acc = _accumulation_dtype(q.dtype)
    return (q.new_empty((batch, values[0].shape[1], height, width)),
            q.new_empty((batch, n_keys), dtype=acc),
            q.new_empty((batch, height * width), dtype=torch.float64),  # lse: double for every dtype
            q.new_empty((batch, height * width), dtype=acc),
            q.new_empty((batch, height * width), dtype=torch.int64))


def _fake_backward(grad_out, q, keys, values, key_inv_norm, lse, threshold, last_kept, scale, topk, key_eps):
    like = lambda t: torch.empty_like(t, memory_format=torch.contiguous_format)  # noqa: E731
    return like(q), [like(k) for k in keys], [like(v) for v in values]


def _setup_context(ctx, inputs, output):
    q, keys, values, scale, topk, key_eps = inputs
    _, key_inv_norm, lse, threshold, last_kept = output
    ctx.save_for_backward(q, *keys, *values, key_inv_norm, lse, threshold, last_kept)
    ctx.levels, ctx.scale, ctx.topk, ctx.key_eps = len(keys), scale, topk, key_eps
    ctx.mark_non_differentiable(key_inv_norm, lse, threshold, last_kept)


def _backward(ctx, backward_op, grad_out, *_grads_of_saved):
    saved = ctx.saved_tensors
    levels = ctx.levels
    q, keys, values = saved[0], list(saved[1:1 + levels]), list(saved[1 + levels:1 + 2 * levels])
    key_inv_norm, lse, threshold, last_kept = saved[1 + 2 * levels:]
    grad_q, grad_keys, grad_values = backward_op(grad_out.contiguous(), q, keys, values, key_inv_norm, lse,
                                                 threshold, last_kept, ctx.scale, ctx.topk, ctx.key_eps)
    return grad_q, list(grad_keys), list(grad_values), None, None, None


# ---------------------------------------------------------------------------------------------
# Backends
# ---------------------------------------------------------------------------------------------
def _native_limits(q, keys, values, scale, topk, key_eps):
    """The CUDA kernels' bounds (csrc/cuda/patch_attention.cu checks the same): each query's top t
    kept in a heap of 64 in local memory, the level table (16) a kernel argument. Their loops
    stride over the grid, so no size is beyond the grid."""
    if q.device.type != "cuda":
        return None
    if topk > 64:
        return f"its CUDA kernels keep at most 64 keys per query (a heap per query), got topk = {topk}"
    if len(keys) > 16:
        return f"its CUDA kernels take at most 16 levels, got {len(keys)}"
    return None


def _triton_limits(q, keys, values, scale, topk, key_eps):
    """The kernels keep a query's best keys in a row of BLOCK_M rank slots; the batch and the
    channels are grid dimensions."""
    if topk > triton_launchers.MAX_TOPK:
        return f"its kernels keep at most {triton_launchers.MAX_TOPK} keys per query (topk), got topk = {topk}"
    if q.shape[0] >= 65536 or max(q.shape[1], values[0].shape[1]) >= 65536:
        return f"its kernels take B and channel counts below 65536, got {tuple(q.shape)}"
    return None


_OP = _library.plug(_library.OpTable(
    name="patch_attention",
    arguments=_check_arguments,
    reference=_reference,
    result=_library.first_output,
    fake_forward=_fake_forward,
    fake_backward=_fake_backward,
    setup_context=_setup_context,
    backward=_backward,
    native=_library.Kernels(
        forward="patch_attention_forward", backward="patch_attention_backward",
        dtypes={"cpu": (torch.float32, torch.float64), "cuda": (torch.float32, torch.float64)},
        limits=_native_limits),
    triton=_library.Kernels(
        forward="patch_attention_triton_forward", backward="patch_attention_triton_backward",
        dtypes=_library.TRITON_DTYPES, limits=_triton_limits, launchers=triton_launchers),
))


def patch_attention(q, keys, values, scale=10.0, topk=None, key_eps=1e-4, backend="auto"):
    """Softmax attention between 3×3 patches (PANet's pyramid attention core), without the
    N×M score map.

    Args:
        q: (B, Cq, H, W) queries.
        keys: L maps ``(B, Cq, H_l, W_l)`` (e.g. one per pyramid level); their 3×3 patches at
            every position of every level (level order, then row-major) are the M keys.
        values: L maps ``(B, Cv, H_l, W_l)``, the same sizes as ``keys``.
        scale: multiplies the scores (PANet's ``softmax_scale``).
        topk: None (every key) or t in 1..M: each query's softmax over its t largest scores
            only; among equal scores the lower key index is kept.
        key_eps: a key patch is divided by max(‖K_m‖, key_eps) (PANet's ``escape_NaN``).
        backend: "auto", "reference", "native" or "triton" (see ``sparse_attn.backends``).

    Returns:
        (B, Cv, H, W) of q's dtype: every query's attended 3×3 value patch pasted back centred on
        its pixel, overlaps summed (PANet divides this by 4).
    """
    return _OP(backend, q, keys, values, scale, topk, key_eps)
