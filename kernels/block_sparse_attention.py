"""Triton kernels of block-sparse region attention (DESIGN.md §4) and their launchers.

    s_ij = scale·⟨q_i, k_j⟩ over the pixels j of the t key regions of i's region
    out_i = Σ_j softmax_j(s_ij) v_j;  lse_i = log Σ_j exp(s_ij)

One program per (query region, image·head). A region's P = p_h·p_w pixels are a (BLOCK_P, D_PAD)
tile (P and d padded to a tile side of at least 16, tl.dot's smallest dimension), gathered from
the (d, H, W) maps by their plane offsets.

  forward   walks the t key regions with an online softmax; stores out and the fp32 lse.
  grad_q    one program per query region: recomputes p_ij = exp(s_ij − lse_i) per key region and
            sums dq = scale·Σ_j p_ij(dp_ij − D_i) k_j, with dp_ij = ⟨dout_i, v_j⟩, D_i = ⟨dout_i, out_i⟩.
  grad_kv   one program per key region: walks the query regions that read it (the inverse index,
            ascending) and sums dv_j = Σ_i p_ij dout_i and dk_j = scale·Σ_i ds_ij q_i.

Every output element is written by one program in a fixed order: no atomics, the same bits on
every run. Inputs may be fp32, fp16 or bf16; products accumulate in fp32 (fp32 products with
input_precision="ieee", so that the interpreter and a GPU compute the same thing).
`launch_configurations()` lists every (kernel, signature, constexprs, options) the launchers can
choose, for ahead-of-time compilation in the tests.
"""
import torch
import triton
import triton.language as tl

from ._launch import aot_signature, launch

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_TRITON_TYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
# A program holds (P, P) score tiles and several (P, d) tiles: regions of up to 8 x 8 pixels and
# up to 64 channels per head (LAA's heads have 16). Tile sides: BLOCK_P one of _PAD_P, D_PAD one of
# _PAD_D (few sizes, so that ahead-of-time builds stay few).
MAX_D = 64
MAX_PIXELS = 64
_PAD_D = (16, 32, 64)
_PAD_P = (16, 64)


