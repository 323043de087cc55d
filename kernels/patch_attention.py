"""Triton kernels of patch attention, PANet's pyramid attention core (DESIGN.md §3), and their
launchers.

    s_pm = scale · r_m · ⟨Q_p, K_m⟩      Q_p, K_m: 3×3 patches (zero padding 1); r_m = 1/max(‖K_m‖, key_eps)
    A_p = softmax_m(s_p·)                 (topk = t: over the t best, ties to the lower m)
    out = fold(Σ_m A_pm V_m)

Every map enters as a flat (B, C, plane) array: q's plane is its N pixels; the levels of keys and
values are concatenated, level after level, into M key positions, and a small table gives each
level's first position, rows and columns. A program takes a tile of BLOCK_N query pixels (or
BLOCK_M key positions of one level) and gathers its 3×3 patches straight from the maps: a patch
tile is (pixels, 16·C_BLOCK), column δ·C_BLOCK + c holding channel c of the neighbour δ
(δ = 3·(dy+1) + (dx+1); the slots δ = 9..15 are zero: Triton's tiles are powers of two), so that a
score tile is one product per channel block and an attended value patch one more. This does the
unfold's arithmetic (9·(Cq + Cv) per query-key pair, and the padding) rather than the CPU
kernels' pixel-level one: those need shifted adds of register tiles, which Triton does not
express. What it keeps is the point of the op: nothing of size N×M is ever stored.

  statistics  per query tile, streaming every key tile: the log-sum-exp of the scores (the sum in
              float64), or with topk the t best keys, kept as (score, key) ranks in a row of
              BLOCK_M slots where each key tile's better ranks replace the worst one by one;
              the worst kept is the threshold and the last key kept at it (the tie rule).
  attend      per (query tile, value channel block): O_p = Σ_m A_pm V_m with A = exp(s − lse),
              into a patch buffer (B, 9, Cv, N), then `fold` pastes the patches back.
  backward    D_p = Σ_m A_pm dP_pm (dP = ⟨unfold(dout)_p, V_m⟩) per query tile; dQ per (query
              tile, channel block); dV and dK per (key tile, channel block), each streaming the
              other side; patches folded back; the normalisation's gradient in the launcher.

Every element is written by one program, sums in a fixed order: no atomics, the same bits on
every run. The scores are computed by one function on one tiling everywhere, so the backward
replays the forward's top-k choice exactly. Inputs fp32, fp16 or bf16; products accumulate in
fp32 (input_precision="ieee" for fp32, so that the interpreter and a GPU compute the same thing).
`launch_configurations()` lists every (kernel, signature, constexprs, options) the launchers use.
"""
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._launch import aot_signature, launch

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_TRITON_TYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
BLOCK_N = 32    # query pixels per tile
BLOCK_M = 64    # key positions per tile; also the most keys topk may keep (a row of rank slots)
C_BLOCK = 8     # channels per patch tile: (pixels, 16 · C_BLOCK); 16 needs 192 KB of shared memory
MAX_TOPK = BLOCK_M
_NUM_WARPS = 4  # (chosen, not tuned: no GPU was at hand to time it)


