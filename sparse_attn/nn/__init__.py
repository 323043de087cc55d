"""Drop-in nn.Modules with the parameter names of the official networks."""
from .attention import ChannelAttention, TopKChannelAttention, drsformer_topk
from .feedforward import MixedScaleFFN

__all__ = ["TopKChannelAttention", "ChannelAttention", "drsformer_topk", "MixedScaleFFN"]
