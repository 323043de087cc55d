"""Deep sparse channel attention: top-k selection and a ReLU² sparse branch together.

A reconstruction for the sparse gated deblurring transformer (``sparse_attn.models.DSGformer``):
the paper it follows ("Deep Sparse Gated Transformer for Image Deblurring") published no code.

- From Restormer (Zamir et al., CVPR 2022): transposed (channel) attention per head, q/k/v by a
  1x1 then a depthwise 3x3 convolution, L2-normalised q and k, a learnable per-head temperature,
  a 1x1 output projection. Parameter names are Restormer's/DRSformer's.
- From DRSformer (Chen et al., CVPR 2023): keeping only the top-k scores of each row.
- From AST (Zhou et al., CVPR 2024, adaptive sparse self-attention): a softmax branch and a
  squared-ReLU branch mixed by weights normalised with a softmax over two learnable numbers
  initialised equal.
- Our choices: one selection shared by both branches (k = int(d * a / b), keep fraction a/b =
  2/3 by default, computed in Python floats as DRSformer computes its k), and the parameter name
  ``branch_logits``.
"""
import torch
from torch import nn

from .attention import ChannelAttentionBase


class DeepSparseAttention(ChannelAttentionBase):
    """Channel attention whose rows keep their top ``int(d * a / b)`` scores, with a softmax and a
    ReLU² branch over that selection mixed by ``softmax(branch_logits)``.

    Args:
        dim, num_heads, bias: as Restormer's attention.
        keep_fraction: (a, b), the kept fraction a/b of each row.
        backend: the op backend ("auto" honours :func:`sparse_attn.use_backend`).
    """

    def __init__(self, dim, num_heads, bias, keep_fraction=(2, 3), backend="auto"):
        super().__init__(dim, num_heads, bias, backend)
        numerator, denominator = keep_fraction
        if not 0 < numerator <= denominator:
            raise ValueError(f"keep_fraction: expected (a, b) with 0 < a <= b, got {keep_fraction}")
        d = dim // num_heads
        self.keep_fraction = (numerator, denominator)
        self.topk = int(d * numerator / denominator)
        if self.topk < 1:
            raise ValueError(f"keep_fraction: {numerator}/{denominator} of d = {d} keeps no channel")
        self.branch_logits = nn.Parameter(torch.zeros(2))

    def branches(self, d):
        return torch.softmax(self.branch_logits, dim=0), (self.topk, self.topk), ("softmax", "relu2")

    def extra_repr(self):
        return f"{super().extra_repr()}, keep_fraction={self.keep_fraction}, topk={self.topk}"
