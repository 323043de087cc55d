"""Drop-in nn.Modules with the parameter names of the official networks."""
from .bands import banded_inference
from .attention import ChannelAttention, ChannelAttentionBase, TopKChannelAttention, drsformer_topk
from .deep_sparse_attention import DeepSparseAttention
from .mixed_scale_ffn import MixedScaleFFN
from .frequency_gated_ffn import FrequencyGatedFFN
from .gated_dconv_ffn import GatedDconvFFN
from .multi_input_attention import MultiInputAttention, MultiInputTransformerBlock
from .norm import LayerNorm2d
from .prelu_gated_ffn import PReLUGatedFFN
from .pyramid_attention import PyramidAttention
from .region_selection_attention import RegionSelectionAttention

__all__ = ["ChannelAttentionBase", "TopKChannelAttention", "ChannelAttention", "drsformer_topk", "MixedScaleFFN",
           "GatedDconvFFN", "LayerNorm2d", "DeepSparseAttention", "FrequencyGatedFFN",
           "MultiInputAttention", "MultiInputTransformerBlock", "PReLUGatedFFN", "PyramidAttention",
           "RegionSelectionAttention", "banded_inference"]
