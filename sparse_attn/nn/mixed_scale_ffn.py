"""DRSformer's mixed-scale feed-forward network with the official parameter names."""
from torch import nn

from ..ops import mixed_scale_dwconv
from .input_checks import autocast_parameters, check_feature_map
from .pointwise import PointwiseConv2d


class MixedScaleFFN(nn.Module):
    """DRSformer's mixed-scale feed-forward network (MSFN, the official ``FeedForward``).

    project_in (1x1, dim -> 2h) -> depthwise 3x3 and 5x5 + ReLU -> channel-shuffled grouped
    3x3 and 5x5 + ReLU -> project_out (1x1, 2h -> dim), with h = int(dim * ffn_expansion_factor).
    The 1x1 projections are plain convolutions; everything between them is the fused
    :func:`sparse_attn.mixed_scale_dwconv` on ``backend`` ("auto" follows ``use_backend``).
    """

    def __init__(self, dim, ffn_expansion_factor, bias, backend="auto"):
        super().__init__()
        hidden = int(dim * ffn_expansion_factor)
        self.dim, self.hidden_features, self.backend = dim, hidden, backend
        self.project_in = PointwiseConv2d(dim, hidden * 2, bias=bias, backend=backend)
        self.dwconv3x3 = nn.Conv2d(hidden * 2, hidden * 2, kernel_size=3, stride=1, padding=1,
                                   groups=hidden * 2, bias=bias)
        self.dwconv5x5 = nn.Conv2d(hidden * 2, hidden * 2, kernel_size=5, stride=1, padding=2,
                                   groups=hidden * 2, bias=bias)
        self.dwconv3x3_1 = nn.Conv2d(hidden * 2, hidden, kernel_size=3, stride=1, padding=1,
                                     groups=hidden, bias=bias)
        self.dwconv5x5_1 = nn.Conv2d(hidden * 2, hidden, kernel_size=5, stride=1, padding=2,
                                     groups=hidden, bias=bias)
        self.project_out = PointwiseConv2d(hidden * 2, dim, bias=bias, backend=backend)

    def _mixed_scale_core(self, x):
        convs = (self.dwconv3x3, self.dwconv5x5, self.dwconv3x3_1, self.dwconv5x5_1)
        params = autocast_parameters(x, *(c.weight for c in convs), *(c.bias for c in convs))
        return mixed_scale_dwconv(x, *params, backend=self.backend)

    def forward(self, x):
        """(B, dim, H, W) -> (B, dim, H, W)."""
        check_feature_map(self, x, self.dim)
        hidden = self.project_in(x)
        # The op takes no empty tensor; its output for an empty batch has its input's shape.
        return self.project_out(self._mixed_scale_core(hidden) if x.shape[0] > 0 else hidden)
