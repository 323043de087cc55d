"""One file per op: contract, backend dispatch, autograd and torch.library registration."""
from .sparse_channel_attention import sparse_channel_attention

__all__ = ["sparse_channel_attention"]
