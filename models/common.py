"""Building blocks shared by the Restormer-family networks (Restormer, DRSformer, DSGformer).

The module and parameter names are those of the official Restormer and DRSformer code, so that
their checkpoints load unchanged; the attention and feed-forward modules come from
:mod:`sparse_attn.nn`, so that :func:`sparse_attn.use_backend` switches every block at once.
"""
import torch
import torch.nn.functional as F
from torch import nn

from sparse_attn.backends import requested, use_backend
from sparse_attn.nn import LayerNorm2d
from sparse_attn.nn.input_checks import check_feature_map
from sparse_attn.nn.recompute import saved_as_recipe

from .checkpoint import CheckpointMixin

SIZE_MULTIPLE = 8  # three 2x pixel-unshuffles


class TransformerBlock(nn.Module):
    """``x = x + attn(norm1(x)); x = x + ffn(norm2(x))`` (Restormer's block; DRSformer's STB).

    attention: called as ``attention(dim, num_heads, bias)``, e.g. a module class or a
        ``functools.partial`` of one carrying its other arguments.
    feedforward: called as ``feedforward(dim, ffn_expansion_factor, bias)``.
    backend: the norms' op backend ("auto" honours :func:`sparse_attn.use_backend`).
    """

    def __init__(self, dim, num_heads, ffn_expansion_factor, bias, LayerNorm_type, attention,  # noqa: N803
                 feedforward, backend="auto"):
        super().__init__()
        self.norm1 = LayerNorm2d(dim, LayerNorm_type, backend=backend)
        self.attn = attention(dim, num_heads, bias)
        self.norm2 = LayerNorm2d(dim, LayerNorm_type, backend=backend)
        self.ffn = feedforward(dim, ffn_expansion_factor, bias)

    def forward(self, x):
        x = x + _normalised(self.norm1, self.attn, x)
        return x + _normalised(self.norm2, self.ffn, x)


def _normalised(norm, sublayer, x):
    """``sublayer(norm(x))``, saving less for backward: the norm's backward keeps x, and the
    sublayer's first convolution would keep norm(x) as well; backward makes norm(x) again from x
    instead (one norm forward, on the backend the forward ran on)."""
    y = norm(x)
    backend, kept = requested(norm.backend), x.detach()
    if backend == "reference":  # the reference backend keeps what the official code keeps
        return sublayer(y)

    def again():
        with use_backend(backend):
            return norm(kept)

    with saved_as_recipe(y, again):
        return sublayer(y)


class OverlapPatchEmbed(nn.Module):
    """The 3x3 convolution that embeds the image (official name, ``proj``)."""

    def __init__(self, in_c=3, embed_dim=48, bias=False):
        super().__init__()
        self.proj = nn.Conv2d(in_c, embed_dim, kernel_size=3, stride=1, padding=1, bias=bias)

    def forward(self, x):
        return self.proj(x)


class Downsample(nn.Module):
    """3x3 conv to n_feat/2 channels, then pixel-unshuffle by 2: (n_feat, H, W) -> (2 n_feat, H/2, W/2)."""

    def __init__(self, n_feat):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(n_feat, n_feat // 2, kernel_size=3, stride=1, padding=1, bias=False),
                                  nn.PixelUnshuffle(2))

    def forward(self, x):
        return self.body(x)


class Upsample(nn.Module):
    """3x3 conv to 2 n_feat channels, then pixel-shuffle by 2: (n_feat, H, W) -> (n_feat/2, 2H, 2W)."""

    def __init__(self, n_feat):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(n_feat, n_feat * 2, kernel_size=3, stride=1, padding=1, bias=False),
                                  nn.PixelShuffle(2))

    def forward(self, x):
        return self.body(x)


def pad_to_multiple(x, multiple=SIZE_MULTIPLE):
    """Reflect-pad the bottom and right of a (B, C, H, W) map to multiples of ``multiple``, as the
    official test scripts do before calling the network."""
    h, w = x.shape[-2:]
    pad_h, pad_w = (-h) % multiple, (-w) % multiple
    if pad_h == 0 and pad_w == 0:
        return x
    if pad_h >= h or pad_w >= w:
        raise ValueError(f"input: {h}x{w} is too small to be reflect-padded to a multiple of {multiple} "
                         f"(reflect padding by p needs more than p rows and columns)")
    return F.pad(x, (0, pad_w, 0, pad_h), mode="reflect")


