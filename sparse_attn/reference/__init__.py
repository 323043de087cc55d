"""Pure-PyTorch references of every op: the ground truth of the tests and the fallback backend."""
from .mixed_scale_dwconv import mixed_scale_dwconv
from .sparse_channel_attention import sparse_channel_attention

__all__ = ["sparse_channel_attention", "mixed_scale_dwconv"]
