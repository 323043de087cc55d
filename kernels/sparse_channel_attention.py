"""Triton kernels of the top-k channel attention (DESIGN.md §1) and their launchers.

Forward, three launches:
  gram_and_norms_kernel            split-N pass: per-split partials of q kᵀ, ‖q‖², ‖k‖²
  attention_matrix_forward_kernel  d x d stage: sums the partials in split order, normalises,
                                   ranks each row (stable descending: ties keep the lower
                                   column), masked softmax / relu² per branch, P = Σ_r w_r φ_r
  attention_output_kernel          streaming pass: out = P v
Backward, three launches:
  gram_and_norms_kernel            dP = dout vᵀ (the same split-N pass, without norms)
  attention_matrix_backward_kernel d x d stage: dS, M = τ dS, per-row-block partials of dτ, dw
                                   and of the column sums that the k correction needs
  attention_input_grads_kernel     streaming pass: dq = (M k̂)/‖q‖ − a⊙q, dk = (Mᵀ q̂)/‖k‖ − b⊙k,
                                   dv = Pᵀ dout, in one program per column block (products
                                   taken over chunks of d; q and k are re-read, from cache,
                                   for the corrections)

Every reduction over N or over rows goes through partials summed in a fixed order, so two runs
give the same bits. d up to 128 is padded to a power of two (at least 16, tl.dot's minimum)
and masked; N is any length. Inputs may be fp32, fp16 or bf16; every accumulation is fp32, and
fp32 products use input_precision="ieee" so that the interpreter and a GPU compute the same thing.
The d x d matrices enter the half-precision products as τ·dS and P (order 1) while q and k enter
as q̂, k̂: the tiny factors 1/‖q‖, 1/‖k‖ are applied in fp32, never rounded to fp16.

`launch_configurations()` lists every (kernel, signature, constexprs, options) the launchers can
choose, for ahead-of-time compilation in the tests.
"""
import torch
import triton
import triton.language as tl

from torch import Tensor

from sparse_attn.encodings import ACTIVATION_CODES

from ._launch import aot_signature, launch

SOFTMAX = tl.constexpr(ACTIVATION_CODES["softmax"])  # any other code is relu2
NORM_EPS = tl.constexpr(1e-12)  # F.normalize's default (constexpr: kernels read it)
MAX_D = 128
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_TRITON_TYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
_PAD_SIZES = (16, 32, 64, 128)
_TARGET_PROGRAMS = 512  # split-N programs to aim for; a function of the shape only (determinism)


