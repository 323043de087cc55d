"""ELF's feed-forward network: Restormer's gated-Dconv FFN with a PReLU gate."""
from torch import nn

from .gated_dconv_ffn import GatedDconvFFN
from .input_checks import check_feature_map


class PReLUGatedFFN(GatedDconvFFN):
    """The official ``FeedForward`` of Magic-ELF (``ALformer.py``): project_in (1x1, dim -> 2h) ->
    depthwise 3x3 -> split into x1, x2 -> ``act1(x1) * x2`` -> project_out (1x1, h -> dim), with
    h = int(dim * ffn_expansion_factor) and ``act1`` a PReLU with one learnable slope.

    Same parameters as :class:`GatedDconvFFN` plus ``act1.weight``.
    """

    def __init__(self, dim, ffn_expansion_factor, bias):
        super().__init__(dim, ffn_expansion_factor, bias)
        self.act1 = nn.PReLU()

    def forward(self, x):
        """(B, dim, H, W) -> (B, dim, H, W)."""
        check_feature_map(self, x, self.dim)
        return self.project_out(self.gated_core(self.project_in(x)))

    def gated_core(self, x):
        """(B, 2h, H, W) -> (B, h, H, W): the depthwise convolution and the gate, the part that
        the fused gated depthwise op will take over (activation "prelu", slope ``act1.weight``)."""
        x1, x2 = self.dwconv(x).chunk(2, dim=1)
        return self.act1(x1) * x2