# ---------------------------------------------------------------------------------------------
# Tiles
# ---------------------------------------------------------------------------------------------
@triton.jit
def _patch_tile(base, pixels, pixel_ok, rows, cols, first, plane, c0, channels, C_BLOCK: tl.constexpr):
    """(BLOCK, 16·C_BLOCK) tile: column δ·C_BLOCK + c holds channel c0 + c of the neighbour
    (y + δ//3 − 1, x + δ%3 − 1) of each pixel (row-major index in a rows × cols map whose pixel
    (0, 0) is at `first` of a (C, plane) array); zero outside the map and for δ ≥ 9."""
    column = tl.arange(0, 16 * C_BLOCK)
    delta = column // C_BLOCK
    channel = c0 + column % C_BLOCK
    y = (pixels // cols)[:, None] + (delta // 3 - 1)[None, :]
    x = (pixels % cols)[:, None] + (delta % 3 - 1)[None, :]
    inside = pixel_ok[:, None] & (delta < 9)[None, :] & (channel < channels)[None, :] \
        & (y >= 0) & (y < rows) & (x >= 0) & (x < cols)
    offsets = channel[None, :].to(tl.int64) * plane + first + y * cols + x
    return tl.load(base + offsets, mask=inside, other=0.0)


@triton.jit
def _store_patches(base, tile, pixels, pixel_ok, channels, plane, c0, C_BLOCK: tl.constexpr):
    """Stores a (BLOCK, 16·C_BLOCK) patch tile into a (9, C, plane) patch buffer."""
    column = tl.arange(0, 16 * C_BLOCK)
    delta = column // C_BLOCK
    channel = c0 + column % C_BLOCK
    offsets = (delta[None, :] * channels + channel[None, :]).to(tl.int64) * plane + pixels[:, None]
    mask = pixel_ok[:, None] & (delta < 9)[None, :] & (channel < channels)[None, :]
    tl.store(base + offsets, tile, mask=mask)


@triton.jit
def _patch_products(a_base, b_base, queries, query_ok, height, width, keys, key_ok, rows, cols, first, n_keys,
                    channels, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, C_BLOCK: tl.constexpr,
                    DOT_PRECISION: tl.constexpr):
    """⟨a's patch at each query pixel, b's patch at each key position⟩: (BLOCK_N, BLOCK_M)."""
    dots = tl.zeros((BLOCK_N, BLOCK_M), tl.float32)
    for c0 in range(0, channels, C_BLOCK):
        a = _patch_tile(a_base, queries, query_ok, height, width, 0, height * width, c0, channels, C_BLOCK)
        b = _patch_tile(b_base, keys, key_ok, rows, cols, first, n_keys, c0, channels, C_BLOCK)
        dots = tl.dot(a, tl.trans(b), dots, input_precision=DOT_PRECISION)
    return dots


@triton.jit
def _scores(q_base, k_base, inv_norm_base, queries, query_ok, height, width, keys, key_ok, rows, cols, first,
            n_keys, cq, scale, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, C_BLOCK: tl.constexpr,
            DOT_PRECISION: tl.constexpr):
    """s[p, m] = scale · r_m · ⟨Q_p, K_m⟩ of a query tile against a key tile of one level; −∞ at
    key positions past the level, +0 for every zero (one order for the top-k ranks)."""
    dots = _patch_products(q_base, k_base, queries, query_ok, height, width, keys, key_ok, rows, cols, first, n_keys,
                           cq, BLOCK_N, BLOCK_M, C_BLOCK, DOT_PRECISION)
    inverse_norm = tl.load(inv_norm_base + first + keys, mask=key_ok, other=0.0)
    s = (scale * inverse_norm)[None, :] * dots
    s = tl.where(s == 0.0, 0.0, s)
    return tl.where(key_ok[None, :], s, float("-inf"))


@triton.jit
def _probabilities(s, key_index, lse, threshold, last_kept):
    """A = exp(s − lse) for the kept keys, 0 elsewhere: the top-t choice replayed from the
    query's threshold and last kept key (dense rows have −∞ and M − 1: every key is kept). The
    difference in float64, since lse reaches hundreds."""
    p = tl.exp((s.to(tl.float64) - lse[:, None]).to(tl.float32))
    kept = (s > threshold[:, None]) | ((s == threshold[:, None]) & (key_index[None, :] <= last_kept[:, None]))
    return tl.where(kept, p, 0.0)


@triton.jit
def _scores_probabilities_and_grads(q_base, k_base, v_base, g_base, inv_norm_base, queries, query_ok, height, width,
                                    keys, key_ok, rows, cols, first, n_keys, cq, cv, scale, lse, threshold,
                                    last_kept, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
                                    C_BLOCK: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """The backward's recomputation for a query tile against a key tile: the scores s, the
    attention A and dP = ⟨unfold(dout)_p, V_m⟩."""
    s = _scores(q_base, k_base, inv_norm_base, queries, query_ok, height, width, keys, key_ok, rows, cols, first,
                n_keys, cq, scale, BLOCK_N, BLOCK_M, C_BLOCK, DOT_PRECISION)
    p = _probabilities(s, first + keys, lse, threshold, last_kept)
    dp = _patch_products(g_base, v_base, queries, query_ok, height, width, keys, key_ok, rows, cols, first, n_keys,
                         cv, BLOCK_N, BLOCK_M, C_BLOCK, DOT_PRECISION)
    return s, p, dp


# A score and its key index as one int64 that orders as the top-k does: a higher score first,
# then the lower index. The score's bits are made monotone (negative floats flipped); the index
# goes in the low 32 bits, complemented.
@triton.jit
def _rank(s, key_index):
    bits = s.to(tl.int32, bitcast=True)
    ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    return (ordered.to(tl.int64) << 32) | (0x7FFFFFFF - key_index).to(tl.int64)


@triton.jit
def _unrank(rank):
    ordered = (rank >> 32).to(tl.int32)
    bits = ordered ^ ((ordered >> 31) & 0x7FFFFFFF)
    return bits.to(tl.float32, bitcast=True), (0x7FFFFFFF - (rank & 0x7FFFFFFF)).to(tl.int64)


@triton.jit
def _row_statistics(lse_ptr, threshold_ptr, last_kept_ptr, rows, row_ok):
    """What the statistics kernel saved for these query rows; past the map lse = +∞, so that
    those rows' probabilities are 0."""
    return (tl.load(lse_ptr + rows, mask=row_ok, other=float("inf")),
            tl.load(threshold_ptr + rows, mask=row_ok, other=0.0), tl.load(last_kept_ptr + rows, mask=row_ok, other=0))


@triton.jit
def _level(levels_ptr, level):
    """A level's first key position, rows and columns."""
    return tl.load(levels_ptr + 3 * level), tl.load(levels_ptr + 3 * level + 1), tl.load(levels_ptr + 3 * level + 2)


# ---------------------------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------------------------
@triton.jit
def patch_attention_statistics_kernel(q_ptr, k_ptr, inv_norm_ptr, levels_ptr, lse_ptr, threshold_ptr, last_kept_ptr,
                                      cq, height, width, n_keys, n_levels, topk, scale, BLOCK_N: tl.constexpr,
                                      BLOCK_M: tl.constexpr, C_BLOCK: tl.constexpr, DENSE: tl.constexpr,
                                      DOT_PRECISION: tl.constexpr):
    b = tl.program_id(1).to(tl.int64)
    n_queries = height * width
    queries = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    query_ok = queries < n_queries
    q_base, k_base, inv_norm_base = q_ptr + b * cq * n_queries, k_ptr + b * cq * n_keys, inv_norm_ptr + b * n_keys
    row_max = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    row_sum = tl.zeros((BLOCK_N,), tl.float64)  # M reaches tens of thousands of keys
    # Top-k: the t best ranks so far in slots 0..t-1 (the others hold a rank above any key, so
    # that the worst is the minimum), starting below any key.
    slot = tl.arange(0, BLOCK_M)[None, :]
    no_rank = _rank(tl.full((BLOCK_N, BLOCK_M), float("-inf"), tl.float32),
                    tl.full((BLOCK_N, BLOCK_M), 0x7FFFFFFF, tl.int32))
    unused = _rank(tl.full((BLOCK_N, BLOCK_M), float("inf"), tl.float32), tl.full((BLOCK_N, BLOCK_M), 0, tl.int32))
    best = tl.where(slot < topk, no_rank, unused)
    worst = tl.min(best, axis=1)
    for level in range(n_levels):
        first, rows, cols = _level(levels_ptr, level)
        for start in range(0, rows * cols, BLOCK_M):
            keys = start + tl.arange(0, BLOCK_M)
            key_ok = keys < rows * cols
            s = _scores(q_base, k_base, inv_norm_base, queries, query_ok, height, width, keys, key_ok, rows, cols,
                        first, n_keys, cq, scale, BLOCK_N, BLOCK_M, C_BLOCK, DOT_PRECISION)
            if DENSE:
                new_max = tl.maximum(row_max, tl.max(s, axis=1))
                tile_sum = tl.sum(tl.exp(s - new_max[:, None]), axis=1)
                row_sum = row_sum * tl.exp((row_max - new_max).to(tl.float64)) + tile_sum.to(tl.float64)
                row_max = new_max
            else:
                # While some row has a key in this tile better than its worst kept one: the row's
                # best such key replaces its worst (ranks are distinct: the key index is in them).
                candidates = tl.where(key_ok[None, :], _rank(s, (first + keys)[None, :]), no_rank)
                while tl.max(tl.sum((candidates > worst[:, None]).to(tl.int32), axis=1)) > 0:
                    top = tl.max(candidates, axis=1)
                    better = top > worst
                    replaced = better[:, None] & (slot == tl.argmin(best, axis=1)[:, None])
                    best = tl.where(replaced, top[:, None], best)
                    candidates = tl.where(better[:, None] & (candidates == top[:, None]), no_rank, candidates)
                    worst = tl.min(best, axis=1)
    if DENSE:
        threshold = tl.full((BLOCK_N,), float("-inf"), tl.float32)
        last_kept = tl.full((BLOCK_N,), 0, tl.int64) + n_keys - 1
    else:
        scores, _ = _unrank(best)
        kept = slot < topk
        row_max = tl.max(tl.where(kept, scores, float("-inf")), axis=1)
        row_sum = tl.sum(tl.where(kept, tl.exp(scores - row_max[:, None]), 0.0).to(tl.float64), axis=1)
        threshold, last_kept = _unrank(worst)  # the t-th best: the threshold, and the last key kept at it
    b_queries = b * n_queries + queries
    tl.store(lse_ptr + b_queries, row_max.to(tl.float64) + tl.log(row_sum), mask=query_ok)
    tl.store(threshold_ptr + b_queries, threshold, mask=query_ok)
    tl.store(last_kept_ptr + b_queries, last_kept, mask=query_ok)


@triton.jit
def patch_attention_attend_kernel(q_ptr, k_ptr, v_ptr, inv_norm_ptr, levels_ptr, lse_ptr, threshold_ptr,
                                  last_kept_ptr, patches_ptr, cq, cv, height, width, n_keys, n_levels, scale,
                                  BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, C_BLOCK: tl.constexpr,
                                  DOT_PRECISION: tl.constexpr):
    b = tl.program_id(2).to(tl.int64)
    c0 = tl.program_id(1) * C_BLOCK
    n_queries = height * width
    queries = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    query_ok = queries < n_queries
    q_base, k_base, inv_norm_base = q_ptr + b * cq * n_queries, k_ptr + b * cq * n_keys, inv_norm_ptr + b * n_keys
    v_base = v_ptr + b * cv * n_keys
    lse, threshold, last_kept = _row_statistics(lse_ptr, threshold_ptr, last_kept_ptr, b * n_queries + queries,
                                                 query_ok)
    acc = tl.zeros((BLOCK_N, 16 * C_BLOCK), tl.float32)
    for level in range(n_levels):
        first, rows, cols = _level(levels_ptr, level)
        for start in range(0, rows * cols, BLOCK_M):
            keys = start + tl.arange(0, BLOCK_M)
            key_ok = keys < rows * cols
            s = _scores(q_base, k_base, inv_norm_base, queries, query_ok, height, width, keys, key_ok, rows, cols,
                        first, n_keys, cq, scale, BLOCK_N, BLOCK_M, C_BLOCK, DOT_PRECISION)
            p = _probabilities(s, first + keys, lse, threshold, last_kept)
            value_patches = _patch_tile(v_base, keys, key_ok, rows, cols, first, n_keys, c0, cv, C_BLOCK)
            acc = tl.dot(p.to(value_patches.dtype), value_patches, acc, input_precision=DOT_PRECISION)
    _store_patches(patches_ptr + b * 9 * cv * n_queries, acc, queries, query_ok, cv, n_queries, c0, C_BLOCK)


@triton.jit
def patch_fold_kernel(patches_ptr, out_ptr, channels, rows, cols, first, plane, BLOCK: tl.constexpr):
    """out[c, x] = Σ_δ patches[δ, c, first + (x − δ)] for the rows × cols map whose patches start
    at `first` of a (B, 9, C, plane) patch buffer; out is (B, C, rows·cols)."""
    b = tl.program_id(2).to(tl.int64)
    c = tl.program_id(1)
    pixels = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    pixel_ok = pixels < rows * cols
    y, x = pixels // cols, pixels % cols
    base = patches_ptr + b * 9 * channels * plane
    total = tl.zeros((BLOCK,), tl.float32)
    for delta in tl.static_range(9):
        sy, sx = y - (delta // 3 - 1), x - (delta % 3 - 1)
        inside = pixel_ok & (sy >= 0) & (sy < rows) & (sx >= 0) & (sx < cols)
        total += tl.load(base + (delta * channels + c).to(tl.int64) * plane + first + sy * cols + sx, mask=inside,
                         other=0.0)
    tl.store(out_ptr + (b * channels + c) * rows * cols + pixels, total.to(out_ptr.dtype.element_ty), mask=pixel_ok)


# ---------------------------------------------------------------------------------------------
# Backward
# ---------------------------------------------------------------------------------------------
@triton.jit
def patch_attention_delta_kernel(q_ptr, k_ptr, v_ptr, grad_out_ptr, inv_norm_ptr, levels_ptr, lse_ptr, threshold_ptr,
                                 last_kept_ptr, delta_ptr, cq, cv, height, width, n_keys, n_levels, scale,
                                 BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, C_BLOCK: tl.constexpr,
                                 DOT_PRECISION: tl.constexpr):
    """D_p = Σ_m A_pm dP_pm, dP_pm = ⟨unfold(dout)_p, V_m⟩: a long sum whose difference with dP_pm
    is taken next, accumulated in float64."""
    b = tl.program_id(1).to(tl.int64)
    n_queries = height * width
    queries = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    query_ok = queries < n_queries
    q_base, k_base, inv_norm_base = q_ptr + b * cq * n_queries, k_ptr + b * cq * n_keys, inv_norm_ptr + b * n_keys
    v_base, g_base = v_ptr + b * cv * n_keys, grad_out_ptr + b * cv * n_queries
    lse, threshold, last_kept = _row_statistics(lse_ptr, threshold_ptr, last_kept_ptr, b * n_queries + queries,
                                                 query_ok)
    total = tl.zeros((BLOCK_N,), tl.float64)
    for level in range(n_levels):
        first, rows, cols = _level(levels_ptr, level)
        for start in range(0, rows * cols, BLOCK_M):
            keys = start + tl.arange(0, BLOCK_M)
            key_ok = keys < rows * cols
            _, p, dp = _scores_probabilities_and_grads(q_base, k_base, v_base, g_base, inv_norm_base, queries,
                                                       query_ok, height, width, keys, key_ok, rows, cols, first,
                                                       n_keys, cq, cv, scale, lse, threshold, last_kept, BLOCK_N,
                                                       BLOCK_M, C_BLOCK, DOT_PRECISION)
            total += tl.sum(p * dp, axis=1).to(tl.float64)
    tl.store(delta_ptr + b * n_queries + queries, total.to(tl.float32), mask=query_ok)


@triton.jit
def patch_attention_grad_q_kernel(q_ptr, k_ptr, v_ptr, grad_out_ptr, inv_norm_ptr, levels_ptr, lse_ptr, threshold_ptr,
                                  last_kept_ptr, delta_ptr, patches_ptr, cq, cv, height, width, n_keys, n_levels,
                                  scale, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, C_BLOCK: tl.constexpr,
                                  DOT_PRECISION: tl.constexpr):
    """dQ_p = Σ_m dS_pm · scale · r_m · K_m, dS = A ⊙ (dP − D), as patches for one channel block."""
    b = tl.program_id(2).to(tl.int64)
    c0 = tl.program_id(1) * C_BLOCK
    n_queries = height * width
    queries = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    query_ok = queries < n_queries
    q_base, k_base, inv_norm_base = q_ptr + b * cq * n_queries, k_ptr + b * cq * n_keys, inv_norm_ptr + b * n_keys
    v_base, g_base = v_ptr + b * cv * n_keys, grad_out_ptr + b * cv * n_queries
    lse, threshold, last_kept = _row_statistics(lse_ptr, threshold_ptr, last_kept_ptr, b * n_queries + queries,
                                                 query_ok)
    delta = tl.load(delta_ptr + b * n_queries + queries, mask=query_ok, other=0.0)
    acc = tl.zeros((BLOCK_N, 16 * C_BLOCK), tl.float32)
    for level in range(n_levels):
        first, rows, cols = _level(levels_ptr, level)
        for start in range(0, rows * cols, BLOCK_M):
            keys = start + tl.arange(0, BLOCK_M)
            key_ok = keys < rows * cols
            _, p, dp = _scores_probabilities_and_grads(q_base, k_base, v_base, g_base, inv_norm_base, queries,
                                                       query_ok, height, width, keys, key_ok, rows, cols, first,
                                                       n_keys, cq, cv, scale, lse, threshold, last_kept, BLOCK_N,
                                                       BLOCK_M, C_BLOCK, DOT_PRECISION)
            inverse_norm = tl.load(inv_norm_base + first + keys, mask=key_ok, other=0.0)
            grad_scores = p * (dp - delta[:, None]) * (scale * inverse_norm)[None, :]
            key_patches = _patch_tile(k_base, keys, key_ok, rows, cols, first, n_keys, c0, cq, C_BLOCK)
            acc = tl.dot(grad_scores.to(key_patches.dtype), key_patches, acc, input_precision=DOT_PRECISION)
    _store_patches(patches_ptr + b * 9 * cq * n_queries, acc, queries, query_ok, cq, n_queries, c0, C_BLOCK)


@triton.jit
def patch_attention_grad_kv_kernel(q_ptr, k_ptr, v_ptr, grad_out_ptr, inv_norm_ptr, levels_ptr, key_blocks_ptr,
                                   lse_ptr, threshold_ptr, last_kept_ptr, delta_ptr, patches_ptr, key_dot_ptr, cq, cv,
                                   height, width, n_keys, scale, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
                                   C_BLOCK: tl.constexpr, VALUES: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One key tile (`key_blocks`: its level and first position) and one channel block, streaming
    every query tile. VALUES: dV_m = Σ_p A_pm unfold(dout)_p. Otherwise the first term of dK_m,
    scale · r_m · Σ_p dS_pm Q_p, and (channel block 0) c_m = Σ_p dS_pm s_pm for the normalisation's
    gradient, which the launcher applies."""
    b = tl.program_id(2).to(tl.int64)
    c0 = tl.program_id(1) * C_BLOCK
    level = tl.load(key_blocks_ptr + 2 * tl.program_id(0))
    start = tl.load(key_blocks_ptr + 2 * tl.program_id(0) + 1)
    first, rows, cols = _level(levels_ptr, level)
    keys = start + tl.arange(0, BLOCK_M)
    key_ok = keys < rows * cols
    n_queries = height * width
    q_base, k_base, inv_norm_base = q_ptr + b * cq * n_queries, k_ptr + b * cq * n_keys, inv_norm_ptr + b * n_keys
    v_base, g_base = v_ptr + b * cv * n_keys, grad_out_ptr + b * cv * n_queries
    channels = cv if VALUES else cq
    acc = tl.zeros((BLOCK_M, 16 * C_BLOCK), tl.float32)
    key_dot = tl.zeros((BLOCK_M,), tl.float32)
    for query_start in range(0, n_queries, BLOCK_N):
        queries = query_start + tl.arange(0, BLOCK_N)
        query_ok = queries < n_queries
        lse, threshold, last_kept = _row_statistics(lse_ptr, threshold_ptr, last_kept_ptr, b * n_queries + queries,
                                                 query_ok)
        if VALUES:
            s = _scores(q_base, k_base, inv_norm_base, queries, query_ok, height, width, keys, key_ok, rows, cols,
                        first, n_keys, cq, scale, BLOCK_N, BLOCK_M, C_BLOCK, DOT_PRECISION)
            p = _probabilities(s, first + keys, lse, threshold, last_kept)
            grad_patches = _patch_tile(g_base, queries, query_ok, height, width, 0, n_queries, c0, cv, C_BLOCK)
            acc = tl.dot(tl.trans(p).to(grad_patches.dtype), grad_patches, acc, input_precision=DOT_PRECISION)
        else:
            s, p, dp = _scores_probabilities_and_grads(q_base, k_base, v_base, g_base, inv_norm_base, queries,
                                                       query_ok, height, width, keys, key_ok, rows, cols, first,
                                                       n_keys, cq, cv, scale, lse, threshold, last_kept, BLOCK_N,
                                                       BLOCK_M, C_BLOCK, DOT_PRECISION)
            delta = tl.load(delta_ptr + b * n_queries + queries, mask=query_ok, other=0.0)
            grad_scores = p * (dp - delta[:, None])
            key_dot += tl.sum(grad_scores * tl.where(key_ok[None, :], s, 0.0), axis=0)  # s = −∞ past the level
            query_patches = _patch_tile(q_base, queries, query_ok, height, width, 0, n_queries, c0, cq, C_BLOCK)
            acc = tl.dot(tl.trans(grad_scores).to(query_patches.dtype), query_patches, acc,
                         input_precision=DOT_PRECISION)
    if not VALUES:
        inverse_norm = tl.load(inv_norm_base + first + keys, mask=key_ok, other=0.0)
        acc = acc * (scale * inverse_norm)[:, None]
        if tl.program_id(1) == 0:
            tl.store(key_dot_ptr + b * n_keys + first + keys, key_dot, mask=key_ok)
    _store_patches(patches_ptr + b * 9 * channels * n_keys, acc, first + keys, key_ok, channels, n_keys, c0, C_BLOCK)


# ---------------------------------------------------------------------------------------------
# Launch configurations: the one place that chooses block sizes (launchers and AOT tests)
# ---------------------------------------------------------------------------------------------
_FOLD_BLOCK = 256


def _dot_precision(dtype):
    return "ieee" if dtype == torch.float32 else "tf32"  # the latter is unused by fp16/bf16 products


def _blocks(dtype):
    return {"BLOCK_N": BLOCK_N, "BLOCK_M": BLOCK_M, "C_BLOCK": C_BLOCK, "DOT_PRECISION": _dot_precision(dtype),
            "num_warps": _NUM_WARPS}


def launch_configurations():
    """Every (kernel, signature, constexprs, options) the launchers below can choose."""
    configs = []
    int_pointers = {"levels_ptr": "i32", "key_blocks_ptr": "i32", "last_kept_ptr": "i64", "lse_ptr": "fp64"}
    fp32_pointers = ("inv_norm_ptr", "threshold_ptr", "delta_ptr", "patches_ptr", "key_dot_ptr")
    for dtype in DTYPES:
        t = _TRITON_TYPE_NAMES[dtype]
        blocks = _blocks(dtype)
        options = {"num_warps": blocks.pop("num_warps")}
        variants = [(patch_attention_statistics_kernel, {"DENSE": True}),
                    (patch_attention_statistics_kernel, {"DENSE": False}), (patch_attention_attend_kernel, {}),
                    (patch_attention_delta_kernel, {}), (patch_attention_grad_q_kernel, {}),
                    (patch_attention_grad_kv_kernel, {"VALUES": True}),
                    (patch_attention_grad_kv_kernel, {"VALUES": False})]
        for kernel, extra in variants:
            cx = {**blocks, **extra}
            types = {**{n: t for n in ("q_ptr", "k_ptr", "v_ptr", "grad_out_ptr")},
                     **{n: "fp32" for n in fp32_pointers}, **int_pointers}
            signature = aot_signature(kernel, cx, types)
            configs.append((kernel, {**signature, "scale": "fp32"}, cx, options))
        # the fold writes q's dtype (out, grad_q, grad_values) and fp32 (grad_keys, before the
        # normalisation's gradient)
        for out_type in sorted({t, "fp32"}):
            cx = {"BLOCK": _FOLD_BLOCK}
            configs.append((patch_fold_kernel, aot_signature(patch_fold_kernel, cx,
                                                             {"patches_ptr": "fp32", "out_ptr": out_type}), cx, {}))
    # one fp32 fold appears for every dtype: keep one of each
    unique, seen = [], set()
    for config in configs:
        key = (config[0], tuple(sorted(config[1].items())), tuple(sorted(config[2].items())))
        if key not in seen:
            seen.add(key)
            unique.append(config)
    return unique


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------
def _flat(maps):
    """(B, C, Σ_l H_l·W_l): the levels' pixels one after another."""
    return torch.cat([m.reshape(m.shape[0], m.shape[1], -1) for m in maps], dim=2).contiguous()


def _level_table(maps):
    """int32 (L, 3): each level's first position in the flat maps, its rows and its columns."""
    rows, first = [], 0
    for m in maps:
        rows.append((first, m.shape[2], m.shape[3]))
        first += m.shape[2] * m.shape[3]
    return torch.tensor(rows, dtype=torch.int32, device=maps[0].device)


def _key_block_table(maps):
    """int32 (tiles, 2): the level and first position of every BLOCK_M key tile."""
    tiles = [(level, start) for level, m in enumerate(maps) for start in range(0, m.shape[2] * m.shape[3], BLOCK_M)]
    return torch.tensor(tiles, dtype=torch.int32, device=maps[0].device)


def _box_sum(x):
    """The 3×3 sum (zero padding) of (B, H, W), as nine shifted adds (exact order, no TF32)."""
    height, width = x.shape[1:]
    padded = F.pad(x, (1, 1, 1, 1))
    return sum(padded[:, dy:dy + height, dx:dx + width] for dy in range(3) for dx in range(3))


def _inverse_norms(keys, key_eps):
    """(B, M) fp32: 1 / max(‖K_m‖, key_eps), ‖K_m‖² the 3×3 sum of the key map's squared pixel norms."""
    norms_sq = torch.cat([_box_sum(k.float().pow(2).sum(1)).flatten(1) for k in keys], dim=1)
    return 1.0 / norms_sq.sqrt().clamp_min(key_eps)


def _fold(patches, out, first=0):
    """out (B, C, H, W) = the patches of `patches` (B, 9, C, plane), from position `first`, pasted
    back centred on their pixels."""
    batch, channels, rows, cols = out.shape
    launch(patch_fold_kernel, (triton.cdiv(rows * cols, _FOLD_BLOCK), channels, batch), patches, out, channels, rows,
           cols, first, patches.shape[3], BLOCK=_FOLD_BLOCK)
    return out


def forward(q: torch.Tensor, keys: list[torch.Tensor], values: list[torch.Tensor], scale: float, topk: int,
            key_eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The op's forward: out (B, Cv, H, W) of q's dtype; for backward the key inverse norms (B, M)
    fp32, each query's log-sum-exp (B, N) float64, its top-k threshold (B, N) fp32 (−∞ when dense)
    and the last key kept at it (B, N) int64. topk: 0 for every key, else 1..MAX_TOPK."""
    q, k_flat, v_flat = q.contiguous(), _flat(keys), _flat(values)
    batch, cq, height, width = q.shape
    n_queries, n_keys, cv = height * width, k_flat.shape[2], v_flat.shape[1]
    levels = _level_table(keys)
    inverse_norm = _inverse_norms(keys, key_eps)
    lse = q.new_empty((batch, n_queries), dtype=torch.float64)
    threshold = q.new_empty((batch, n_queries), dtype=torch.float32)
    last_kept = q.new_empty((batch, n_queries), dtype=torch.int64)
    blocks = _blocks(q.dtype)
    query_tiles = triton.cdiv(n_queries, BLOCK_N)
    launch(patch_attention_statistics_kernel, (query_tiles, batch), q, k_flat, inverse_norm, levels, lse, threshold,
           last_kept, cq, height, width, n_keys, len(keys), topk, scale, DENSE=topk == 0, **blocks)
    patches = q.new_empty((batch, 9, cv, n_queries), dtype=torch.float32)
    launch(patch_attention_attend_kernel, (query_tiles, triton.cdiv(cv, C_BLOCK), batch), q, k_flat, v_flat,
           inverse_norm, levels, lse, threshold, last_kept, patches, cq, cv, height, width, n_keys, len(keys), scale,
           **blocks)
    out = _fold(patches, q.new_empty((batch, cv, height, width)))
    return out, inverse_norm, lse, threshold, last_kept


def backward(grad_out: torch.Tensor, q: torch.Tensor, keys: list[torch.Tensor], values: list[torch.Tensor],
             key_inv_norm: torch.Tensor, lse: torch.Tensor, threshold: torch.Tensor, last_kept: torch.Tensor,
             scale: float, topk: int, key_eps: float) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """The op's backward from what the forward saved: the gradients of q, of every key map and of
    every value map, each of q's dtype."""
    q, k_flat, v_flat = q.contiguous(), _flat(keys), _flat(values)
    grad_out = grad_out.to(q.dtype).contiguous()
    key_inv_norm, lse, threshold, last_kept = (t.contiguous() for t in (key_inv_norm, lse, threshold, last_kept))
    batch, cq, height, width = q.shape
    n_queries, n_keys, cv = height * width, k_flat.shape[2], v_flat.shape[1]
    levels, key_blocks = _level_table(keys), _key_block_table(keys)
    blocks = _blocks(q.dtype)
    query_tiles = triton.cdiv(n_queries, BLOCK_N)
    common = (q, k_flat, v_flat, grad_out, key_inv_norm, levels)
    statistics = (lse, threshold, last_kept)

    delta = q.new_empty((batch, n_queries), dtype=torch.float32)
    launch(patch_attention_delta_kernel, (query_tiles, batch), *common, *statistics, delta, cq, cv, height, width,
           n_keys, len(keys), scale, **blocks)
    query_patches = q.new_empty((batch, 9, cq, n_queries), dtype=torch.float32)
    launch(patch_attention_grad_q_kernel, (query_tiles, triton.cdiv(cq, C_BLOCK), batch), *common, *statistics, delta,
           query_patches, cq, cv, height, width, n_keys, len(keys), scale, **blocks)
    grad_q = _fold(query_patches, torch.empty_like(q))
    del query_patches

    key_dot = q.new_empty((batch, n_keys), dtype=torch.float32)
    grads = {}
    for is_values, channels in ((True, cv), (False, cq)):
        patches = q.new_empty((batch, 9, channels, n_keys), dtype=torch.float32)
        launch(patch_attention_grad_kv_kernel, (key_blocks.shape[0], triton.cdiv(channels, C_BLOCK), batch), *common,
               key_blocks, *statistics, delta, patches, key_dot, cq, cv, height, width, n_keys, scale,
               VALUES=is_values, **blocks)
        grads[is_values] = patches

    grad_keys, grad_values = [], []
    # the normalisation's gradient: dK_m −= r_m² c_m K_m where the norm was not clamped, that is
    # dk[:, y] −= k[:, y] · Σ_δ w[y − δ] with w_m = r_m² c_m
    weight = torch.where(key_inv_norm * key_eps >= 1.0, 0.0, key_inv_norm * key_inv_norm * key_dot)
    first = 0
    for k, v in zip(keys, values):
        rows, cols = k.shape[2], k.shape[3]
        grad_values.append(_fold(grads[True], torch.empty_like(v, memory_format=torch.contiguous_format), first))
        grad_k = _fold(grads[False], torch.empty(k.shape, dtype=torch.float32, device=k.device), first)
        spread = _box_sum(weight[:, first:first + rows * cols].reshape(batch, rows, cols))
        grad_keys.append((grad_k - k.float() * spread[:, None]).to(q.dtype))
        first += rows * cols
    return grad_q, grad_keys, grad_values
