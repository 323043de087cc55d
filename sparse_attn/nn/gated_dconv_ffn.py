"""Restormer's gated-Dconv feed-forward network with the official parameter names."""
import torch.nn.functional as F
from torch import nn

from .input_checks import check_feature_map


class GatedDconvFFN(nn.Module):
    """Restormer's GDFN (the official ``FeedForward`` of restormer_arch.py).

    project_in (1x1, dim -> 2h) -> depthwise 3x3 -> split into x1, x2 -> gelu(x1) * x2 ->
    project_out (1x1, h -> dim), with h = int(dim * ffn_expansion_factor).
    """

    def __init__(self, dim, ffn_expansion_factor, bias):
        super().__init__()
        hidden = int(dim * ffn_expansion_factor)
        self.dim, self.hidden_features = dim, hidden
        self.project_in = nn.Conv2d(dim, hidden * 2, kernel_size=1, bias=bias)
        self.dwconv = nn.Conv2d(hidden * 2, hidden * 2, kernel_size=3, stride=1, padding=1,
                                groups=hidden * 2, bias=bias)
        self.project_out = nn.Conv2d(hidden, dim, kernel_size=1, bias=bias)

    def forward(self, x):
        """(B, dim, H, W) -> (B, dim, H, W)."""
        check_feature_map(self, x, self.dim)
        x1, x2 = self.dwconv(self.project_in(x)).chunk(2, dim=1)
        return self.project_out(F.gelu(x1) * x2)
