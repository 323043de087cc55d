"""LAA-Transformer for face super-resolution: a reconstruction.

Li et al., "Learning Attention from Attention: Efficient Self-Refinement Transformer for Face
Super-Resolution" (IJCAI 2023) published no code (their repository holds a README and an
architecture figure). From the paper's text and figure: a 3x3 head; a four-level U-Net of
transformer blocks whose attention is the coarse-to-fine *region selection attention*
(:class:`sparse_attn.nn.RegionSelectionAttention`, itself a reconstruction); a *dual-branch
feature integration* that privileges the important channels, because self-attention weighs every
channel of a token alike; a *wavelet fusion module* that brings the shallow (encoder) structure
into the deep (decoder) features in the frequency domain; a residual to the upsampled input;
x8 face SR (16x16 -> 128x128). Our choices, each a constructor argument or stated here:

- the input is bicubic-upsampled by ``scale`` first and the network learns the residual to it;
- blocks are pre-norm: ``x + attn(n) + integration(n)`` with ``n = norm1(x)``, then
  ``x + ffn(norm2(x))``, with Restormer's channel LayerNorm and gated-Dconv feed-forward
  (:class:`sparse_attn.nn.GatedDconvFFN`); the feature integration is the second branch beside
  the attention (``feature_integration=False`` drops it);
- the feature integration (:class:`ChannelGatedIntegration`): a local branch (1x1, 3x3
  depthwise, GELU) times a channel gate (global average, 1x1 down by ``gate_reduction``, ReLU,
  1x1, sigmoid), then a 1x1 projection;
- levels of ``dim·2^l`` channels, down by a 3x3 convolution and a 2x pixel-unshuffle, up by a
  3x3 convolution and a 2x pixel-shuffle (Restormer's);
- the wavelet fusion (:class:`WaveletFusion`) replaces the U-Net's skip concatenation: the
  orthonormal Haar transform of the encoder level (four sub-bands at half resolution, the
  deeper level's resolution) is fused with the deeper decoder features by a 1x1 convolution
  into four new sub-bands, inverted back to full resolution, and joined with the learned
  upsampling of the deeper features by a 1x1 convolution.
"""
import functools

import torch
import torch.nn.functional as F
from torch import nn

from sparse_attn.nn import GatedDconvFFN, RegionSelectionAttention
from sparse_attn.nn.input_checks import check_feature_map

from .checkpoint import CheckpointMixin
from .common import Downsample, OverlapPatchEmbed, TransformerBlock, Upsample, pad_to_multiple

SIZE_MULTIPLE = 8  # three 2x pixel-unshuffles

# The orthonormal 2x2 Haar analysis of the pixels (a, b; c, d) of each 2x2 cell, one row per
# sub-band LL, LH, HL, HH. It is symmetric and its own inverse, so synthesis uses it too.
_HAAR = torch.tensor([[1.0, 1.0, 1.0, 1.0],
                      [1.0, -1.0, 1.0, -1.0],
                      [1.0, 1.0, -1.0, -1.0],
                      [1.0, -1.0, -1.0, 1.0]]) / 2