# ---------------------------------------------------------------------------------------------
# Helpers shared by the kernels
# ---------------------------------------------------------------------------------------------
@triton.jit
def _row_pointers(ptr, bh, heads, stride_b, stride_h, stride_d, rows):
    """Pointers to the first column of `rows` of (batch*head) `bh` of a (B, heads, d, N) tensor
    whose last dimension is contiguous. 64-bit offsets: B·heads·d·N may exceed 2³¹."""
    b = (bh // heads).to(tl.int64)
    h = (bh % heads).to(tl.int64)
    return ptr + b * stride_b + h * stride_h + rows[:, None].to(tl.int64) * stride_d


@triton.jit
def _column_block(d, n, BLOCK_N: tl.constexpr, D_PAD: tl.constexpr):
    """The streaming passes' program (bh, column block): bh, its columns and all rows (with
    masks), and the offset of bh's d x d matrices."""
    bh = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = tl.arange(0, D_PAD)
    return bh, cols, rows, rows < d, cols < n, (bh * d).to(tl.int64) * d


@triton.jit
def _row_block(row_block, d, BLOCK_ROWS: tl.constexpr, D_PAD: tl.constexpr):
    """Row and column indices of a (BLOCK_ROWS, D_PAD) block of a d x d matrix, and its masks."""
    rows = row_block * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = tl.arange(0, D_PAD)
    rows_ok = rows < d
    cols_ok = cols < d
    return rows, cols, rows_ok, cols_ok, rows_ok[:, None] & cols_ok[None, :]


@triton.jit
def _sum_of_split_partials(partial_ptr, bh, splits, d, rows, cols, tile_ok,
                           BLOCK_ROWS: tl.constexpr, D_PAD: tl.constexpr):
    """Rows `rows` of Σ_split partial[bh, split] (d x d each), added in split order."""
    total = tl.zeros((BLOCK_ROWS, D_PAD), tl.float32)
    for split in range(0, splits):
        item = (bh * splits + split).to(tl.int64)
        total += tl.load(partial_ptr + (item * d + rows[:, None]) * d + cols[None, :], mask=tile_ok, other=0.0)
    return total


@triton.jit
def _scores_and_ranks(gram_rows_ptr, gram, tau, rows_ok, cols, d):
    """S = τ·gram of a block of rows, and rank[i, j] = #{l : S_il > S_ij} + #{l < j : S_il = S_ij}
    (the position a stable descending sort gives S_ij). Column l of S is re-read from the
    stored gram (`gram_rows_ptr` points at column 0 of each row) and scaled by the same τ, so it
    is bitwise the value held in the tile."""
    scores = gram * tau
    rank = tl.zeros(scores.shape, tl.int32)
    for col in range(0, d):
        s_col = tl.load(gram_rows_ptr + col, mask=rows_ok, other=0.0) * tau
        before = (s_col[:, None] > scores) | ((s_col[:, None] == scores) & (col < cols[None, :]))
        rank += before.to(tl.int32)
    return scores, rank


@triton.jit
def _branch(branch_ptr, weights_ptr, n_branches, r, rank, exp_shifted, relu_sq, tile_ok):
    """Branch r's weight and φ_r on a tile: softmax over the kept entries, or relu² on them."""
    topk = tl.load(branch_ptr + r)
    activation = tl.load(branch_ptr + n_branches + r)
    weight = tl.load(weights_ptr + r).to(tl.float32)
    kept = (rank < topk) & tile_ok
    kept_exp = tl.where(kept, exp_shifted, 0.0)
    # >= 1 on real rows (the row maximum is kept, exp(0) = 1); the clamp keeps padded rows finite.
    normalizer = tl.maximum(tl.sum(kept_exp, axis=1), 1.0)
    softmax = kept_exp / normalizer[:, None]
    phi = tl.where(activation == SOFTMAX, softmax, tl.where(kept, relu_sq, 0.0))
    return weight, kept, phi, activation


@triton.jit
def _shifted_exp_and_relu_sq(scores, tile_ok):
    """exp(S − rowmax) (the rank-0 entry is kept by every branch, so every softmax branch
    shares the row maximum) and relu(S)², zero outside the tile."""
    row_max = tl.max(tl.where(tile_ok, scores, float("-inf")), axis=1)
    exp_shifted = tl.where(tile_ok, tl.exp(scores - row_max[:, None]), 0.0)
    positive = tl.maximum(scores, 0.0)
    return exp_shifted, positive * positive


@triton.jit
def _projection_scale(norm, eps: tl.constexpr):
    """Weight of F.normalize's projection term: 1/‖x‖², or 0 where ‖x‖ < eps (plain scaling)."""
    clamped = tl.maximum(norm, eps)
    return tl.where(norm >= eps, 1.0 / (clamped * clamped), 0.0)


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------
@triton.jit
def gram_and_norms_kernel(x_ptr, y_ptr, gram_partial_ptr, sq_partial_ptr,
                          heads, d, n, split_len,
                          x_stride_b, x_stride_h, x_stride_d, y_stride_b, y_stride_h, y_stride_d,
                          D_PAD: tl.constexpr, BLOCK_N: tl.constexpr, WITH_NORMS: tl.constexpr,
                          DOT_PRECISION: tl.constexpr):
    """Program (bh, split): x yᵀ over columns [split·split_len, (split+1)·split_len) into
    gram_partial[bh, split] (d x d), and with WITH_NORMS the squared row norms of x and y into
    sq_partial[bh, split, 0 / 1]."""
    bh = tl.program_id(0)
    split = tl.program_id(1)
    splits = tl.num_programs(1)
    rows = tl.arange(0, D_PAD)
    rows_ok = rows < d
    x_rows = _row_pointers(x_ptr, bh, heads, x_stride_b, x_stride_h, x_stride_d, rows)
    y_rows = _row_pointers(y_ptr, bh, heads, y_stride_b, y_stride_h, y_stride_d, rows)
    gram = tl.zeros((D_PAD, D_PAD), tl.float32)
    x_sq = tl.zeros((D_PAD,), tl.float32)
    y_sq = tl.zeros((D_PAD,), tl.float32)
    start = split * split_len
    end = tl.minimum(start + split_len, n)
    for col0 in range(start, end, BLOCK_N):
        cols = col0 + tl.arange(0, BLOCK_N)
        mask = rows_ok[:, None] & (cols[None, :] < end)
        x = tl.load(x_rows + cols[None, :], mask=mask, other=0.0)
        y = tl.load(y_rows + cols[None, :], mask=mask, other=0.0)
        gram = tl.dot(x, tl.trans(y), gram, input_precision=DOT_PRECISION)
        if WITH_NORMS:
            x32 = x.to(tl.float32)
            y32 = y.to(tl.float32)
            x_sq += tl.sum(x32 * x32, axis=1)
            y_sq += tl.sum(y32 * y32, axis=1)
    item = (bh * splits + split).to(tl.int64)
    cols_all = tl.arange(0, D_PAD)
    tl.store(gram_partial_ptr + (item * d + rows[:, None]) * d + cols_all[None, :], gram,
             mask=rows_ok[:, None] & (cols_all[None, :] < d))
    if WITH_NORMS:
        tl.store(sq_partial_ptr + (item * 2) * d + rows, x_sq, mask=rows_ok)
        tl.store(sq_partial_ptr + (item * 2 + 1) * d + rows, y_sq, mask=rows_ok)


@triton.jit
def attention_matrix_forward_kernel(gram_partial_ptr, sq_partial_ptr, temperature_ptr, weights_ptr,
                                    branch_ptr, gram_ptr, q_norm_ptr, k_norm_ptr, p_ptr,
                                    heads, d, splits, n_branches,
                                    D_PAD: tl.constexpr, BLOCK_ROWS: tl.constexpr):
    """Program (bh, row block): normalised gram, the norms and P = Σ_r w_r φ_r for its rows."""
    bh = tl.program_id(0)
    row_block = tl.program_id(1)
    rows, cols, rows_ok, cols_ok, tile_ok = _row_block(row_block, d, BLOCK_ROWS, D_PAD)
    raw = _sum_of_split_partials(gram_partial_ptr, bh, splits, d, rows, cols, tile_ok, BLOCK_ROWS, D_PAD)
    q_sq = tl.zeros((BLOCK_ROWS,), tl.float32)
    k_sq = tl.zeros((D_PAD,), tl.float32)
    for split in range(0, splits):
        item = (bh * splits + split).to(tl.int64)
        q_sq += tl.load(sq_partial_ptr + (item * 2) * d + rows, mask=rows_ok, other=0.0)
        k_sq += tl.load(sq_partial_ptr + (item * 2 + 1) * d + cols, mask=cols_ok, other=0.0)
    q_norm = tl.sqrt(q_sq)
    k_norm = tl.sqrt(k_sq)
    tl.store(q_norm_ptr + bh * d + rows, q_norm, mask=rows_ok)
    tl.store(k_norm_ptr + bh * d + cols, k_norm, mask=cols_ok & (row_block == 0))
    gram = raw / (tl.maximum(q_norm, NORM_EPS)[:, None] * tl.maximum(k_norm, NORM_EPS)[None, :])
    tile = (bh * d + rows[:, None]).to(tl.int64) * d + cols[None, :]
    tl.store(gram_ptr + tile, gram, mask=tile_ok)
    # The ranks re-read columns of the gram just stored by other threads of this program.
    tl.debug_barrier()
    tau = tl.load(temperature_ptr + bh % heads).to(tl.float32)
    scores, rank = _scores_and_ranks(gram_ptr + (bh * d + rows).to(tl.int64) * d, gram, tau, rows_ok, cols, d)
    exp_shifted, relu_sq = _shifted_exp_and_relu_sq(scores, tile_ok)
    p = tl.zeros((BLOCK_ROWS, D_PAD), tl.float32)
    for r in range(0, n_branches):
        weight, _, phi, _ = _branch(branch_ptr, weights_ptr, n_branches, r, rank, exp_shifted, relu_sq, tile_ok)
        p += weight * phi
    tl.store(p_ptr + tile, p, mask=tile_ok)


@triton.jit
def attention_output_kernel(p_ptr, v_ptr, out_ptr, heads, d, n, v_stride_b, v_stride_h, v_stride_d,
                            D_PAD: tl.constexpr, BLOCK_N: tl.constexpr, K_CHUNK: tl.constexpr,
                            DOT_PRECISION: tl.constexpr):
    """Program (bh, column block): out[:, cols] = P v[:, cols] (out contiguous), the product
    taken K_CHUNK channels of v at a time (bounded shared memory and unrolled code at d = 128)."""
    bh, cols, rows, rows_ok, cols_ok, square = _column_block(d, n, BLOCK_N, D_PAD)
    out = tl.zeros((D_PAD, BLOCK_N), tl.float32)
    for c0 in range(0, d, K_CHUNK):  # chunks past d would be all padding
        chunk = c0 + tl.arange(0, K_CHUNK)
        chunk_ok = chunk < d
        v = tl.load(_row_pointers(v_ptr, bh, heads, v_stride_b, v_stride_h, v_stride_d, chunk) + cols[None, :],
                    mask=chunk_ok[:, None] & cols_ok[None, :], other=0.0)
        p = tl.load(p_ptr + square + rows[:, None] * d + chunk[None, :],
                    mask=rows_ok[:, None] & chunk_ok[None, :], other=0.0)
        out = tl.dot(p.to(v.dtype), v, out, input_precision=DOT_PRECISION)
    out_rows = out_ptr + (bh * d + rows[:, None]).to(tl.int64) * n
    tl.store(out_rows + cols[None, :], out.to(out_ptr.dtype.element_ty), mask=rows_ok[:, None] & cols_ok[None, :])


@triton.jit
def attention_matrix_backward_kernel(gram_ptr, dp_partial_ptr, temperature_ptr, weights_ptr, branch_ptr,
                                     q_norm_ptr, p_ptr, m_ptr, a_q_ptr, colsum_partial_ptr,
                                     dtau_partial_ptr, dw_partial_ptr,
                                     heads, d, splits, n_branches,
                                     D_PAD: tl.constexpr, BLOCK_ROWS: tl.constexpr):
    """Program (bh, row block), given dP (as split partials):
        dS = Σ_r w_r φ_r'ᵀ[dP]   (softmax: φ⊙(dP − rowsum(φ⊙dP)); relu²: 2·relu(S)·dP; on kept)
    writes P and M = τ·dS for its rows, a_q = Σ_j dS_ij S_ij / ‖q_i‖², and per-row-block
    partials of dτ = ⟨dS, q̂k̂ᵀ⟩, dw_r = ⟨φ_r, dP⟩ and the column sums Σ_i dS_ij S_ij."""
    bh = tl.program_id(0)
    row_block = tl.program_id(1)
    row_blocks = tl.num_programs(1)
    rows, cols, rows_ok, cols_ok, tile_ok = _row_block(row_block, d, BLOCK_ROWS, D_PAD)
    tile = (bh * d + rows[:, None]).to(tl.int64) * d + cols[None, :]
    gram = tl.load(gram_ptr + tile, mask=tile_ok, other=0.0)
    tau = tl.load(temperature_ptr + bh % heads).to(tl.float32)
    scores, rank = _scores_and_ranks(gram_ptr + (bh * d + rows).to(tl.int64) * d, gram, tau, rows_ok, cols, d)
    dp = _sum_of_split_partials(dp_partial_ptr, bh, splits, d, rows, cols, tile_ok, BLOCK_ROWS, D_PAD)
    exp_shifted, relu_sq = _shifted_exp_and_relu_sq(scores, tile_ok)
    p = tl.zeros((BLOCK_ROWS, D_PAD), tl.float32)
    ds = tl.zeros((BLOCK_ROWS, D_PAD), tl.float32)
    block_item = (bh * row_blocks + row_block).to(tl.int64)
    for r in range(0, n_branches):
        weight, kept, phi, activation = _branch(branch_ptr, weights_ptr, n_branches, r, rank,
                                                exp_shifted, relu_sq, tile_ok)
        p += weight * phi
        phi_dot_dp = tl.sum(phi * dp, axis=1)
        tl.store(dw_partial_ptr + block_item * n_branches + r, tl.sum(tl.where(rows_ok, phi_dot_dp, 0.0), axis=0))
        softmax_grad = phi * (dp - phi_dot_dp[:, None])
        relu_sq_grad = 2.0 * tl.maximum(scores, 0.0) * dp
        ds += tl.where(kept, weight * tl.where(activation == SOFTMAX, softmax_grad, relu_sq_grad), 0.0)
    tl.store(dtau_partial_ptr + block_item, tl.sum(tl.sum(ds * gram, axis=1), axis=0))
    ds_times_s = ds * scores
    q_norm = tl.load(q_norm_ptr + bh * d + rows, mask=rows_ok, other=0.0)
    tl.store(a_q_ptr + bh * d + rows, tl.sum(ds_times_s, axis=1) * _projection_scale(q_norm, NORM_EPS), mask=rows_ok)
    tl.store(colsum_partial_ptr + block_item * d + cols, tl.sum(ds_times_s, axis=0), mask=cols_ok)
    tl.store(p_ptr + tile, p, mask=tile_ok)
    tl.store(m_ptr + tile, tau * ds, mask=tile_ok)


@triton.jit
def attention_input_grads_kernel(q_ptr, k_ptr, dout_ptr, m_ptr, p_ptr, a_q_ptr, colsum_partial_ptr,
                                 q_norm_ptr, k_norm_ptr, dq_ptr, dk_ptr, dv_ptr,
                                 heads, d, n, row_blocks,
                                 q_stride_b, q_stride_h, q_stride_d, k_stride_b, k_stride_h, k_stride_d,
                                 g_stride_b, g_stride_h, g_stride_d,
                                 D_PAD: tl.constexpr, BLOCK_N: tl.constexpr, K_CHUNK: tl.constexpr,
                                 DOT_PRECISION: tl.constexpr):
    """Program (bh, column block):
        dq = (M k̂)/‖q‖ − a_q⊙q,   dk = (Mᵀ q̂)/‖k‖ − b⊙k,   dv = Pᵀ dout
    with b_j = Σ_i dS_ij S_ij / ‖k_j‖² summed from the row-block partials in order. The three
    products are taken K_CHUNK channels at a time; Mᵀ and Pᵀ are read transposed from memory."""
    bh, cols, rows, rows_ok, cols_ok, square = _column_block(d, n, BLOCK_N, D_PAD)
    acc_q = tl.zeros((D_PAD, BLOCK_N), tl.float32)
    acc_k = tl.zeros((D_PAD, BLOCK_N), tl.float32)
    acc_v = tl.zeros((D_PAD, BLOCK_N), tl.float32)
    for c0 in range(0, d, K_CHUNK):  # chunks past d would be all padding
        chunk = c0 + tl.arange(0, K_CHUNK)
        chunk_ok = chunk < d
        tile_ok = chunk_ok[:, None] & cols_ok[None, :]
        q = tl.load(_row_pointers(q_ptr, bh, heads, q_stride_b, q_stride_h, q_stride_d, chunk) + cols[None, :],
                    mask=tile_ok, other=0.0)
        k = tl.load(_row_pointers(k_ptr, bh, heads, k_stride_b, k_stride_h, k_stride_d, chunk) + cols[None, :],
                    mask=tile_ok, other=0.0)
        dout = tl.load(_row_pointers(dout_ptr, bh, heads, g_stride_b, g_stride_h, g_stride_d, chunk) + cols[None, :],
                       mask=tile_ok, other=0.0)
        q_scale = 1.0 / tl.maximum(tl.load(q_norm_ptr + bh * d + chunk, mask=chunk_ok, other=1.0), NORM_EPS)
        k_scale = 1.0 / tl.maximum(tl.load(k_norm_ptr + bh * d + chunk, mask=chunk_ok, other=1.0), NORM_EPS)
        k_hat = (k.to(tl.float32) * k_scale[:, None]).to(q.dtype)
        q_hat = (q.to(tl.float32) * q_scale[:, None]).to(q.dtype)
        square_ok = rows_ok[:, None] & chunk_ok[None, :]
        m = tl.load(m_ptr + square + rows[:, None] * d + chunk[None, :], mask=square_ok, other=0.0)
        acc_q = tl.dot(m.to(q.dtype), k_hat, acc_q, input_precision=DOT_PRECISION)
        m_t = tl.load(m_ptr + square + chunk[None, :] * d + rows[:, None], mask=square_ok, other=0.0)
        acc_k = tl.dot(m_t.to(q.dtype), q_hat, acc_k, input_precision=DOT_PRECISION)
        p_t = tl.load(p_ptr + square + chunk[None, :] * d + rows[:, None], mask=square_ok, other=0.0)
        acc_v = tl.dot(p_t.to(dout.dtype), dout, acc_v, input_precision=DOT_PRECISION)

    mask = rows_ok[:, None] & cols_ok[None, :]
    q = tl.load(_row_pointers(q_ptr, bh, heads, q_stride_b, q_stride_h, q_stride_d, rows) + cols[None, :],
                mask=mask, other=0.0).to(tl.float32)
    k = tl.load(_row_pointers(k_ptr, bh, heads, k_stride_b, k_stride_h, k_stride_d, rows) + cols[None, :],
                mask=mask, other=0.0).to(tl.float32)
    q_norm = tl.load(q_norm_ptr + bh * d + rows, mask=rows_ok, other=1.0)
    k_norm = tl.load(k_norm_ptr + bh * d + rows, mask=rows_ok, other=1.0)
    a_q = tl.load(a_q_ptr + bh * d + rows, mask=rows_ok, other=0.0)
    colsum = tl.zeros((D_PAD,), tl.float32)
    for row_block in range(0, row_blocks):
        colsum += tl.load(colsum_partial_ptr + (bh * row_blocks + row_block).to(tl.int64) * d + rows,
                          mask=rows_ok, other=0.0)
    b_k = colsum * _projection_scale(k_norm, NORM_EPS)
    dq = acc_q / tl.maximum(q_norm, NORM_EPS)[:, None] - a_q[:, None] * q
    dk = acc_k / tl.maximum(k_norm, NORM_EPS)[:, None] - b_k[:, None] * k
    out_offsets = (bh * d + rows[:, None]).to(tl.int64) * n + cols[None, :]
    tl.store(dq_ptr + out_offsets, dq.to(dq_ptr.dtype.element_ty), mask=mask)
    tl.store(dk_ptr + out_offsets, dk.to(dk_ptr.dtype.element_ty), mask=mask)
    tl.store(dv_ptr + out_offsets, acc_v.to(dv_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------
# Launch configurations: the one place that chooses block sizes (launchers and AOT tests)
# ---------------------------------------------------------------------------------------------
def padded_d(d):
    """d rounded up to a power of two, at least 16 (tl.dot's smallest dimension)."""
    if not 1 <= d <= MAX_D:
        raise ValueError(f"q: the Triton kernels take 1 <= d <= {MAX_D} channels per head, got d = {d}")
    return max(16, triton.next_power_of_2(d))


def _stream_config(d_pad, dtype):
    """Block sizes and warps of the streaming passes: at d = 128 the backward's three fp32
    accumulators of (d, BLOCK_N) must stay in registers."""
    return {"BLOCK_N": 32 if d_pad >= 128 else 64, "K_CHUNK": min(d_pad, 32), "num_warps": 8 if d_pad >= 64 else 4}


def _gram_config(d_pad, dtype):
    return {"BLOCK_N": 32 if d_pad >= 128 and dtype == torch.float32 else 64, "num_warps": 8 if d_pad >= 64 else 4}


def _matrix_config(d_pad):
    """Rows per program of the d x d stage: the rank loop holds a (rows, d_pad) tile."""
    return {"BLOCK_ROWS": 16 if d_pad <= 64 else 8, "num_warps": 4}


def _dot_precision(dtype):
    return "ieee" if dtype == torch.float32 else "tf32"  # the latter is unused by fp16/bf16 products


def _splits(bh, n, block_n):
    """Columns per split of the split-N passes: enough programs to fill a GPU, chosen from the
    shape alone so that the partial sums, and hence the bits, never depend on the device."""
    # No Python comparison involves N here: under torch.compile it would become a guard.
    per_split = triton.cdiv(triton.cdiv(n, block_n), max(1, _TARGET_PROGRAMS // bh))
    split_len = per_split * block_n
    return triton.cdiv(n, split_len), split_len


def launch_configurations():
    """Every (kernel, signature, constexprs, options) the launchers below can choose."""
    configs = []
    for dtype in DTYPES:
        t = _TRITON_TYPE_NAMES[dtype]
        for d_pad in _PAD_SIZES:
            for with_norms in (True, False):
                cfg = _gram_config(d_pad, dtype)
                cx = {"D_PAD": d_pad, "BLOCK_N": cfg["BLOCK_N"], "WITH_NORMS": with_norms,
                      "DOT_PRECISION": _dot_precision(dtype)}
                configs.append((gram_and_norms_kernel,
                                aot_signature(gram_and_norms_kernel, cx, {"x_ptr": t, "y_ptr": t}),
                                cx, {"num_warps": cfg["num_warps"]}))
            cfg = _stream_config(d_pad, dtype)
            cx = {"D_PAD": d_pad, "BLOCK_N": cfg["BLOCK_N"], "K_CHUNK": cfg["K_CHUNK"],
                  "DOT_PRECISION": _dot_precision(dtype)}
            configs.append((attention_output_kernel,
                            aot_signature(attention_output_kernel, cx, {"v_ptr": t, "out_ptr": t}),
                            cx, {"num_warps": cfg["num_warps"]}))
            configs.append((attention_input_grads_kernel,
                            aot_signature(attention_input_grads_kernel, cx,
                                       {name: t for name in ("q_ptr", "k_ptr", "dout_ptr", "dq_ptr", "dk_ptr", "dv_ptr")}),
                            cx, {"num_warps": cfg["num_warps"]}))
    for d_pad in _PAD_SIZES:  # the d x d stage works in fp32 whatever the inputs' dtype
        cfg = _matrix_config(d_pad)
        cx = {"D_PAD": d_pad, "BLOCK_ROWS": cfg["BLOCK_ROWS"]}
        for kernel in (attention_matrix_forward_kernel, attention_matrix_backward_kernel):
            configs.append((kernel, aot_signature(kernel, cx, {"branch_ptr": "i32"}), cx, {"num_warps": cfg["num_warps"]}))
    return configs


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------
def _rows_contiguous(x):
    """x itself when its last dimension is contiguous (any batch/head/row strides are passed to
    the kernels), else a contiguous copy."""
    return x if x.stride(-1) == 1 else x.contiguous()


def _branch_table(topk, activation, weights, temperature):
    """The d x d stage's parameters: topk then activation codes (int32); weights and
    temperature in fp32, so that one compiled kernel serves every input dtype."""
    table = torch.tensor(list(topk) + list(activation), dtype=torch.int32, device=weights.device)
    return table, weights.float().contiguous(), temperature.float().contiguous()


def _split_gram(x, y, with_norms):
    """Per-split partials of x yᵀ (and the squared row norms): (BH, splits, d, d), (BH, splits, 2, d)."""
    batch, heads, d, n = x.shape
    bh = batch * heads
    d_pad = padded_d(d)
    cfg = _gram_config(d_pad, x.dtype)
    splits, split_len = _splits(bh, n, cfg["BLOCK_N"])
    gram_partial = x.new_empty((bh, splits, d, d), dtype=torch.float32)
    sq_partial = x.new_empty((bh, splits, 2, d) if with_norms else (1,), dtype=torch.float32)
    launch(gram_and_norms_kernel, (bh, splits), x, y, gram_partial, sq_partial, heads, d, n, split_len,
            *x.stride()[:3], *y.stride()[:3], D_PAD=d_pad, BLOCK_N=cfg["BLOCK_N"], WITH_NORMS=with_norms,
            DOT_PRECISION=_dot_precision(x.dtype), num_warps=cfg["num_warps"])
    return gram_partial, sq_partial, splits


def forward(q: Tensor, k: Tensor, v: Tensor, temperature: Tensor, weights: Tensor, topk: list[int],
            activation: list[int]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The op's forward: (out, gram = q̂k̂ᵀ, ‖q‖, ‖k‖), the last three in fp32.

    q, k, v: (B, heads, d, N) fp32/fp16/bf16; temperature (heads,); weights (R,);
    topk, activation: R integers each (activation: sparse_attn.encodings.ACTIVATION_CODES)."""
    q, k, v = (_rows_contiguous(t) for t in (q, k, v))
    batch, heads, d, n = q.shape
    bh = batch * heads
    d_pad = padded_d(d)
    gram_partial, sq_partial, splits = _split_gram(q, k, with_norms=True)
    gram = q.new_empty((batch, heads, d, d), dtype=torch.float32)
    q_norm = q.new_empty((batch, heads, d), dtype=torch.float32)
    k_norm = q.new_empty((batch, heads, d), dtype=torch.float32)
    p = q.new_empty((bh, d, d), dtype=torch.float32)
    matrix = _matrix_config(d_pad)
    branch, weights32, temperature32 = _branch_table(topk, activation, weights, temperature)
    launch(attention_matrix_forward_kernel, (bh, triton.cdiv(d, matrix["BLOCK_ROWS"])),
            gram_partial, sq_partial, temperature32, weights32, branch, gram, q_norm, k_norm, p, heads, d, splits, len(topk),
            D_PAD=d_pad, BLOCK_ROWS=matrix["BLOCK_ROWS"], num_warps=matrix["num_warps"])
    out = torch.empty((batch, heads, d, n), dtype=q.dtype, device=q.device)
    stream = _stream_config(d_pad, q.dtype)
    launch(attention_output_kernel, (bh, triton.cdiv(n, stream["BLOCK_N"])), p, v, out, heads, d, n,
            *v.stride()[:3], D_PAD=d_pad, BLOCK_N=stream["BLOCK_N"], K_CHUNK=stream["K_CHUNK"],
            DOT_PRECISION=_dot_precision(q.dtype), num_warps=stream["num_warps"])
    return out, gram, q_norm, k_norm


def backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, temperature: Tensor, weights: Tensor, gram: Tensor,
             q_norm: Tensor, k_norm: Tensor, topk: list[int], activation: list[int]
             ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The op's backward: (dq, dk, dv, dtemperature, dweights), from the forward's saved
    gram and norms; dtemperature and dweights in the dtype of temperature and weights."""
    grad_out = _rows_contiguous(grad_out.to(q.dtype))
    q, k, v = (_rows_contiguous(t) for t in (q, k, v))
    batch, heads, d, n = q.shape
    bh = batch * heads
    d_pad = padded_d(d)
    n_branches = len(topk)
    dp_partial, _, splits = _split_gram(grad_out, v, with_norms=False)
    matrix = _matrix_config(d_pad)
    row_blocks = triton.cdiv(d, matrix["BLOCK_ROWS"])
    p = q.new_empty((bh, d, d), dtype=torch.float32)
    m = torch.empty_like(p)
    a_q = q.new_empty((bh, d), dtype=torch.float32)
    colsum_partial = q.new_empty((bh, row_blocks, d), dtype=torch.float32)
    dtau_partial = q.new_empty((batch, heads, row_blocks), dtype=torch.float32)
    dw_partial = q.new_empty((bh * row_blocks, n_branches), dtype=torch.float32)
    branch, weights32, temperature32 = _branch_table(topk, activation, weights, temperature)
    launch(attention_matrix_backward_kernel, (bh, row_blocks),
            gram.contiguous(), dp_partial, temperature32, weights32, branch,
            q_norm.contiguous(), p, m, a_q, colsum_partial, dtau_partial, dw_partial,
            heads, d, splits, n_branches,
            D_PAD=d_pad, BLOCK_ROWS=matrix["BLOCK_ROWS"], num_warps=matrix["num_warps"])
    dq = torch.empty((batch, heads, d, n), dtype=q.dtype, device=q.device)
    dk = torch.empty_like(dq)
    dv = torch.empty_like(dq)
    stream = _stream_config(d_pad, q.dtype)
    launch(attention_input_grads_kernel, (bh, triton.cdiv(n, stream["BLOCK_N"])),
            q, k, grad_out, m, p, a_q, colsum_partial, q_norm.contiguous(), k_norm.contiguous(), dq, dk, dv,
            heads, d, n, row_blocks, *q.stride()[:3], *k.stride()[:3], *grad_out.stride()[:3],
            D_PAD=d_pad, BLOCK_N=stream["BLOCK_N"], K_CHUNK=stream["K_CHUNK"],
            DOT_PRECISION=_dot_precision(q.dtype), num_warps=stream["num_warps"])
    # Fixed-shape sums over tiny tensors: deterministic.
    grad_temperature = dtau_partial.sum(dim=(0, 2)).to(temperature.dtype)
    grad_weights = dw_partial.sum(dim=0).to(weights.dtype)
    return dq, dk, dv, grad_temperature, grad_weights