class RestorationUNet(CheckpointMixin, nn.Module):
    """The four-level U-Net of Restormer that DRSformer and DSGformer reuse.

    patch_embed -> [encoder_level0] -> encoder_level1 -> down -> ... -> latent -> up, concatenate
    the skip, 1x1 reduce (not at level 1) -> decoders -> refinement -> [+ skip_conv] -> output.
    Attributes carry the official names. Subclasses pass the block factory (called as
    ``block(dim, num_heads)``) and factories (called with no argument) of the optional pieces,
    which are built in the official order so that a seeded initialisation draws the same numbers:

    stem: module after patch_embed, registered as ``encoder_level0`` (DRSformer's MEFC).
    refinement: module after decoder_level1 (Restormer's refinement blocks, DRSformer's MEFC).
    skip_conv: Restormer's dual-pixel 1x1 from the embedding to the output; when given, the
        output is ``output(refined + skip_conv(embedding))`` with no global residual.

    ``forward`` takes images of any size: it reflect-pads to a multiple of 8 (what the official
    test scripts do outside the network) and crops the result back. Checkpoints load with
    ``load_pretrained`` / ``from_pretrained`` (:class:`~sparse_attn.models.checkpoint.CheckpointMixin`).
    """

    def __init__(self, inp_channels, out_channels, dim, num_blocks, heads, bias, block, *, stem=None,
                 refinement=None, skip_conv=None):
        super().__init__()
        for name, value in (("num_blocks", num_blocks), ("heads", heads)):
            if len(value) != 4:
                raise ValueError(f"{name}: expected 4 values (one per level), got {list(value)}")
        self.inp_channels, self.out_channels = inp_channels, out_channels
        dims = [int(dim * 2 ** level) for level in range(4)]

        def level(d, num_heads, count):
            return nn.Sequential(*[block(d, num_heads) for _ in range(count)])

        self.patch_embed = OverlapPatchEmbed(inp_channels, dim)
        self.encoder_level0 = stem() if stem is not None else None
        self.encoder_level1 = level(dims[0], heads[0], num_blocks[0])
        self.down1_2 = Downsample(dims[0])
        self.encoder_level2 = level(dims[1], heads[1], num_blocks[1])
        self.down2_3 = Downsample(dims[1])
        self.encoder_level3 = level(dims[2], heads[2], num_blocks[2])
        self.down3_4 = Downsample(dims[2])
        self.latent = level(dims[3], heads[3], num_blocks[3])
        self.up4_3 = Upsample(dims[3])
        self.reduce_chan_level3 = nn.Conv2d(dims[3], dims[2], kernel_size=1, bias=bias)
        self.decoder_level3 = level(dims[2], heads[2], num_blocks[2])
        self.up3_2 = Upsample(dims[2])
        self.reduce_chan_level2 = nn.Conv2d(dims[2], dims[1], kernel_size=1, bias=bias)
        self.decoder_level2 = level(dims[1], heads[1], num_blocks[1])
        self.up2_1 = Upsample(dims[1])  # level 1 keeps the concatenated 2*dim channels
        self.decoder_level1 = level(dims[1], heads[0], num_blocks[0])
        self.refinement = refinement() if refinement is not None else None
        self.skip_conv = skip_conv() if skip_conv is not None else None
        self.output = nn.Conv2d(dims[1], out_channels, kernel_size=3, stride=1, padding=1, bias=bias)

    def forward(self, inp_img):
        """(B, inp_channels, H, W) -> (B, out_channels, H, W), any H, W (at least 5), any B (0 too)."""
        check_feature_map(self, inp_img, self.inp_channels, name="inp_img")
        b, _, h, w = inp_img.shape
        if b == 0:  # pixel (un)shuffle keeps the shape of an empty batch, so the levels would not fit
            return inp_img.new_empty((0, self.out_channels, h, w))
        return self._forward_padded(pad_to_multiple(inp_img))[..., :h, :w]

    def forward_streaming(self, x, band_rows=None, max_memory=None, progress=None):
        """``self(x)`` computed in row bands, in memory bounded whatever the image size (no
        gradients): see :func:`sparse_attn.streaming.forward_streaming` for the arguments."""
        from sparse_attn.streaming import forward_streaming  # sparse_attn.streaming imports this module

        return forward_streaming(self, x, band_rows=band_rows, max_memory=max_memory, progress=progress)

    def _forward_padded(self, inp_img):
        inp_enc_level1 = self.patch_embed(inp_img)
        x = inp_enc_level1 if self.encoder_level0 is None else self.encoder_level0(inp_enc_level1)
        out_enc_level1 = self.encoder_level1(x)
        out_enc_level2 = self.encoder_level2(self.down1_2(out_enc_level1))
        out_enc_level3 = self.encoder_level3(self.down2_3(out_enc_level2))
        latent = self.latent(self.down3_4(out_enc_level3))

        x = self.reduce_chan_level3(torch.cat([self.up4_3(latent), out_enc_level3], 1))
        x = self.decoder_level3(x)
        x = self.reduce_chan_level2(torch.cat([self.up3_2(x), out_enc_level2], 1))
        x = self.decoder_level2(x)
        x = self.decoder_level1(torch.cat([self.up2_1(x), out_enc_level1], 1))
        if self.refinement is not None:
            x = self.refinement(x)
        if self.skip_conv is not None:
            return self.output(x + self.skip_conv(inp_enc_level1))
        return self.output(x) + inp_img

    def _config_summary(self):
        return f"dim={self.patch_embed.proj.out_channels}"
