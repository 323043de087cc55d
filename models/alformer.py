"""ALformer, the network of Magic-ELF (Jiang et al., "Magic ELF: Image Deraining Meets Association
Learning and Transformer", ACM MM 2022), on the library's modules, with the official module and
parameter names (``ALformer.py`` of the official code), so its checkpoints load unchanged.

Two sub-networks meet in a multi-input attention: ``dsnet`` predicts the rain at half resolution
(and with it a first, half-resolution background), ``ssnet`` recovers the background at full
resolution, its queries coming from the rain features and its keys and values from the image
features (:class:`sparse_attn.nn.MultiInputTransformerBlock`). Every attention block -- the
multi-input one and the twelve Restormer blocks -- runs on :func:`sparse_attn.sparse_channel_attention`,
its norms on :func:`sparse_attn.layer_norm2d` and its feed-forward networks
(:class:`sparse_attn.nn.PReLUGatedFFN`) on :func:`sparse_attn.gated_dwconv`, so
:func:`sparse_attn.use_backend` moves them all at once; the remaining parts (channel-attention
blocks, fusion blocks, resampling) are ordinary convolutions.

Upstream quirks kept because checkpoints or outputs depend on them (each noted where it lives):
one PReLU instance shared by many blocks, the multi-input block's argument order, the channel
order of ``shuffle_up``, the unused ``num_cab`` argument.
"""
import functools

import torch
import torch.nn.functional as F
from torch import nn

from sparse_attn.nn import ChannelAttention, MultiInputTransformerBlock, PReLUGatedFFN
from sparse_attn.nn.input_checks import check_feature_map

from .checkpoint import CheckpointMixin
from .common import TransformerBlock, pad_to_multiple

SIZE_MULTIPLE = 16  # a 2x downsampling in front of the three 2x levels of the encoders
FFN_EXPANSION = 2.66
LAYER_NORM_TYPE = "WithBias"
ORB_BLOCKS = 5  # fixed upstream: ``num_cab`` does not reach the ORB


def conv(in_channels, out_channels, kernel_size, bias=False, stride=1):
    """A 'same' convolution (upstream's ``conv``; ``st_conv`` is stride 2)."""
    return nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=bias, stride=stride)


def shuffle_up(x, scale):
    """Upstream's ``subpixel.shuffle_up``: (B, C s², H, W) -> (B, C, H s, W s) like
    ``nn.PixelShuffle`` but with the s x s offsets read column-major: output pixel
    (h s + i, w s + j) of channel c is input channel c s² + j s + i (PixelShuffle: c s² + i s + j)."""
    return F.pixel_shuffle(x.unflatten(1, (-1, scale, scale)).transpose(2, 3).flatten(1, 3), scale)


