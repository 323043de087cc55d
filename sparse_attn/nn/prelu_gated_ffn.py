"""ELF's feed-forward network: Restormer's gated-Dconv FFN with a PReLU gate."""
from torch import nn

from ..ops import gated_dwconv
from .gated_dconv_ffn import GatedDconvFFN
from .input_checks import check_feature_map


class PReLUGatedFFN(GatedDconvFFN):
    """The official ``FeedForward`` of Magic-ELF (``ALformer.py``): project_in (1x1, dim -> 2h) ->
    depthwise 3x3 -> split into x1, x2 -> ``act1(x1) * x2`` -> project_out (1x1, h -> dim), with
    h = int(dim * ffn_expansion_factor) and ``act1`` a PReLU with one learnable slope.

    Same parameters as :class:`GatedDconvFFN` plus ``act1.weight``. The depthwise convolution and
    the gate are the fused :func:`sparse_attn.gated_dwconv` (activation "prelu") on ``backend``
    ("auto" follows ``use_backend``).
    """

    def __init__(self, dim, ffn_expansion_factor, bias, backend="auto"):
        super().__init__(dim, ffn_expansion_factor, bias, backend)
        self.act1 = nn.PReLU()

    def forward(self, x):
        """(B, dim, H, W) -> (B, dim, H, W)."""
        check_feature_map(self, x, self.dim)
        hidden = self.project_in(x)
        if x.shape[0] == 0:  # the op takes no empty tensor; an empty batch has h channels here
            return self.project_out(hidden[:, :self.hidden_features])
        return self.project_out(gated_dwconv(hidden, self.dwconv.weight, self.dwconv.bias, "prelu", self.act1.weight,
                                             backend=self.backend))
