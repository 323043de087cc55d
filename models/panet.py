"""PANet (Mei et al., "Pyramid Attention Networks for Image Restoration"): the denoising /
compression-artefact / demosaicing network :class:`PANet` and the super-resolution network
:class:`PAEDSR`, on :class:`sparse_attn.nn.PyramidAttention`, with the official module and
parameter names (``panet.py``, ``paedsr.py`` and ``common.py`` of the official code), so the
released checkpoints -- bare state_dicts saved by EDSR-PyTorch's trainer -- load unchanged
through ``load_pretrained`` / ``from_pretrained``.

Both are EDSR bodies (residual blocks of two 3x3 convolutions) with one pyramid attention in
the middle. Whole images run at any size: the attention never holds the N x M score map, so the
official ``forward_chop`` tiling (a different network: each tile attends only within itself) is
not needed.

Upstream quirks kept because checkpoints or outputs depend on them:
- PANet's residual blocks pass their ``nn.PReLU()`` in the position of ``bias``, so every block
  uses ``ResBlock``'s default activation, *one* PReLU built once: all of PANet's residual blocks
  share one slope (the state_dict repeats it under every block's ``body.1.weight``). Here the
  blocks of one network share one PReLU (upstream's is even shared between networks).
- PANet holds EDSR's ``sub_mean`` / ``add_mean`` (rgb_range 1) but does not use them.
- PAEDSR registers its attention twice, as ``msa`` and inside ``body``: the state_dict holds the
  same weights as ``msa.*`` and ``body.{n_resblocks // 2}.*``.
"""
import math

import torch
from torch import nn

from sparse_attn.nn import PyramidAttention
from sparse_attn.nn.input_checks import check_feature_map

from .checkpoint import CheckpointMixin

KERNEL_SIZE = 3
RGB_MEAN = (0.4488, 0.4371, 0.4040)  # DIV2K's, EDSR-PyTorch's
RGB_STD = (1.0, 1.0, 1.0)


def default_conv(in_channels, out_channels, kernel_size, bias=True):
    """EDSR's 'same' convolution."""
    return nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=bias)


class MeanShift(nn.Conv2d):
    """EDSR's fixed 1x1 convolution ``x + sign · rgb_range · mean`` (per RGB channel, std 1);
    its weights are parameters that do not train (``requires_grad=False``), as upstream."""

    def __init__(self, rgb_range, sign=-1, rgb_mean=RGB_MEAN, rgb_std=RGB_STD):
        super().__init__(3, 3, kernel_size=1)
        std = torch.tensor(rgb_std)
        with torch.no_grad():
            self.weight.copy_(torch.eye(3).view(3, 3, 1, 1) / std.view(3, 1, 1, 1))
            self.bias.copy_(sign * rgb_range * torch.tensor(rgb_mean) / std)
        self.requires_grad_(False)


class ResBlock(nn.Module):
    """EDSR's residual block: ``x + res_scale · conv(act(conv(x)))`` (keys ``body.0``, ``body.2``;
    ``body.1`` is ``act``, the caller's module, shared as upstream shares it)."""

    def __init__(self, n_feats, act, res_scale=1):
        super().__init__()
        self.body = nn.Sequential(default_conv(n_feats, n_feats, KERNEL_SIZE), act,
                                  default_conv(n_feats, n_feats, KERNEL_SIZE))
        self.res_scale = res_scale

    def forward(self, x):
        return self.body(x) * self.res_scale + x


class Upsampler(nn.Sequential):
    """EDSR's sub-pixel upsampler: a 3x3 conv to 4 n_feats and a pixel shuffle by 2 per factor
    of 2 (keys ``0``, ``2``, ...), or one to 9 n_feats and a shuffle by 3."""

    def __init__(self, scale, n_feats):
        if scale == 3:
            layers = [default_conv(n_feats, 9 * n_feats, KERNEL_SIZE), nn.PixelShuffle(3)]
        else:
            layers = []
            for _ in range(int(math.log2(scale))):
                layers += [default_conv(n_feats, 4 * n_feats, KERNEL_SIZE), nn.PixelShuffle(2)]
        super().__init__(*layers)