def quadrants_to_channels(x):
    """(B, C, H, W), H and W even -> (B, 4C, H/2, W/2): the four quadrants stacked on channels in
    the order top-left, top-right, bottom-left, bottom-right (upstream's ``stage1_input``)."""
    b, c, h, w = x.shape
    cells = x.reshape(b, c, 2, h // 2, 2, w // 2).permute(0, 2, 4, 1, 3, 5)  # (B, row, col, C, h, w)
    return cells.reshape(b, 4 * c, h // 2, w // 2)


# ---------------------------------------------------------------------------------------------
# Convolutional parts (upstream names in the class docstrings)
# ---------------------------------------------------------------------------------------------
class DepthwiseSeparableConv(nn.Module):
    """Depthwise 3x3 then 1x1, both with biases (upstream's ``depthwise_separable_conv``)."""

    def __init__(self, ch_in, ch_out):
        super().__init__()
        self.depth_conv = nn.Conv2d(ch_in, ch_in, kernel_size=3, padding=1, groups=ch_in)
        self.point_conv = nn.Conv2d(ch_in, ch_out, kernel_size=1)

    def forward(self, x):
        return self.point_conv(self.depth_conv(x))


class CALayer(nn.Module):
    """Squeeze-and-excitation channel attention: x * sigmoid(1x1(relu(1x1(mean over H, W))))."""

    def __init__(self, channel, reduction=16, bias=False):
        super().__init__()
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.conv_du = nn.Sequential(
            nn.Conv2d(channel, channel // reduction, 1, padding=0, bias=bias), nn.ReLU(),
            nn.Conv2d(channel // reduction, channel, 1, padding=0, bias=bias), nn.Sigmoid())

    def forward(self, x):
        return x * self.conv_du(self.avg_pool(x))


class FuseTwo(nn.Module):
    """Upstream's ``S2FB_2``: ``CA_fea(DSC(cat(x1, x2))) + x1``."""

    def __init__(self, n_feat, reduction, bias):
        super().__init__()
        self.DSC = DepthwiseSeparableConv(n_feat * 2, n_feat)
        self.CA_fea = CALayer(n_feat, reduction, bias=bias)

    def forward(self, x1, x2):
        return self.CA_fea(self.DSC(torch.cat((x1, x2), 1))) + x1


class FuseFour(nn.Module):
    """Upstream's ``S2FB_p``: fuses x4 into x3, that into x2, that into x1 (a DSC each), then
    ``CA_fea(f) + f``."""

    def __init__(self, n_feat, reduction, bias):
        super().__init__()
        self.DSC1 = DepthwiseSeparableConv(n_feat * 2, n_feat)
        self.DSC2 = DepthwiseSeparableConv(n_feat * 2, n_feat)
        self.DSC3 = DepthwiseSeparableConv(n_feat * 2, n_feat)
        self.CA_fea = CALayer(n_feat, reduction, bias=bias)

    def forward(self, x1, x2, x3, x4):
        fused = self.DSC1(torch.cat((x3, x4), 1))
        fused = self.DSC2(torch.cat((x2, fused), 1))
        fused = self.DSC3(torch.cat((x1, fused), 1))
        return self.CA_fea(fused) + fused


class CAB(nn.Module):
    """Channel attention block: ``CA(conv(act(conv(x)))) + x``. ``act`` is the caller's module,
    shared as upstream shares it (one PReLU slope for every block of a sub-network)."""

    def __init__(self, n_feat, kernel_size, reduction, bias, act):
        super().__init__()
        body = [conv(n_feat, n_feat, kernel_size, bias=bias), act, conv(n_feat, n_feat, kernel_size, bias=bias)]
        self.CA = CALayer(n_feat, reduction, bias=bias)
        self.body = nn.Sequential(*body)

    def forward(self, x):
        return self.CA(self.body(x)) + x


class CABSeparable(nn.Module):
    """Upstream's ``CAB_dsc``: a CAB on depthwise-separable convolutions whose residual is a
    fusion block, ``S2FB2(CA(body(x)), x)``."""

    def __init__(self, n_feat, reduction, bias, act):
        super().__init__()
        body = [DepthwiseSeparableConv(n_feat, n_feat), act, DepthwiseSeparableConv(n_feat, n_feat)]
        self.CA = CALayer(n_feat, reduction, bias=bias)
        self.body = nn.Sequential(*body)
        self.S2FB2 = FuseTwo(n_feat, reduction, bias)

    def forward(self, x):
        return self.S2FB2(self.CA(self.body(x)), x)


class EncoderStage(nn.Module):
    """Upstream's ``stage_encoder_module``: ``S2FB2(x, CAB1(x))``."""

    def __init__(self, n_feat, reduction, bias, act):
        super().__init__()
        self.CAB1 = CABSeparable(n_feat, reduction, bias, act)
        self.S2FB2 = FuseTwo(n_feat, reduction, bias)

    def forward(self, x):
        return self.S2FB2(x, self.CAB1(x))


class DecoderStage(nn.Module):
    """Upstream's ``stage_decoder_module``: fuse the four inputs, a CAB, fuse its output back."""

    def __init__(self, n_feat, kernel_size, reduction, bias, act):
        super().__init__()
        self.S2FB0 = FuseFour(n_feat, reduction, bias)
        self.CAB1 = CAB(n_feat, kernel_size, reduction, bias, act)
        self.S2FB2 = FuseTwo(n_feat, reduction, bias)

    def forward(self, x, skip1, skip2, skip3):
        fused = self.S2FB0(x, skip1, skip2, skip3)
        return self.S2FB2(fused, self.CAB1(fused))


def _bilinear_then_1x1(channels, scale):
    return nn.Sequential(nn.Upsample(scale_factor=scale, mode="bilinear", align_corners=False),
                         nn.Conv2d(channels, channels, 1, stride=1, padding=0, bias=False))


class DownSample(nn.Module):
    """Bilinear downsampling by ``factor`` then a 1x1 convolution without bias (upstream's
    ``DownSample`` and, with factor 4, ``DownSample4``)."""

    def __init__(self, channels, factor=2):
        super().__init__()
        self.down = _bilinear_then_1x1(channels, 1 / factor)

    def forward(self, x):
        return self.down(x)


class UpSample(nn.Module):
    """Bilinear upsampling by ``factor`` then a 1x1 convolution without bias (upstream's
    ``UpSample`` and, with factor 4, ``UpSample4``)."""

    def __init__(self, channels, factor=2):
        super().__init__()
        self.up = _bilinear_then_1x1(channels, factor)

    def forward(self, x):
        return self.up(x)


class Encoder(nn.Module):
    """Three levels, each a 2x bilinear downsampling then an encoder stage; returns all three."""

    def __init__(self, n_feat, reduction, bias, act):
        super().__init__()
        self.encoder_level1 = EncoderStage(n_feat, reduction, bias, act)
        self.encoder_level2 = EncoderStage(n_feat, reduction, bias, act)
        self.encoder_level3 = EncoderStage(n_feat, reduction, bias, act)
        self.down_stage1 = DownSample(n_feat)
        self.down_stage2 = DownSample(n_feat)
        self.down_stage3 = DownSample(n_feat)

    def forward(self, x):
        enc1 = self.encoder_level1(self.down_stage1(x))
        enc2 = self.encoder_level2(self.down_stage2(enc1))
        enc3 = self.encoder_level3(self.down_stage3(enc2))
        return enc1, enc2, enc3


class Decoder(nn.Module):
    """Three decoder stages, each fed every encoder level resampled to its size; ends with a 2x
    upsampling back to the encoder's input size."""

    def __init__(self, n_feat, kernel_size, reduction, bias, act):
        super().__init__()
        self.decoder_level1 = DecoderStage(n_feat, kernel_size, reduction, bias, act)
        self.decoder_level2 = DecoderStage(n_feat, kernel_size, reduction, bias, act)
        self.decoder_level3 = DecoderStage(n_feat, kernel_size, reduction, bias, act)
        self.up_stage1 = UpSample(n_feat)
        self.up_stage2 = UpSample(n_feat)
        self.up_stage3 = UpSample(n_feat)
        self.up_32 = UpSample(n_feat)
        self.up_31 = UpSample(n_feat, 4)
        self.up_21 = UpSample(n_feat)
        self.down_13 = DownSample(n_feat, 4)
        self.down_23 = DownSample(n_feat)
        self.down_12 = DownSample(n_feat)

    def forward(self, encoded):
        enc1, enc2, enc3 = encoded
        dec3 = self.decoder_level3(enc3, enc3, self.down_23(enc2), self.down_13(enc1))
        dec2 = self.decoder_level2(self.up_stage3(dec3), enc2, self.down_12(enc1), self.up_32(enc3))
        dec1 = self.decoder_level1(self.up_stage2(dec2), enc1, self.up_21(enc2), self.up_31(enc3))
        return self.up_stage1(dec1)


# ---------------------------------------------------------------------------------------------
# Transformer parts
# ---------------------------------------------------------------------------------------------
def restormer_block(n_feat, heads, bias, backend):
    """Upstream's ``RestormerBlock``: MDTA (on the fused op) and the PReLU-gated FFN."""
    return TransformerBlock(n_feat, heads, FFN_EXPANSION, bias, LAYER_NORM_TYPE,
                            attention=functools.partial(ChannelAttention, backend=backend),
                            feedforward=functools.partial(PReLUGatedFFN, backend=backend), backend=backend)


class ORB(nn.Module):
    """Original-resolution block: five two-head Restormer blocks, a 3x3 conv, a residual."""

    def __init__(self, n_feat, kernel_size, bias, backend):
        super().__init__()
        self.modules_body = nn.Sequential(*[restormer_block(n_feat, 2, bias, backend) for _ in range(ORB_BLOCKS)])
        self.conv = conv(n_feat, n_feat, kernel_size)  # no bias whatever ``bias`` says, as upstream

    def forward(self, x):
        return self.conv(self.modules_body(x)) + x


class ORSNet(nn.Module):
    """Holds one :class:`ORB` (upstream's name, ``orb``)."""

    def __init__(self, n_feat, kernel_size, bias, backend):
        super().__init__()
        self.orb = ORB(n_feat, kernel_size, bias, backend)

    def forward(self, x):
        return self.orb(x)


class STEM(nn.Module):
    """Semantic-guidance texture enhancement: the multi-input attention between the rain
    features (queries) and the stride-2 features of the rainy image (keys and values), fused
    with the features of the half-resolution background."""

    def __init__(self, n_feat, kernel_size, reduction, bias, topk, degradation_mask, backend):
        super().__init__()
        self.conv_stem0 = conv(3, n_feat, kernel_size, bias=bias, stride=2)
        self.conv_stem2 = conv(3, n_feat, kernel_size, bias=bias)
        # bias=False and one head whatever the network's arguments, as upstream.
        feedforward = functools.partial(PReLUGatedFFN, backend=backend)
        self.former = MultiInputTransformerBlock(n_feat, 1, FFN_EXPANSION, False, LAYER_NORM_TYPE, feedforward,
                                                 topk=topk, degradation_mask=degradation_mask, backend=backend)
        self.conv_stem3 = conv(3, n_feat, kernel_size, bias=bias)
        self.S2FB = FuseTwo(n_feat, reduction, bias)

    def forward(self, img_rain, res, img):
        img_down = self.conv_stem0(img_rain)
        att_fea = self.former(self.conv_stem2(res), img_down, img_down)
        return self.S2FB(self.conv_stem3(img), att_fea)


# ---------------------------------------------------------------------------------------------
# The two sub-networks and the network
# ---------------------------------------------------------------------------------------------
class DSNet(nn.Module):
    """The rain-prediction sub-network, at half resolution. Returns ``(rain, background)``,
    ``background = downsampled image - rain``."""

    def __init__(self, n_feat, kernel_size, reduction, bias, backend):
        super().__init__()
        act = nn.PReLU()  # its own, shared by all of its channel-attention blocks, as upstream
        self.down_1 = nn.Upsample(scale_factor=0.5, mode="bilinear", align_corners=False)
        self.shallow_feat1 = nn.Sequential(conv(3, n_feat, kernel_size, bias=bias),
                                           CAB(n_feat, kernel_size, reduction, bias, act))
        self.shallow_feat2 = nn.Sequential(conv(3 * 4, n_feat, kernel_size, bias=bias),
                                           CAB(n_feat, kernel_size, reduction, bias, act))
        self.fuse_conv = conv(n_feat * 2, n_feat, kernel_size, bias=bias)
        self.former = nn.Sequential(restormer_block(n_feat, 1, bias, backend))
        self.orsnet = ORSNet(n_feat, kernel_size, bias, backend)
        self.dsnnet_encoder = Encoder(n_feat, reduction, bias, act)
        self.dsnnet_decoder = Decoder(n_feat, kernel_size, reduction, bias, act)
        self.S2FB_fuse = FuseTwo(n_feat, reduction, bias)
        self.tail = conv(n_feat, 3, kernel_size, bias=bias)

    def forward(self, x):
        x_down = self.down_1(x)
        quadrant_fea = self.former(self.shallow_feat2(quadrants_to_channels(x)))
        fuse_fea = self.fuse_conv(torch.cat([self.shallow_feat1(x_down), quadrant_fea], 1))
        or_fea = self.orsnet(fuse_fea)
        fused_fea = self.S2FB_fuse(or_fea, self.dsnnet_decoder(self.dsnnet_encoder(fuse_fea)))
        rain = self.tail(fused_fea)
        return rain, x_down - rain


class SSNet(nn.Module):
    """The background-recovery sub-network: from the image and DSNet's outputs to the
    full-resolution rain residual (subtracted from the image by :class:`ALformer`)."""

    def __init__(self, n_feat, kernel_size, reduction, bias, act, topk, degradation_mask, backend):
        super().__init__()
        self.stem = STEM(n_feat, kernel_size, reduction, bias, topk, degradation_mask, backend)
        self.former = nn.Sequential(restormer_block(n_feat, 1, bias, backend))
        self.orsnet = ORSNet(n_feat, kernel_size, bias, backend)
        self.up_recon_b = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)
        self.ssnnet_encoder = Encoder(n_feat, reduction, bias, act)
        self.ssnnet_decoder = Decoder(n_feat, kernel_size, reduction, bias, act)
        self.S2FB_fuse = FuseTwo(n_feat, reduction, bias)
        self.deep_conv = conv(n_feat, n_feat * 2, kernel_size, bias=bias)
        self.tail = conv(int(n_feat * 2 / 4), 3, kernel_size, bias=bias)

    def forward(self, x, dsnet_outs):
        rain, background = dsnet_outs
        former_fea = self.former(self.stem(x, rain, background))
        or_fea = self.orsnet(former_fea)
        fused_fea = self.S2FB_fuse(or_fea, self.ssnnet_decoder(self.ssnnet_encoder(former_fea)))
        return self.tail(shuffle_up(self.deep_conv(fused_fea), 2)) + self.up_recon_b(rain)


def _mentions_mask(keys):
    return any(".degradation_mask." in k for k in keys)


class ALformer(CheckpointMixin, nn.Module):
    """Magic-ELF's ALformer: rain prediction (``dsnet``) and background recovery (``ssnet``)
    associated by the multi-input attention.

    ``forward(x)`` returns, as upstream, the list ``[restored, background]``: the derained image
    (B, 3, H, W) and DSNet's half-resolution background (B, 3, ceil(H/2), ceil(W/2)), which the
    official training supervises too. For the restored image alone use :meth:`restore`.

    Arguments and defaults are the official ones, plus:
        topk: the multi-input attention's selection: None (dense, official) or a keep fraction
            in (0, 1] (see :class:`sparse_attn.nn.MultiInputAttention`).
        degradation_mask: add the 2023 extension's degradation mask to the multi-input block
            (our reconstruction; see :class:`sparse_attn.nn.MultiInputTransformerBlock`). Off by
            default: the official network.
        backend: the op backend of every attention, norm and feed-forward block ("auto" honours
            :func:`sparse_attn.use_backend`).
    As upstream, ``num_cab`` is accepted and unused (each ORB has five Restormer blocks), and
    the network works on 3-channel images (``in_c`` and ``out_c`` must be 3). The default
    configuration has 1,223,972 parameters.

    Checkpoints load with :meth:`load_pretrained` / :meth:`from_pretrained`
    (:class:`~sparse_attn.models.checkpoint.CheckpointMixin`); DataParallel's ``module.`` prefix
    is dropped. The official training script saves ``{"state_dict": ..., "epoch": ...,
    "optimizer": ...}``: read it with ``ALformer().load_pretrained(path, param_key="state_dict")``.

    Any H, W of at least 9 is accepted: the image is reflect-padded at the bottom and right to a
    multiple of 16 (what the official network needs) and both outputs are cropped back.
    """

    def __init__(self, in_c=3, out_c=3, n_feat=48, kernel_size=3, reduction=4, num_cab=10, bias=False,
                 topk=None, degradation_mask=False, backend="auto"):
        super().__init__()
        if in_c != 3 or out_c != 3:
            raise ValueError(f"in_c, out_c: the official network is built for 3-channel images, got {in_c}, {out_c}")
        if n_feat % 2 != 0:
            raise ValueError(f"n_feat: expected an even number (two heads in the ORBs), got {n_feat}")
        self.n_feat, self.num_cab, self.bias = n_feat, num_cab, bias
        self.topk, self.degradation_mask = topk, degradation_mask
        # Not a submodule of ALformer, as upstream: SSNet's channel-attention blocks share it.
        act = nn.PReLU()
        self.dsnet = DSNet(n_feat, kernel_size, reduction, bias, backend)
        self.ssnet = SSNet(n_feat, kernel_size, reduction, bias, act, topk, degradation_mask, backend)

    def forward(self, x_img):
        """(B, 3, H, W) -> ``[restored (B, 3, H, W), background (B, 3, ceil(H/2), ceil(W/2))]``."""
        check_feature_map(self, x_img, 3, name="x_img")
        b, _, h, w = x_img.shape
        if b == 0:  # reflect padding takes no empty batch: an empty batch restores to empty outputs
            return [x_img.new_empty((0, 3, h, w)), x_img.new_empty((0, 3, (h + 1) // 2, (w + 1) // 2))]
        padded = pad_to_multiple(x_img, SIZE_MULTIPLE)
        dsnet_out = self.dsnet(padded)
        restored = padded - self.ssnet(padded, dsnet_out)
        return [restored[..., :h, :w], dsnet_out[1][..., :(h + 1) // 2, :(w + 1) // 2]]

    def restore(self, x_img):
        """The derained image alone: ``self(x_img)[0]``."""
        return self(x_img)[0]

    # Why there is no exact row-band inference (sparse_attn.streaming) for this network.
    streaming_unsupported = (
        "ALformer has no exact streaming inference: its 13 channel attentions would stream (their Gram "
        "matrices are sums over pixels), but its 41 squeeze-and-excitation gates (CALayer) each scale a map by "
        "its mean over the whole image, nested inside fusion and channel-attention blocks and fed by 4x "
        "bilinear resamplings across three levels, so every gate needs a whole-image pass of its own with "
        "its input held; sparse_attn.streaming schedules the Restormer-family U-Net only. Run forward "
        "(its widest maps are 48 channels at half resolution) or tiled inference (approximate)")

    def forward_streaming(self, x_img, band_rows=None, max_memory=None, progress=None):
        """Not available: raises NotImplementedError saying why (see ``streaming_unsupported``)."""
        raise NotImplementedError(self.streaming_unsupported)

    def extra_repr(self):
        return f"n_feat={self.n_feat}, topk={self.topk}, degradation_mask={self.degradation_mask}"

    # -- checkpoints (load_pretrained / from_pretrained: CheckpointMixin) -----------------------
    def _config_summary(self):
        return f"n_feat={self.n_feat}, bias={self.bias}, degradation_mask={self.degradation_mask}"

    def _checkpoint_hint(self, missing, unexpected):
        if _mentions_mask(unexpected) and not self.degradation_mask:
            return "the checkpoint has the degradation mask: construct ALformer(degradation_mask=True)"
        if _mentions_mask(missing) and self.degradation_mask:
            return "the checkpoint has no degradation mask (the official network): construct ALformer()"
        return ""
