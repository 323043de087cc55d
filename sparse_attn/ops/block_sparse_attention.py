"""Block-sparse region attention: contract, backend dispatch, autograd (DESIGN.md §4).

    regions: the p_h × p_w tiles of the image, row-major (R = HW / (p_h·p_w))
    for a query pixel i of region r:  J(i) = the pixels of the regions key_blocks[b, h, r, :]
    s_ij = scale·⟨q_i, k_j⟩;  out_i = Σ_{j ∈ J(i)} softmax_j(s_ij) v_j

The fine stage of region-selection attention (sparse_attn.nn.RegionSelectionAttention): a router
chooses, for every query region, the t key regions it reads; no N × N map is ever formed. The
kernels save q, k, v, out, the per-pixel log-sum-exp and key_blocks for backward, and scatter
dK, dV to the key regions through the inverse index (key region -> query regions reading it), so
every result is deterministic.
"""
import math
import numbers

import torch

from ..reference import block_sparse_attention as reference_block_sparse_attention
from . import _library

try:
    from ..kernels import block_sparse_attention as triton_launchers
except ImportError:  # no Triton here: the backend says so when asked for
    triton_launchers = None


# ---------------------------------------------------------------------------------------------
# Contract
# ---------------------------------------------------------------------------------------------
def _region_size(region):
    """(p_h, p_w) from an int or a pair of positive ints."""
    pair = (region, region) if isinstance(region, numbers.Integral) else tuple(region) if isinstance(
        region, (tuple, list)) else None
    if pair is None or len(pair) != 2 or any(isinstance(p, bool) or not isinstance(p, numbers.Integral) or p < 1
                                             for p in pair):
        raise ValueError(f"region: expected a positive int or a pair (p_h, p_w) of them, got {region!r}")
    return int(pair[0]), int(pair[1])


