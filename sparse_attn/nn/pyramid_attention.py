"""PANet's pyramid attention (Mei et al., "Pyramid Attention Networks for Image Restoration"),
on the fused op :func:`sparse_attn.patch_attention`.

Every 3x3 patch of the input attends to every 3x3 patch of a five-level pyramid of the input
(bicubic resizes by 1, 0.9, ..., 0.6). The official module materialises the score of every
query pixel against every key patch (about 3.3 N² numbers per image); the op streams key tiles
with an online softmax instead, so whole images run without the official ``forward_chop``
tiling. Module, parameter and buffer names are those of the official ``PyramidAttention``
(``attention.py``), so its state_dicts load with ``strict=True``.
"""
import numbers

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.patch_attention import patch_attention
from .input_checks import check_feature_map

# The official module clamps key-patch norms at its ``escape_NaN`` buffer, a float32 1e-4.
ESCAPE_NAN = torch.tensor(1e-4, dtype=torch.float32).item()
# The op folds 3x3 patches at stride 1: the only patch geometry the official forward pastes
# back correctly (its transposed convolution has padding 1 whatever ``ksize`` is).
PATCH_SIZE, PATCH_STRIDE = 3, 1
# Pasting overlapping 3x3 patches sums nine contributions per pixel; the official module divides by 4.
FOLD_DIVISOR = 4.0


def pyramid_scales(level):
    """The official resize factors ``1 - i/10`` for i < level, in Python floats as upstream."""
    return [1 - i / 10 for i in range(level)]


def _conv_prelu(in_channels, out_channels):
    """The official ``BasicBlock`` of the module: a 1x1 convolution with bias, then a PReLU of
    one slope (keys ``0.weight``, ``0.bias``, ``1.weight``)."""
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=True), nn.PReLU())