@triton.jit
def _region_offsets(region, width, region_h, region_w, BLOCK_P: tl.constexpr):
    """Plane offsets of the pixels of `region` (row-major regions and pixels) and their mask."""
    pixels = tl.arange(0, BLOCK_P)
    columns = width // region_w
    offsets = ((region // columns) * region_h + pixels // region_w) * width + (region % columns) * region_w \
        + pixels % region_w
    return offsets, pixels < region_h * region_w


@triton.jit
def _load_pixel_major(ptr, offsets, pixel_ok, d, plane, D_PAD: tl.constexpr):
    """(BLOCK_P, D_PAD) tile of a (d, plane) map at the given pixels, zero outside."""
    channels = tl.arange(0, D_PAD)
    mask = pixel_ok[:, None] & (channels[None, :] < d)
    return tl.load(ptr + channels[None, :].to(tl.int64) * plane + offsets[:, None], mask=mask, other=0.0)


@triton.jit
def _store_pixel_major(ptr, tile, offsets, pixel_ok, d, plane, D_PAD: tl.constexpr):
    channels = tl.arange(0, D_PAD)
    mask = pixel_ok[:, None] & (channels[None, :] < d)
    tl.store(ptr + channels[None, :].to(tl.int64) * plane + offsets[:, None], tile.to(ptr.dtype.element_ty),
             mask=mask)


@triton.jit
def block_sparse_attention_forward_kernel(q_ptr, k_ptr, v_ptr, key_blocks_ptr, out_ptr, lse_ptr, d, width, plane,
                                          regions, t, region_h, region_w, scale, BLOCK_P: tl.constexpr,
                                          D_PAD: tl.constexpr, DOT_PRECISION: tl.constexpr):
    region = tl.program_id(0)
    group = tl.program_id(1).to(tl.int64)
    base = group * d * plane
    q_off, q_ok = _region_offsets(region, width, region_h, region_w, BLOCK_P)
    q = _load_pixel_major(q_ptr + base, q_off, q_ok, d, plane, D_PAD)
    row_max = tl.full((BLOCK_P,), float("-inf"), tl.float32)
    row_sum = tl.zeros((BLOCK_P,), tl.float32)
    acc = tl.zeros((BLOCK_P, D_PAD), tl.float32)
    blocks = key_blocks_ptr + (group * regions + region) * t
    for slot in range(t):
        key_region = tl.load(blocks + slot)
        k_off, k_ok = _region_offsets(key_region, width, region_h, region_w, BLOCK_P)
        k = _load_pixel_major(k_ptr + base, k_off, k_ok, d, plane, D_PAD)
        v = _load_pixel_major(v_ptr + base, k_off, k_ok, d, plane, D_PAD)
        scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale
        scores = tl.where(k_ok[None, :], scores, float("-inf"))
        new_max = tl.maximum(row_max, tl.max(scores, axis=1))
        alpha = tl.exp(row_max - new_max)  # 0 on the first block (row_max = −∞)
        p = tl.exp(scores - new_max[:, None])
        row_sum = row_sum * alpha + tl.sum(p, axis=1)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
        row_max = new_max
    out = acc / row_sum[:, None]
    _store_pixel_major(out_ptr + base, out, q_off, q_ok, d, plane, D_PAD)
    tl.store(lse_ptr + group * plane + q_off, row_max + tl.log(row_sum), mask=q_ok)


@triton.jit
def _probabilities_and_score_grads(q, dout, k, v, lse, delta, k_ok, q_ok, scale, DOT_PRECISION: tl.constexpr):
    """p_ij = exp(s_ij − lse_i) and ds_ij = p_ij·(dp_ij − D_i) of one (query region, key region)
    pair, zero at padded pixels."""
    scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale
    p = tl.where(q_ok[:, None] & k_ok[None, :], tl.exp(scores - lse[:, None]), 0.0)
    dp = tl.dot(dout, tl.trans(v), input_precision=DOT_PRECISION)
    return p, p * (dp - delta[:, None])


@triton.jit
def block_sparse_attention_grad_q_kernel(q_ptr, k_ptr, v_ptr, grad_out_ptr, lse_ptr, delta_ptr, key_blocks_ptr,
                                         grad_q_ptr, d, width, plane, regions, t, region_h, region_w, scale,
                                         BLOCK_P: tl.constexpr, D_PAD: tl.constexpr,
                                         DOT_PRECISION: tl.constexpr):
    region = tl.program_id(0)
    group = tl.program_id(1).to(tl.int64)
    base = group * d * plane
    q_off, q_ok = _region_offsets(region, width, region_h, region_w, BLOCK_P)
    q = _load_pixel_major(q_ptr + base, q_off, q_ok, d, plane, D_PAD)
    dout = _load_pixel_major(grad_out_ptr + base, q_off, q_ok, d, plane, D_PAD)
    lse = tl.load(lse_ptr + group * plane + q_off, mask=q_ok, other=0.0)
    delta = tl.load(delta_ptr + group * plane + q_off, mask=q_ok, other=0.0)
    acc = tl.zeros((BLOCK_P, D_PAD), tl.float32)
    blocks = key_blocks_ptr + (group * regions + region) * t
    for slot in range(t):
        key_region = tl.load(blocks + slot)
        k_off, k_ok = _region_offsets(key_region, width, region_h, region_w, BLOCK_P)
        k = _load_pixel_major(k_ptr + base, k_off, k_ok, d, plane, D_PAD)
        v = _load_pixel_major(v_ptr + base, k_off, k_ok, d, plane, D_PAD)
        p, ds = _probabilities_and_score_grads(q, dout, k, v, lse, delta, k_ok, q_ok, scale, DOT_PRECISION)
        acc = tl.dot(ds.to(k.dtype), k, acc, input_precision=DOT_PRECISION)
    _store_pixel_major(grad_q_ptr + base, acc * scale, q_off, q_ok, d, plane, D_PAD)


@triton.jit
def block_sparse_attention_grad_kv_kernel(q_ptr, k_ptr, v_ptr, grad_out_ptr, lse_ptr, delta_ptr, offsets_ptr,
                                          readers_ptr, grad_k_ptr, grad_v_ptr, d, width, plane, regions, region_h,
                                          region_w, scale, BLOCK_P: tl.constexpr, D_PAD: tl.constexpr,
                                          DOT_PRECISION: tl.constexpr):
    region = tl.program_id(0)
    group = tl.program_id(1).to(tl.int64)
    base = group * d * plane
    k_off, k_ok = _region_offsets(region, width, region_h, region_w, BLOCK_P)
    k = _load_pixel_major(k_ptr + base, k_off, k_ok, d, plane, D_PAD)
    v = _load_pixel_major(v_ptr + base, k_off, k_ok, d, plane, D_PAD)
    acc_k = tl.zeros((BLOCK_P, D_PAD), tl.float32)
    acc_v = tl.zeros((BLOCK_P, D_PAD), tl.float32)
    entry = group * regions + region
    first = tl.load(offsets_ptr + entry)
    last = tl.load(offsets_ptr + entry + 1)
    for n in range(first, last):
        reader = tl.load(readers_ptr + n)
        q_off, q_ok = _region_offsets(reader, width, region_h, region_w, BLOCK_P)
        q = _load_pixel_major(q_ptr + base, q_off, q_ok, d, plane, D_PAD)
        dout = _load_pixel_major(grad_out_ptr + base, q_off, q_ok, d, plane, D_PAD)
        lse = tl.load(lse_ptr + group * plane + q_off, mask=q_ok, other=0.0)
        delta = tl.load(delta_ptr + group * plane + q_off, mask=q_ok, other=0.0)
        p, ds = _probabilities_and_score_grads(q, dout, k, v, lse, delta, k_ok, q_ok, scale, DOT_PRECISION)
        acc_v = tl.dot(tl.trans(p).to(dout.dtype), dout, acc_v, input_precision=DOT_PRECISION)
        acc_k = tl.dot(tl.trans(ds).to(q.dtype), q, acc_k, input_precision=DOT_PRECISION)
    _store_pixel_major(grad_k_ptr + base, acc_k * scale, k_off, k_ok, d, plane, D_PAD)
    _store_pixel_major(grad_v_ptr + base, acc_v, k_off, k_ok, d, plane, D_PAD)


# ---------------------------------------------------------------------------------------------
# Launch configurations: the one place that chooses block sizes (launchers and AOT tests)
# ---------------------------------------------------------------------------------------------
def _tile(n, sides):
    """The smallest tile side in ``sides`` that holds n (16 is tl.dot's smallest dimension)."""
    return next(side for side in sides if side >= n)


def _dot_precision(dtype):
    return "ieee" if dtype == torch.float32 else "tf32"  # the latter is unused by fp16/bf16 products


def _num_warps(block_p, d_pad):
    """Warps per program: 4, 8 for the largest tiles (64 pixels x 64 channels). (Chosen, not
    tuned: no GPU was at hand to time it.)"""
    return 8 if block_p * d_pad >= 64 * 64 else 4


def _kernel_config(x, region_pixels):
    block_p, d_pad = _tile(region_pixels, _PAD_P), _tile(x.shape[2], _PAD_D)
    return {"BLOCK_P": block_p, "D_PAD": d_pad, "DOT_PRECISION": _dot_precision(x.dtype),
            "num_warps": _num_warps(block_p, d_pad)}


def launch_configurations():
    """Every (kernel, signature, constexprs, options) the launchers below can choose."""
    configs = []
    pointer_names = {
        block_sparse_attention_forward_kernel: ("q_ptr", "k_ptr", "v_ptr", "out_ptr"),
        block_sparse_attention_grad_q_kernel: ("q_ptr", "k_ptr", "v_ptr", "grad_out_ptr", "grad_q_ptr"),
        block_sparse_attention_grad_kv_kernel: ("q_ptr", "k_ptr", "v_ptr", "grad_out_ptr", "grad_k_ptr", "grad_v_ptr"),
    }
    index_types = {"key_blocks_ptr": "i64", "offsets_ptr": "i64", "readers_ptr": "i64"}
    for dtype in DTYPES:
        t = _TRITON_TYPE_NAMES[dtype]
        for block_p in _PAD_P:
            for d_pad in _PAD_D:
                cx = {"BLOCK_P": block_p, "D_PAD": d_pad, "DOT_PRECISION": _dot_precision(dtype)}
                for kernel, names in pointer_names.items():
                    signature = aot_signature(kernel, cx, {**{n: t for n in names}, **index_types})
                    configs.append((kernel, {**signature, "scale": "fp32"}, cx,
                                    {"num_warps": _num_warps(block_p, d_pad)}))
    return configs


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------
def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_blocks: torch.Tensor, region_h: int,
            region_w: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The op's forward: out (q's dtype and shape, contiguous) and the log-sum-exp of every query
    pixel's scores, (B, heads, H, W) in fp32.

    q, k, v: (B, heads, d, H, W) fp32/fp16/bf16; key_blocks (B, heads, R, t) int64."""
    q, k, v, key_blocks = q.contiguous(), k.contiguous(), v.contiguous(), key_blocks.contiguous()
    batch, heads, d, height, width = q.shape
    regions, t = key_blocks.shape[2], key_blocks.shape[3]
    out = torch.empty_like(q)
    lse = q.new_empty((batch, heads, height, width), dtype=torch.float32)
    cfg = _kernel_config(q, region_h * region_w)
    launch(block_sparse_attention_forward_kernel, (regions, batch * heads), q, k, v, key_blocks, out, lse, d, width,
           height * width, regions, t, region_h, region_w, scale, BLOCK_P=cfg["BLOCK_P"], D_PAD=cfg["D_PAD"],
           DOT_PRECISION=cfg["DOT_PRECISION"], num_warps=cfg["num_warps"])
    return out, lse


def _inverse_index(key_blocks, groups, regions, t):
    """For every (image·head g, key region s), the query regions that read s, ascending:
    readers[offsets[g·R + s] : offsets[g·R + s + 1]] (a stable sort keeps the order fixed)."""
    keys = (key_blocks.reshape(groups, regions * t)
            + torch.arange(groups, device=key_blocks.device)[:, None] * regions).reshape(-1)
    order = torch.sort(keys, stable=True).indices
    readers = torch.div(order % (regions * t), t, rounding_mode="floor")
    counts = torch.bincount(keys, minlength=groups * regions)
    offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
    return offsets, readers


def backward(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
             lse: torch.Tensor, key_blocks: torch.Tensor, region_h: int, region_w: int, scale: float
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The op's backward from the saved q, k, v, out, lse and key_blocks: the gradients of q, k
    and v, each of q's dtype and shape."""
    q, k, v, key_blocks = q.contiguous(), k.contiguous(), v.contiguous(), key_blocks.contiguous()
    grad_out = grad_out.to(q.dtype).contiguous()
    batch, heads, d, height, width = q.shape
    regions, t = key_blocks.shape[2], key_blocks.shape[3]
    groups, plane = batch * heads, height * width
    delta = (grad_out.float() * out.float()).sum(2).contiguous()  # D = ⟨dout, out⟩ per pixel
    offsets, readers = _inverse_index(key_blocks, groups, regions, t)
    lse = lse.contiguous()
    grad_q, grad_k, grad_v = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    cfg = _kernel_config(q, region_h * region_w)
    blocks = {"BLOCK_P": cfg["BLOCK_P"], "D_PAD": cfg["D_PAD"], "DOT_PRECISION": cfg["DOT_PRECISION"],
              "num_warps": cfg["num_warps"]}
    launch(block_sparse_attention_grad_q_kernel, (regions, groups), q, k, v, grad_out, lse, delta, key_blocks, grad_q,
           d, width, plane, regions, t, region_h, region_w, scale, **blocks)
    launch(block_sparse_attention_grad_kv_kernel, (regions, groups), q, k, v, grad_out, lse, delta, offsets, readers,
           grad_k, grad_v, d, width, plane, regions, region_h, region_w, scale, **blocks)
    return grad_q, grad_k, grad_v
