"""Drop-in nn.Modules with the parameter names of the official networks."""
from .attention import ChannelAttention, TopKChannelAttention, drsformer_topk

__all__ = ["TopKChannelAttention", "ChannelAttention", "drsformer_topk"]
