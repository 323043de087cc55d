"""Feed-forward modules with the parameter names of the official networks."""
import torch
import torch.nn.functional as F
from torch import nn


class MixedScaleFFN(nn.Module):
    """DRSformer's mixed-scale feed-forward network (MSFN, the official ``FeedForward``).

    project_in (1x1, dim -> 2h) -> depthwise 3x3 and 5x5 + ReLU -> channel-shuffled grouped
    3x3 and 5x5 + ReLU -> project_out (1x1, 2h -> dim), with h = int(dim * ffn_expansion_factor).
    """

    def __init__(self, dim, ffn_expansion_factor, bias, backend="auto"):
        super().__init__()
        hidden = int(dim * ffn_expansion_factor)
        self.dim, self.hidden_features, self.backend = dim, hidden, backend
        self.project_in = nn.Conv2d(dim, hidden * 2, kernel_size=1, bias=bias)
        self.dwconv3x3 = nn.Conv2d(hidden * 2, hidden * 2, kernel_size=3, stride=1, padding=1,
                                   groups=hidden * 2, bias=bias)
        self.dwconv5x5 = nn.Conv2d(hidden * 2, hidden * 2, kernel_size=5, stride=1, padding=2,
                                   groups=hidden * 2, bias=bias)
        self.dwconv3x3_1 = nn.Conv2d(hidden * 2, hidden, kernel_size=3, stride=1, padding=1,
                                     groups=hidden, bias=bias)
        self.dwconv5x5_1 = nn.Conv2d(hidden * 2, hidden, kernel_size=5, stride=1, padding=2,
                                     groups=hidden, bias=bias)
        self.project_out = nn.Conv2d(hidden * 2, dim, kernel_size=1, bias=bias)

    def _mixed_scale_core(self, x):
        # The official sequence; to be replaced by the fused mixed_scale_dwconv op.
        x1_3, x2_3 = F.relu(self.dwconv3x3(x)).chunk(2, dim=1)
        x1_5, x2_5 = F.relu(self.dwconv5x5(x)).chunk(2, dim=1)
        x1 = F.relu(self.dwconv3x3_1(torch.cat([x1_3, x1_5], dim=1)))
        x2 = F.relu(self.dwconv5x5_1(torch.cat([x2_3, x2_5], dim=1)))
        return torch.cat([x1, x2], dim=1)

    def forward(self, x):
        return self.project_out(self._mixed_scale_core(self.project_in(x)))
