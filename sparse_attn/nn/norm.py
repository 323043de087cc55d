"""Channel LayerNorm of Restormer-family networks, computed on the NCHW map in place of layout.

The official ``LayerNorm`` (Restormer, DRSformer) rearranges ``b c h w -> b (h w) c``, normalises
the last dimension and rearranges back: two full copies of the activation per call. Normalising
over dim 1 of the NCHW tensor is the same arithmetic without the copies.
"""
import torch
from torch import nn

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
    than "BiasFree" as "WithBias", an unknown type is an error.
    """

    def __init__(self, dim, LayerNorm_type="WithBias"):  # noqa: N803 (official argument name)
        super().__init__()
        if LayerNorm_type not in LAYER_NORM_TYPES:
            raise ValueError(f"LayerNorm_type: expected one of {LAYER_NORM_TYPES}, got {LayerNorm_type!r}")
        self.dim, self.LayerNorm_type = dim, LayerNorm_type
        self.body = _ChannelAffine(dim, with_bias=LayerNorm_type == "WithBias")

    def forward(self, x):
        """(B, dim, H, W) -> (B, dim, H, W)."""
        check_feature_map(self, x, self.dim)
        if x.shape[0] == 0:
            return x.clone()  # nothing to normalise (var_mean warns about an empty reduction)
        var, mean = torch.var_mean(x, dim=1, correction=0, keepdim=True)
        weight = self.body.weight.reshape(1, -1, 1, 1)
        if self.body.bias is None:
            return x * torch.rsqrt(var + EPS) * weight
        return (x - mean) * torch.rsqrt(var + EPS) * weight + self.body.bias.reshape(1, -1, 1, 1)

    def extra_repr(self):
        return f"{self.dim}, LayerNorm_type={self.LayerNorm_type!r}"
