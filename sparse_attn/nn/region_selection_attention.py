"""Region selection attention: LAA-Transformer's coarse-to-fine self-attention, on the
block-sparse attention op. A reconstruction.

LAA-Transformer (Li et al., "Learning Attention from Attention: Efficient Self-Refinement
Transformer for Face Super-Resolution", IJCAI 2023) published no code. What its text says: a
*primary* self-attention first reconstructs coarse textures and detects the regions that need
further compensation; a *region selection attention* then refines the textures on those key
regions only. Everything more precise is ours, read as bi-level routing attention (BiFormer, Zhu
et al., CVPR 2023), and each choice is a constructor argument:

- regions are the p x p tiles of the map (``region_size``), row-major;
- the primary attention is softmax attention between region means of q, k and v, R x R per head
  (scale d^-1/2, as BiFormer's router); its output, one vector per region, is spread back over
  the region's pixels (``coarse_upsample``: "nearest" or "bilinear") — the coarse result;
- each query region reads the t key regions with the largest primary scores (ties: the lower
  region index): t = ``topk_regions`` when given (at most R), else ceil(``topk_fraction`` · R)
  (default a quarter of the regions); the selection carries no gradient;
- the fine attention is ordinary softmax attention (scale d^-1/2) of every pixel over the pixels
  of its region's selected key regions: :func:`sparse_attn.block_sparse_attention`;
- coarse and fine are combined (``combine``): "sum", or "gate", a learnable per-channel mix
  ``sigmoid(g)·fine + (1 - sigmoid(g))·coarse`` (g starts at 0, an even mix);
- the text can also be read as the primary attention choosing *which query regions* get
  refined; we follow the routing reading (every query region refined, over chosen key regions),
  which keeps the work per region fixed;
- q, k, v come from a 1x1 convolution and a 3x3 depthwise one, and the result goes through a 1x1
  ``project_out``, as in Restormer's attention (same parameter names).

Sizes that are not multiples of the region are padded at the bottom and right and cropped back,
*exactly*: the padded pixels take no part. The region means are over real pixels only, and the
fine attention gives padded keys no weight (an extra channel, 1 on every query and a large
negative constant on padded keys, so their scores underflow to zero weight; see MASK_SCORE).
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.block_sparse_attention import block_sparse_attention
from .depthwise import depthwise
from .input_checks import autocast_parameters, check_feature_map
from .pointwise import PointwiseConv2d

COMBINE_MODES = ("sum", "gate")
COARSE_UPSAMPLE_MODES = ("nearest", "bilinear")
# The padded keys' extra channel. Their scores are d^-1/2 · (-MASK_SCORE): below -100 for any d
# up to 9000 channels per head, so exp() underflows to 0 even in float32 against scores near 0;
# 1e4 is representable in float16 and bfloat16 (autocast).
MASK_SCORE = 1e4


def selected_count(num_regions, topk_regions, topk_fraction):
    """t, the key regions each query region reads: ``topk_regions`` (at most R) when given, else
    ceil(topk_fraction · R); at least 1."""
    if topk_regions is not None:
        return min(topk_regions, num_regions)
    return max(1, min(num_regions, math.ceil(topk_fraction * num_regions)))


def top_regions(scores, t):
    """The indices of the t largest primary scores of each row, (..., R, t) int64: a stable
    descending sort, so ties go to the lower region index whatever the device."""
    return torch.sort(scores.detach(), dim=-1, descending=True, stable=True).indices[..., :t].contiguous()


class RegionSelectionAttention(nn.Module):
    """Coarse-to-fine region selection attention (see the module docstring for the design and
    which parts are the paper's and which are ours).

    Args:
        dim: channels of the input, divided among ``num_heads`` heads of d = dim / num_heads.
        num_heads: attention heads.
        region_size: p, the side of the square regions (8).
        topk_regions: t, key regions per query region; None: ceil(topk_fraction · R). A t larger
            than the R of an input reads every region (dense attention).
        bias: bias in the 1x1 and depthwise convolutions (False, as Restormer).
        topk_fraction: the fraction of the R regions read when ``topk_regions`` is None (1/4).
        combine: "sum" (default) or "gate" (learnable per-channel ``combine_gate``).
        coarse_upsample: how region vectors are spread over their pixels: "nearest" (default)
            or "bilinear" (align_corners=False, between region centres).
        backend: the op's backend ("auto" honours :func:`sparse_attn.use_backend`).

    ``forward``: (B, dim, H, W) -> (B, dim, H, W), any H, W >= 1.
    """

    def __init__(self, dim, num_heads, region_size=8, topk_regions=None, bias=False, topk_fraction=0.25,
                 combine="sum", coarse_upsample="nearest", backend="auto"):
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"num_heads: {num_heads} does not divide dim = {dim}")
        if not isinstance(region_size, int) or region_size < 1:
            raise ValueError(f"region_size: expected a positive integer, got {region_size!r}")
        if topk_regions is not None and (not isinstance(topk_regions, int) or topk_regions < 1):
            raise ValueError(f"topk_regions: expected None or a positive integer, got {topk_regions!r}")
        if not 0 < topk_fraction <= 1:
            raise ValueError(f"topk_fraction: expected a fraction in (0, 1], got {topk_fraction!r}")
        if combine not in COMBINE_MODES:
            raise ValueError(f"combine: expected one of {COMBINE_MODES}, got {combine!r}")
        if coarse_upsample not in COARSE_UPSAMPLE_MODES:
            raise ValueError(f"coarse_upsample: expected one of {COARSE_UPSAMPLE_MODES}, got {coarse_upsample!r}")
        self.dim, self.num_heads, self.region_size = dim, num_heads, region_size
        self.topk_regions, self.topk_fraction = topk_regions, topk_fraction
        self.combine, self.coarse_upsample, self.backend = combine, coarse_upsample, backend
        self.qkv = PointwiseConv2d(dim, dim * 3, bias=bias, backend=backend)
        self.qkv_dwconv = nn.Conv2d(dim * 3, dim * 3, kernel_size=3, stride=1, padding=1, groups=dim * 3, bias=bias)
        self.combine_gate = nn.Parameter(torch.zeros(dim)) if combine == "gate" else None
        self.project_out = PointwiseConv2d(dim, dim, bias=bias, backend=backend)

    def forward(self, x):
        """(B, dim, H, W) -> (B, dim, H, W)."""
        check_feature_map(self, x, self.dim)
        b, c, h, w = x.shape
        q, k, v = depthwise(self.qkv_dwconv, self.qkv(x), self.backend).chunk(3, dim=1)
        if b == 0:  # the op takes no empty tensor; the attention of an empty batch is that empty batch
            return self.project_out(v)
        heads, d, p = self.num_heads, c // self.num_heads, self.region_size
        pad_h, pad_w = (-h) % p, (-w) % p
        q, k, v = (F.pad(t, (0, pad_w, 0, pad_h)).reshape(b, heads, d, h + pad_h, w + pad_w) for t in (q, k, v))
        coarse, key_blocks = self.primary_attention(q, k, v, (h, w))
        fine = self.fine_attention(q, k, v, key_blocks, (h, w))
        out = self.combined(coarse, fine).reshape(b, c, h + pad_h, w + pad_w)[..., :h, :w]
        return self.project_out(out)

    def region_means(self, t, size):
        """(B, heads, d, Hp, Wp) zero-padded map -> (B, heads, d, R): the mean of each region over
        the real pixels of the first ``size`` = (H, W) rows and columns."""
        b, heads, d, hp, wp = t.shape
        p = self.region_size
        sums = F.avg_pool2d(t.reshape(b, heads * d, hp, wp), p, divisor_override=1)
        counts = F.avg_pool2d(t.new_ones(1, 1, *size), p, ceil_mode=True, divisor_override=1)
        return (sums / counts).reshape(b, heads, d, -1)

    def primary_attention(self, q, k, v, size):
        """The coarse result (B, heads, d, Hp, Wp) and the selected key regions (B, heads, R, t)."""
        b, heads, d, hp, wp = q.shape
        p = self.region_size
        q_r, k_r, v_r = (self.region_means(t, size) for t in (q, k, v))
        scores = torch.einsum("bhdr,bhds->bhrs", q_r, k_r) * d ** -0.5
        regions = torch.einsum("bhrs,bhds->bhdr", scores.softmax(dim=-1), v_r)
        regions = regions.reshape(b, heads * d, hp // p, wp // p)
        if self.coarse_upsample == "nearest":
            coarse = regions.repeat_interleave(p, dim=-2).repeat_interleave(p, dim=-1)
        else:
            coarse = F.interpolate(regions, scale_factor=p, mode="bilinear", align_corners=False)
        t = selected_count(scores.shape[-1], self.topk_regions, self.topk_fraction)
        return coarse.reshape(b, heads, d, hp, wp), top_regions(scores, t)

    def fine_attention(self, q, k, v, key_blocks, size):
        """Attention of every pixel over its region's selected key regions, the padded keys
        (beyond ``size``) excluded through an extra channel (see MASK_SCORE)."""
        b, heads, d, hp, wp = q.shape
        h, w = size
        if (hp, wp) != (h, w):
            padded = torch.ones(hp, wp, dtype=torch.bool, device=q.device)
            padded[:h, :w] = False
            q = torch.cat([q, q.new_ones(b, heads, 1, hp, wp)], dim=2)
            k = torch.cat([k, (padded * -MASK_SCORE).to(k.dtype).expand(b, heads, 1, hp, wp)], dim=2)
            v = torch.cat([v, v.new_zeros(b, heads, 1, hp, wp)], dim=2)
        p = self.region_size
        out = block_sparse_attention(q, k, v, key_blocks, region=(p, p), scale=d ** -0.5, backend=self.backend)
        return out[:, :, :d]

    def combined(self, coarse, fine):
        if self.combine == "sum":
            return coarse + fine
        (gate,) = autocast_parameters(fine, self.combine_gate)
        gate = torch.sigmoid(gate).reshape(self.num_heads, -1, 1, 1)
        return gate * fine + (1 - gate) * coarse

    def extra_repr(self):
        t = self.topk_regions if self.topk_regions is not None else f"ceil({self.topk_fraction}·R)"
        return (f"dim={self.dim}, num_heads={self.num_heads}, region_size={self.region_size}, topk_regions={t}, "
                f"combine={self.combine!r}, coarse_upsample={self.coarse_upsample!r}, backend={self.backend!r}")
