"""Channel LayerNorm of Restormer-family networks, computed on the NCHW map in place of layout.

The official ``LayerNorm`` (Restormer, DRSformer) rearranges ``b c h w -> b (h w) c``, normalises
the last dimension and rearranges back: two full copies of the activation per call. This module
runs :func:`sparse_attn.layer_norm2d`, which normalises over dim 1 of the NCHW tensor: the same
arithmetic without the copies, fused, saving only x and two statistics per pixel for backward.
"""
import torch
from torch import nn

from ..ops import layer_norm2d
from .input_checks import check_feature_map

EPS = 1e-5  # the official value, added to the (biased) variance
LAYER_NORM_TYPES = ("WithBias", "BiasFree")


class _ChannelAffine(nn.Module):
    """Holds the per-channel ``weight`` (and ``bias``) under the official ``body`` submodule,
    so that ``norm.body.weight`` / ``norm.body.bias`` keys load unchanged."""

    def __init__(self, dim, with_bias):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if with_bias else None


class LayerNorm2d(nn.Module):
    """LayerNorm over the channels of every pixel of a (B, C, H, W) map.

    ``LayerNorm_type="WithBias"``: ``(x - mean) / sqrt(var + 1e-5) * weight + bias``.
    ``LayerNorm_type="BiasFree"``: ``x / sqrt(var + 1e-5) * weight`` — as upstream, the variance
    is still taken about the mean, but the mean is not subtracted from ``x``.
    The variance is the biased one (divided by C). Unlike upstream, which treats any string other
    than "BiasFree" as "WithBias", an unknown type is an error. ``backend``: the op's backend
    ("auto" honours :func:`sparse_attn.use_backend`).
    """

    def __init__(self, dim, LayerNorm_type="WithBias", backend="auto"):  # noqa: N803 (official argument name)
        super().__init__()
        if LayerNorm_type not in LAYER_NORM_TYPES:
            raise ValueError(f"LayerNorm_type: expected one of {LAYER_NORM_TYPES}, got {LayerNorm_type!r}")
        self.dim, self.LayerNorm_type, self.backend = dim, LayerNorm_type, backend
        self.body = _ChannelAffine(dim, with_bias=LayerNorm_type == "WithBias")

    def forward(self, x):
        """(B, dim, H, W) -> (B, dim, H, W)."""
        check_feature_map(self, x, self.dim)
        if x.shape[0] == 0:
            return x.clone()  # the op takes no empty tensor: nothing to normalise
        if x.dtype != self.body.weight.dtype:  # under autocast: normalise in the parameters' dtype, as
            x = x.to(self.body.weight.dtype)   # autocast runs layer_norm in float32
        return layer_norm2d(x, self.body.weight, self.body.bias, EPS, backend=self.backend)

    def extra_repr(self):
        return f"{self.dim}, LayerNorm_type={self.LayerNorm_type!r}"
