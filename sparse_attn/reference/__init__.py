"""Pure-PyTorch references of every op: the ground truth of the tests and the fallback backend."""
from .mixed_scale_dwconv import mixed_scale_dwconv
from .sparse_channel_attention import (attention_matrix, drsformer_formula, scores_from_gram,
                                       sparse_channel_attention)

__all__ = ["sparse_channel_attention", "attention_matrix", "scores_from_gram", "drsformer_formula",
           "mixed_scale_dwconv"]