def _check_values(q, k, v, key_blocks, regions):
    """The checks that read the tensors' values: finite q, k, v; indices in range and distinct
    within a row. Eager calls only (torch.compile cannot branch on values)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not torch.isfinite(t).all():
            raise ValueError(f"{name}: contains non-finite values (inf or nan)")
    low, high = key_blocks.min().item(), key_blocks.max().item()
    if low < 0 or high >= regions:
        bad = low if low < 0 else high
        raise ValueError(f"key_blocks: indices must lie in 0..R-1 = 0..{regions - 1} (R regions), got {bad}")
    ordered = key_blocks.sort(dim=-1).values
    repeated = (ordered[..., 1:] == ordered[..., :-1]).any(dim=-1)
    if repeated.any():
        b, h, r = (i.item() for i in repeated.nonzero()[0])
        raise ValueError(f"key_blocks: the key regions of a query region must be distinct; row "
                         f"[{b}, {h}, {r}] repeats one: {key_blocks[b, h, r].tolist()}")


def _check_arguments(q, k, v, key_blocks, region=(8, 8), scale=None):
    """Validate the public arguments; returns the kernels' arguments: q, k, v, key_blocks as
    contiguous int64, region_h, region_w and scale as a float."""
    for name, t in (("q", q), ("k", k), ("v", v), ("key_blocks", key_blocks)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a tensor, got {type(t).__name__}")
    if q.dim() != 5:
        raise ValueError(f"q: expected shape (B, heads, d, H, W), got {tuple(q.shape)}")
    if any(s == 0 for s in q.shape):
        raise ValueError(f"q: every dimension must be non-empty, got {tuple(q.shape)}")
    for name, t in (("k", k), ("v", v)):
        if t.shape != q.shape:
            raise ValueError(f"{name}: expected the shape of q {tuple(q.shape)}, got {tuple(t.shape)}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not t.is_floating_point():
            raise TypeError(f"{name}: expected a floating-point tensor, got {t.dtype}")
        if t.dtype != q.dtype:
            raise TypeError(f"{name}: expected q's dtype {q.dtype}, got {t.dtype}")
    for name, t in (("k", k), ("v", v), ("key_blocks", key_blocks)):
        if t.device != q.device:
            raise ValueError(f"{name}: expected q's device {q.device}, got {t.device}")
    region_h, region_w = _region_size(region)
    batch, heads, d, height, width = q.shape
    if height % region_h or width % region_w:
        raise ValueError(f"q: H x W = {height} x {width} must be multiples of the region {region_h} x {region_w} "
                         "(pad the image; sparse_attn.nn.RegionSelectionAttention does)")
    regions = (height // region_h) * (width // region_w)
    if key_blocks.dtype in (torch.bool,) or key_blocks.is_floating_point() or key_blocks.is_complex():
        raise TypeError(f"key_blocks: expected an integer tensor, got {key_blocks.dtype}")
    if key_blocks.dim() != 4 or tuple(key_blocks.shape[:3]) != (batch, heads, regions):
        raise ValueError(f"key_blocks: expected shape (B, heads, R, t) = ({batch}, {heads}, {regions}, t) for "
                         f"{height} x {width} images in {region_h} x {region_w} regions, got {tuple(key_blocks.shape)}")
    if not 1 <= key_blocks.shape[3] <= regions:
        raise ValueError(f"key_blocks: expected 1 <= t <= R = {regions} key regions per query region, "
                         f"got t = {key_blocks.shape[3]}")
    if scale is None:
        scale = d ** -0.5
    # (a chained comparison, not math.isfinite, which torch.compile cannot trace; NaN fails it)
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not -math.inf < scale < math.inf:
        raise ValueError(f"scale: expected a finite number or None (d^-1/2), got {scale!r}")
    if not torch.compiler.is_compiling():
        _check_values(q, k, v, key_blocks, regions)
    return q, k, v, key_blocks.to(torch.int64).contiguous(), region_h, region_w, float(scale)


# ---------------------------------------------------------------------------------------------
# Autograd and fake (meta) implementations: the native op and the Triton op share the contract
# (out and the per-pixel log-sum-exp of the scores, in the accumulation dtype), so they share
# the autograd formula.
# ---------------------------------------------------------------------------------------------
def _accumulation_dtype(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _fake_forward(q, k, v, key_blocks, region_h, region_w, scale):
    batch, heads, _, height, width = q.shape
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            q.new_empty((batch, heads, height, width), dtype=_accumulation_dtype(q)))


def _fake_backward(grad_out, q, k, v, out, lse, key_blocks, region_h, region_w, scale):
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v))


def _setup_context(ctx, inputs, output):
    q, k, v, key_blocks, region_h, region_w, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, key_blocks)
    ctx.region, ctx.scale = (region_h, region_w), scale
    ctx.mark_non_differentiable(lse)


def _backward(ctx, backward_op, grad_out, _grad_lse):
    q, k, v, out, lse, key_blocks = ctx.saved_tensors
    grad_q, grad_k, grad_v = backward_op(grad_out, q, k, v, out, lse, key_blocks, *ctx.region, ctx.scale)
    return grad_q, grad_k, grad_v, None, None, None, None


# ---------------------------------------------------------------------------------------------
# Backends
# ---------------------------------------------------------------------------------------------
def _native_limits(q, k, v, key_blocks, region_h, region_w, scale):
    """The CUDA kernels: one thread per pixel of a region, each holding up to 64 channels, and a
    region's staged tiles in 48 KB of shared memory; B·heads in the grid's second dimension."""
    if q.device.type != "cuda":
        return None
    batch, heads, d, _, _ = q.shape
    pixels = region_h * region_w
    element = 8 if q.dtype == torch.float64 else 4
    if d > 64:
        return f"its CUDA kernels take at most 64 channels per head, got d = {d}"
    if pixels > 1024:
        return f"its CUDA kernels take regions of at most 1024 pixels (threads), got {region_h} x {region_w}"
    if (2 * pixels * d + 2 * pixels) * element > 48 * 1024:
        return f"its CUDA kernels stage a region in 48 KB of shared memory: {region_h} x {region_w} pixels x {d} channels do not fit"
    if batch * heads >= 65536:
        return f"its CUDA kernels take B * heads below 65536, got {batch * heads}"
    return None


def _triton_limits(q, k, v, key_blocks, region_h, region_w, scale):
    d, pixels = q.shape[2], region_h * region_w
    if d > triton_launchers.MAX_D:
        return f"its kernels take at most {triton_launchers.MAX_D} channels per head, got d = {d}"
    if pixels > triton_launchers.MAX_PIXELS:
        return (f"its kernels take regions of at most {triton_launchers.MAX_PIXELS} pixels, "
                f"got {region_h} x {region_w}")
    return None


_OP = _library.plug(_library.OpTable(
    name="block_sparse_attention",
    arguments=_check_arguments,
    reference=reference_block_sparse_attention,
    result=_library.first_output,
    fake_forward=_fake_forward,
    fake_backward=_fake_backward,
    setup_context=_setup_context,
    backward=_backward,
    native=_library.Kernels(
        forward="block_sparse_attention_forward", backward="block_sparse_attention_backward",
        dtypes={"cpu": (torch.float32, torch.float64),
                "cuda": (torch.float32, torch.float16, torch.bfloat16, torch.float64)},
        limits=_native_limits),
    triton=_library.Kernels(
        forward="block_sparse_attention_triton_forward", backward="block_sparse_attention_triton_backward",
        dtypes=_library.TRITON_DTYPES,
        limits=_triton_limits, launchers=triton_launchers),
))


def block_sparse_attention(q, k, v, key_blocks, region=(8, 8), scale=None, backend="auto"):
    """Attention restricted to selected key regions (the fine stage of region-selection
    attention, DESIGN.md §4): every p_h × p_w query region attends to the pixels of its t key
    regions only, with no N × N score map.

    Args:
        q, k, v: (B, heads, d, H, W) tensors of one floating dtype and device; H and W multiples
            of the region size.
        key_blocks: (B, heads, R, t) integer tensor: for every query region (the p_h × p_w tiles
            in row-major order, R = HW / (p_h·p_w)), the t distinct key regions it reads
            (1 <= t <= R; t = R is dense attention). Carries no gradient.
        region: (p_h, p_w), or one int for square regions.
        scale: the scores' factor; None for d^-1/2.
        backend: "auto", "reference", "native" or "triton" (see ``sparse_attn.backends``).

    Returns:
        (B, heads, d, H, W) of q's dtype: ``out_i = Σ_j softmax_j(scale·⟨q_i, k_j⟩) v_j`` over the
        pixels j of the key regions of i's region.

    Raises:
        TypeError, ValueError naming the argument: shapes, dtypes, devices, a region that does not
        divide H x W, non-finite q, k, v or scale, indices out of 0..R-1 or repeated within a row
        (the value checks run in eager mode; a compiled graph skips them).
    """
    return _OP(backend, q, k, v, key_blocks, region, scale)