def haar_dwt(x):
    """One level of the orthonormal 2-D Haar transform: (B, C, 2h, 2w) -> (B, 4C, h, w), the
    sub-bands LL, LH, HL, HH as four consecutive groups of C channels."""
    b, c, h, w = x.shape
    cells = F.pixel_unshuffle(x, 2).reshape(b, c, 4, h // 2, w // 2)
    return torch.einsum("kq,bcqhw->bkchw", _HAAR.to(x), cells).reshape(b, 4 * c, h // 2, w // 2)


def haar_idwt(bands):
    """The inverse of :func:`haar_dwt`: (B, 4C, h, w) -> (B, C, 2h, 2w)."""
    b, c4, h, w = bands.shape
    cells = torch.einsum("qk,bkchw->bcqhw", _HAAR.to(bands), bands.reshape(b, 4, c4 // 4, h, w))
    return F.pixel_shuffle(cells.reshape(b, c4, h, w), 2)


class WaveletFusion(nn.Module):
    """Decoder step with the wavelet skip: deep (B, 2C, h, w) and the encoder's map
    (B, C, 2h, 2w) -> (B, C, 2h, 2w). See the module docstring."""

    def __init__(self, channels, bias=False):
        super().__init__()
        self.fuse_bands = nn.Conv2d(6 * channels, 4 * channels, kernel_size=1, bias=bias)
        self.up = Upsample(2 * channels)
        self.reduce = nn.Conv2d(2 * channels, channels, kernel_size=1, bias=bias)

    def forward(self, deep, skip):
        bands = self.fuse_bands(torch.cat([haar_dwt(skip), deep], dim=1))
        return self.reduce(torch.cat([haar_idwt(bands), self.up(deep)], dim=1))


class ChannelGatedIntegration(nn.Module):
    """The feature-integration branch: ``project(local(x) * gate(x))``, where ``local`` is a 1x1
    and a 3x3 depthwise convolution with GELU, and ``gate`` a squeeze-and-excitation channel gate
    (global average, 1x1 to dim / reduction, ReLU, 1x1, sigmoid; with biases)."""

    def __init__(self, dim, bias=False, reduction=4):
        super().__init__()
        hidden = max(1, dim // reduction)
        self.local = nn.Sequential(nn.Conv2d(dim, dim, kernel_size=1, bias=bias),
                                   nn.Conv2d(dim, dim, kernel_size=3, padding=1, groups=dim, bias=bias),
                                   nn.GELU())
        self.gate = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(dim, hidden, kernel_size=1), nn.ReLU(),
                                  nn.Conv2d(hidden, dim, kernel_size=1), nn.Sigmoid())
        self.project = nn.Conv2d(dim, dim, kernel_size=1, bias=bias)

    def forward(self, x):
        return self.project(self.local(x) * self.gate(x))


class RegionSelectionBlock(TransformerBlock):
    """``n = norm1(x); x = x + attn(n) + integration(n); x = x + ffn(norm2(x))``; without the
    integration branch (``integration=None``), Restormer's block."""

    def __init__(self, dim, num_heads, ffn_expansion_factor, bias, LayerNorm_type, attention,  # noqa: N803
                 feedforward, integration=None, backend="auto"):
        super().__init__(dim, num_heads, ffn_expansion_factor, bias, LayerNorm_type, attention, feedforward, backend)
        self.integration = integration(dim, bias) if integration is not None else None

    def forward(self, x):
        if self.integration is None:
            return super().forward(x)
        normed = self.norm1(x)
        x = x + self.attn(normed) + self.integration(normed)
        return x + self.ffn(self.norm2(x))


def _attention(dim, num_heads, bias, **options):
    """The block's attention, called as TransformerBlock calls it (bias third)."""
    return RegionSelectionAttention(dim, num_heads, bias=bias, **options)


class LAATransformer(CheckpointMixin, nn.Module):
    """LAA-Transformer, face super-resolution (reconstruction; see the module docstring).

    Args:
        inp_channels, out_channels: image channels (3).
        scale: the upscaling factor (8: 16x16 -> 128x128).
        dim: channels of the first level; level l has dim·2^l (32).
        num_blocks: blocks per level, encoder and decoder alike, the last the bottleneck ((2, 2, 2, 2)).
        heads: attention heads per level ((1, 2, 4, 8)).
        region_size: the side of the attention's regions (8).
        topk_regions: key regions each query region reads; None: a quarter of the regions
            (at least one) at every level.
        ffn_expansion_factor: the feed-forward's hidden width over dim (2.66, as Restormer).
        bias: biases in the convolutions (False, as Restormer).
        LayerNorm_type: "WithBias" or "BiasFree".
        combine: how the attention joins coarse and fine, "sum" or "gate".
        feature_integration: the channel-gated integration branch in every block (True).
        gate_reduction: the channel gate's reduction (4).
        backend: the op backend of every block ("auto" honours :func:`sparse_attn.use_backend`).

    ``forward``: (B, inp_channels, h, w) -> (B, out_channels, scale·h, scale·w), any h, w.
    """

    def __init__(self, inp_channels=3, out_channels=3, scale=8, dim=32, num_blocks=(2, 2, 2, 2), heads=(1, 2, 4, 8),
                 region_size=8, topk_regions=None, ffn_expansion_factor=2.66, bias=False,
                 LayerNorm_type="WithBias", combine="sum", feature_integration=True, gate_reduction=4,  # noqa: N803
                 backend="auto"):
        super().__init__()
        for name, value in (("num_blocks", num_blocks), ("heads", heads)):
            if len(value) != 4:
                raise ValueError(f"{name}: expected 4 values (one per level), got {list(value)}")
        if not isinstance(scale, int) or scale < 1:
            raise ValueError(f"scale: expected a positive integer, got {scale!r}")
        if out_channels != inp_channels:
            raise ValueError(f"out_channels: the residual to the upsampled input needs out_channels == inp_channels "
                             f"= {inp_channels}, got {out_channels}")
        self.inp_channels, self.out_channels, self.scale = inp_channels, out_channels, scale
        self.dim, self.region_size, self.topk_regions = dim, region_size, topk_regions
        dims = [dim * 2 ** level for level in range(4)]
        block = functools.partial(
            RegionSelectionBlock, ffn_expansion_factor=ffn_expansion_factor, bias=bias, LayerNorm_type=LayerNorm_type,
            attention=functools.partial(_attention, region_size=region_size, topk_regions=topk_regions, combine=combine,
                                        backend=backend),
            feedforward=functools.partial(GatedDconvFFN, backend=backend),
            integration=functools.partial(ChannelGatedIntegration, reduction=gate_reduction)
            if feature_integration else None,
            backend=backend)

        def level(index):
            return nn.Sequential(*[block(dims[index], heads[index]) for _ in range(num_blocks[index])])

        self.patch_embed = OverlapPatchEmbed(inp_channels, dim, bias)
        self.encoder_level1 = level(0)
        self.down1_2 = Downsample(dims[0])
        self.encoder_level2 = level(1)
        self.down2_3 = Downsample(dims[1])
        self.encoder_level3 = level(2)
        self.down3_4 = Downsample(dims[2])
        self.latent = level(3)
        self.fuse4_3 = WaveletFusion(dims[2], bias)
        self.decoder_level3 = level(2)
        self.fuse3_2 = WaveletFusion(dims[1], bias)
        self.decoder_level2 = level(1)
        self.fuse2_1 = WaveletFusion(dims[0], bias)
        self.decoder_level1 = level(0)
        self.output = nn.Conv2d(dims[0], out_channels, kernel_size=3, padding=1, bias=bias)

    def forward(self, inp_img):
        """(B, inp_channels, h, w) -> (B, out_channels, scale·h, scale·w)."""
        check_feature_map(self, inp_img, self.inp_channels, name="inp_img")
        b, _, h, w = inp_img.shape
        size = (self.scale * h, self.scale * w)
        if b == 0:
            return inp_img.new_empty((0, self.out_channels, *size))
        upsampled = F.interpolate(inp_img, size=size, mode="bicubic", align_corners=False)
        return self._forward_padded(pad_to_multiple(upsampled, SIZE_MULTIPLE))[..., :size[0], :size[1]]

    def _forward_padded(self, upsampled):
        enc1 = self.encoder_level1(self.patch_embed(upsampled))
        enc2 = self.encoder_level2(self.down1_2(enc1))
        enc3 = self.encoder_level3(self.down2_3(enc2))
        x = self.latent(self.down3_4(enc3))
        x = self.decoder_level3(self.fuse4_3(x, enc3))
        x = self.decoder_level2(self.fuse3_2(x, enc2))
        x = self.decoder_level1(self.fuse2_1(x, enc1))
        return self.output(x) + upsampled

    def _config_summary(self):
        return f"dim={self.dim}, scale={self.scale}, region_size={self.region_size}"
