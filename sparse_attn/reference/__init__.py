"""Pure-PyTorch references of every op: the ground truth of the tests and the fallback backend."""
from .block_sparse_attention import block_sparse_attention
from .depthwise_conv2d import depthwise_conv2d
from .gated_dwconv import gated_dwconv
from .layer_norm2d import layer_norm2d
from .mixed_scale_dwconv import mixed_scale_dwconv
from .patch_attention import patch_attention
from .sparse_channel_attention import attention_matrix, scores_from_gram, sparse_channel_attention

__all__ = ["sparse_channel_attention", "attention_matrix", "scores_from_gram", "mixed_scale_dwconv", "layer_norm2d",
           "gated_dwconv", "block_sparse_attention", "patch_attention",
           "depthwise_conv2d"]
