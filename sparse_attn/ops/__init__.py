"""One file per op: contract, backend dispatch, autograd and torch.library registration."""
from .mixed_scale_dwconv import mixed_scale_dwconv
from .sparse_channel_attention import sparse_channel_attention

__all__ = ["sparse_channel_attention", "mixed_scale_dwconv"]