def _check_positive_int(name, value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: expected a positive integer, got {value!r}")


class _PyramidNetwork(CheckpointMixin, nn.Module):
    """What PANet and PAEDSR share: the input check and the checkpoint messages."""

    def _check_input(self, x):
        check_feature_map(self, x, self.n_colors)

    @classmethod
    def config_from_state_dict(cls, state_dict):
        """The constructor arguments that a checkpoint's keys and shapes tell: n_resblocks,
        n_feats, n_colors (and PAEDSR's scale)."""
        head = state_dict["head.0.weight"]
        blocks = {key.split(".")[1] for key in state_dict if key.startswith("body.") and ".body.0.weight" in key}
        return {"n_resblocks": len(blocks), "n_feats": head.shape[0], "n_colors": head.shape[1]}

    def _config_summary(self):
        return f"n_resblocks={self.n_resblocks}, n_feats={self.n_feats}, n_colors={self.n_colors}"


class PANet(_PyramidNetwork):
    """PANet for denoising, compression artefacts and demosaicing (the official ``PANET``):
    ``tail(body(head(x)) + head(x))``, the body being ``n_resblocks // 2`` residual blocks, the
    pyramid attention, ``n_resblocks // 2`` residual blocks and a 3x3 convolution.

    Args: n_resblocks, n_feats, n_colors, res_scale as the official options (the released
    networks use 80, 64, 3 or 1 (compression artefacts), 1), and for the attention
    (:class:`~sparse_attn.nn.PyramidAttention`, ``channel=n_feats, reduction=2``, the official
    defaults at n_feats 64): ``topk``, ``backend`` and ``recompute_scale_factor``.
    Images in [0, 1] (the official rgb_range 1), (B, n_colors, H, W) of any size at least 2x2.
    """

    def __init__(self, n_resblocks=80, n_feats=64, n_colors=3, res_scale=1, *, topk=None, backend="auto",
                 recompute_scale_factor=None):
        super().__init__()
        for name, value in (("n_resblocks", n_resblocks), ("n_feats", n_feats), ("n_colors", n_colors)):
            _check_positive_int(name, value)
        self.n_resblocks, self.n_feats, self.n_colors = n_resblocks, n_feats, n_colors
        self.sub_mean = MeanShift(rgb_range=1)
        attention = PyramidAttention(channel=n_feats, topk=topk, backend=backend,
                                     recompute_scale_factor=recompute_scale_factor)
        self.add_mean = MeanShift(rgb_range=1, sign=1)
        self.head = nn.Sequential(default_conv(n_colors, n_feats, KERNEL_SIZE))
        act = nn.PReLU()  # one slope for every residual block (see the module docstring)
        half = [ResBlock(n_feats, act, res_scale) for _ in range(n_resblocks // 2)]
        other_half = [ResBlock(n_feats, act, res_scale) for _ in range(n_resblocks // 2)]
        self.body = nn.Sequential(*half, attention, *other_half, default_conv(n_feats, n_feats, KERNEL_SIZE))
        self.tail = nn.Sequential(default_conv(n_feats, n_colors, KERNEL_SIZE))

    @property
    def attention(self):
        """The pyramid attention (``body[n_resblocks // 2]``)."""
        return self.body[self.n_resblocks // 2]

    def forward(self, x):
        """(B, n_colors, H, W) -> the restored (B, n_colors, H, W)."""
        self._check_input(x)
        x = self.head(x)
        return self.tail(self.body(x) + x)


class PAEDSR(_PyramidNetwork):
    """PANet for super-resolution (the official ``PAEDSR``): EDSR with the pyramid attention in the
    middle of its body. ``add_mean(tail(body(h) + h))``, ``h = head(sub_mean(x))``; the tail
    upsamples by ``scale``.

    Args: n_resblocks, n_feats, scale (2, 3 or a power of 2), res_scale (of the residual blocks
    and the attention), n_colors (3: the mean shift is RGB), rgb_range (images in [0, rgb_range];
    the released networks use 255) as the official options; for the attention
    (``channel=n_feats, reduction=8``, the official ones at n_feats 256): ``topk``, ``backend``,
    ``recompute_scale_factor`` (see :class:`~sparse_attn.nn.PyramidAttention`).
    Input (B, 3, H, W), H and W at least 2; output (B, 3, scale·H, scale·W).
    """

    def __init__(self, n_resblocks=32, n_feats=256, scale=2, res_scale=0.1, n_colors=3, rgb_range=255, *,
                 topk=None, backend="auto", recompute_scale_factor=None):
        super().__init__()
        for name, value in (("n_resblocks", n_resblocks), ("n_feats", n_feats), ("scale", scale)):
            _check_positive_int(name, value)
        if scale != 3 and scale & (scale - 1):
            raise ValueError(f"scale: expected 3 or a power of 2 (EDSR's upsampler), got {scale}")
        if n_colors != 3:
            raise ValueError(f"n_colors: PAEDSR's mean shift is RGB, expected 3, got {n_colors!r}")
        self.n_resblocks, self.n_feats, self.n_colors, self.scale = n_resblocks, n_feats, n_colors, scale
        self.sub_mean = MeanShift(rgb_range)
        self.msa = PyramidAttention(channel=n_feats, reduction=8, res_scale=res_scale, topk=topk, backend=backend,
                                    recompute_scale_factor=recompute_scale_factor)
        self.add_mean = MeanShift(rgb_range, sign=1)
        self.head = nn.Sequential(default_conv(n_colors, n_feats, KERNEL_SIZE))
        act = nn.ReLU(True)
        half = [ResBlock(n_feats, act, res_scale) for _ in range(n_resblocks // 2)]
        other_half = [ResBlock(n_feats, act, res_scale) for _ in range(n_resblocks // 2)]
        self.body = nn.Sequential(*half, self.msa, *other_half, default_conv(n_feats, n_feats, KERNEL_SIZE))
        self.tail = nn.Sequential(Upsampler(scale, n_feats),
                                  nn.Conv2d(n_feats, n_colors, KERNEL_SIZE, padding=KERNEL_SIZE // 2))

    upscales = True  # the command line's jobs restore at the input size: PAEDSR is for the Python API

    @classmethod
    def config_from_state_dict(cls, state_dict):
        config = super().config_from_state_dict(state_dict)
        upsampler = [v for k, v in state_dict.items() if k.startswith("tail.0.") and k.endswith(".weight")]
        config["scale"] = 3 if upsampler[0].shape[0] == 9 * config["n_feats"] else 2 ** len(upsampler)
        return config

    def forward(self, x):
        """(B, 3, H, W) in [0, rgb_range] -> (B, 3, scale·H, scale·W)."""
        self._check_input(x)
        x = self.head(self.sub_mean(x))
        return self.add_mean(self.tail(self.body(x) + x))

    def _config_summary(self):
        return super()._config_summary() + f", scale={self.scale}"

    def _checkpoint_hint(self, missing, unexpected):
        if any(k.startswith("tail.") for k in missing + unexpected):
            return "the upsampler's keys differ: a checkpoint of another scale? (scale=2, 3 or 4)"
        return ""