class PyramidAttention(nn.Module):
    """Pyramid attention: ``y = patch_attention(θ(x), [g(r_l(x))], [f(r_l(x))]) / 4 + res_scale · x``.

    ``θ`` = ``conv_match_L_base``, ``g`` = ``conv_match`` (both 1x1 to ``channel // reduction``
    channels, then a PReLU), ``f`` = ``conv_assembly`` (1x1 to ``channel`` channels, PReLU) and
    ``r_l`` the bicubic resize by ``self.scale[l] = 1 - l/10`` (level 0 is ``x`` itself). See
    :func:`sparse_attn.patch_attention` for the attention between 3x3 patches.

    Args (the official ones first, with the official defaults):
        level: number of pyramid levels (1 to 10).
        res_scale: weight of the residual ``x``.
        channel, reduction: input channels; the matching features have ``channel // reduction``.
        ksize, stride: patch size and stride; only the official 3 and 1 are supported.
        softmax_scale: the softmax's scale (``scale`` of the op).
        average: True, the softmax (the official default). False: the official module replaces
            the softmax by a one-hot mask of each query's best key; here that is ``topk=1``. Both
            paste the best-matching key patch, but where several keys tie for the maximum the
            official mask pastes every tied patch (summing them) and ``topk=1`` pastes only the
            lowest-index one (the op's tie rule). Neither passes a gradient to the scores.
        topk: None (dense softmax, the official module) or an integer t >= 1: each query's
            softmax runs over its t best-scoring key patches only (all of them where an image has
            fewer than t). ``average=False`` is ``topk=1``.
        backend: the op backend ("auto" honours :func:`sparse_attn.use_backend`).
        recompute_scale_factor: passed to ``F.interpolate`` for the pyramid's resizes. The level
            sizes are ``floor(H·s)`` x ``floor(W·s)`` either way; what differs is where the
            resized pixels are sampled. None (default) is what the official call does in the
            torch this library pins: the source coordinate is ``(i + 0.5)/s − 0.5``. The torch 1.1
            that the released PANet weights were trained with computed the size and then
            resampled by the ratio of the sizes, ``(i + 0.5)·H/floor(H·s) − 0.5``: pass True to
            reproduce that (the two differ by up to a few units on unit-variance features, so
            released weights may prefer True; the official code run today behaves as None).

    ``escape_NaN`` (the clamp of the key-patch norms, the op's ``key_eps``) is read when the module
    is built and whenever a state_dict is loaded into it.
    Input: (B, channel, H, W), H and W large enough that the smallest level keeps a pixel
    (``floor(H · self.scale[-1]) >= 1``: at least 2x2 with 5 levels). Output: the input's shape.
    """

    def __init__(self, level=5, res_scale=1, channel=64, reduction=2, ksize=3, stride=1, softmax_scale=10,
                 average=True, topk=None, backend="auto", recompute_scale_factor=None):
        super().__init__()
        if isinstance(level, bool) or not isinstance(level, int) or not 1 <= level <= 10:
            raise ValueError(f"level: expected an integer from 1 to 10 (scales 1 - level/10 must stay positive), "
                             f"got {level!r}")
        if (ksize, stride) != (PATCH_SIZE, PATCH_STRIDE):
            raise ValueError(f"ksize, stride: only {PATCH_SIZE}x{PATCH_SIZE} patches at stride {PATCH_STRIDE} are "
                             f"supported (the official configuration), got ksize={ksize}, stride={stride}")
        if not isinstance(channel, int) or not isinstance(reduction, int) or not 1 <= reduction <= channel:
            raise ValueError(f"channel, reduction: expected integers with 1 <= reduction <= channel, "
                             f"got channel={channel!r}, reduction={reduction!r}")
        self.topk = self._kept_keys(average, topk)
        self.ksize, self.stride = ksize, stride
        self.res_scale, self.softmax_scale = res_scale, softmax_scale
        self.scale = pyramid_scales(level)
        self.average, self.channel = average, channel
        self.backend, self.recompute_scale_factor = backend, recompute_scale_factor
        self.register_buffer("escape_NaN", torch.tensor([ESCAPE_NAN], dtype=torch.float32))
        self.key_eps = ESCAPE_NAN
        self.conv_match_L_base = _conv_prelu(channel, channel // reduction)
        self.conv_match = _conv_prelu(channel, channel // reduction)
        self.conv_assembly = _conv_prelu(channel, channel)
        self.register_load_state_dict_post_hook(_read_key_eps)

    @staticmethod
    def _kept_keys(average, topk):
        if topk is not None and (isinstance(topk, bool) or not isinstance(topk, numbers.Integral) or topk < 1):
            raise ValueError(f"topk: expected None (dense) or a positive integer, got {topk!r}")
        if average:
            return topk
        if topk not in (None, 1):
            raise ValueError(f"average=False is topk=1 (the official one-hot of the best key); got topk={topk}")
        return 1

    def level_sizes(self, h, w):
        """[(H_l, W_l)] of the pyramid of an h x w input (F.interpolate's ``floor(size · s)``)."""
        return [(int(h * s), int(w * s)) for s in self.scale]

    def forward(self, x):
        """(B, channel, H, W) -> (B, channel, H, W)."""
        check_feature_map(self, x, self.channel)
        h, w = x.shape[-2:]
        if min(h, w) * self.scale[-1] < 1:  # a bound, not the sizes: torch.compile keeps H, W symbolic
            smallest = self.level_sizes(h, w)[-1]
            raise ValueError(f"x: {h}x{w} is too small for {len(self.scale)} pyramid levels (the resize by "
                             f"{self.scale[-1]:g} leaves {smallest[0]}x{smallest[1]} pixels)")
        if x.shape[0] == 0:  # the op takes no empty batch; the module of an empty batch is that batch
            return x * self.res_scale
        query = self.conv_match_L_base(x)
        keys, values = [], []
        for s in self.scale:
            ref = x if s == 1 else F.interpolate(x, scale_factor=s, mode="bicubic",
                                                 recompute_scale_factor=self.recompute_scale_factor)
            keys.append(self.conv_match(ref))
            values.append(self.conv_assembly(ref))
        # topk beyond the number of key patches (a small image) keeps them all: the dense softmax.
        topk = None if self.topk is None else min(self.topk, sum(k.shape[2] * k.shape[3] for k in keys))
        out = patch_attention(query, keys, values, scale=self.softmax_scale, topk=topk, key_eps=self.key_eps,
                              backend=self.backend)
        return out / FOLD_DIVISOR + x * self.res_scale

    def extra_repr(self):
        return (f"channel={self.channel}, level={len(self.scale)}, res_scale={self.res_scale}, "
                f"softmax_scale={self.softmax_scale}, topk={self.topk}, backend={self.backend!r}")


def _read_key_eps(module, incompatible_keys):
    """After a state_dict load: the op's key_eps from the (possibly new) escape_NaN buffer, as a
    Python float so that the forward reads no tensor value (no sync, no graph break)."""
    if module.escape_NaN.device.type != "meta":
        module.key_eps = module.escape_NaN.item()
