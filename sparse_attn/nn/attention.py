"""Drop-in attention modules: DRSformer's TKSA and Restormer's MDTA on the fused op.

Parameter names and shapes are those of the official modules, so their state_dicts load.
"""
import torch
from torch import nn

from ..ops.sparse_channel_attention import sparse_channel_attention


def drsformer_topk(channels):
    """DRSformer's four kept counts, computed as the official code does (Python float division
    then int: int(96*2/3) == 64, where int(96*(2/3)) would give 63)."""
    c = channels
    return (int(c / 2), int(c * 2 / 3), int(c * 3 / 4), int(c * 4 / 5))


class _ChannelAttentionBase(nn.Module):
    """qkv (1x1) -> depthwise 3x3 -> channel attention per head -> project_out (1x1)."""

    def __init__(self, dim, num_heads, bias, backend="auto"):
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"num_heads: {num_heads} does not divide dim = {dim}")
        self.dim, self.num_heads, self.backend = dim, num_heads, backend
        self.temperature = nn.Parameter(torch.ones(num_heads, 1, 1))
        self.qkv = nn.Conv2d(dim, dim * 3, kernel_size=1, bias=bias)
        self.qkv_dwconv = nn.Conv2d(dim * 3, dim * 3, kernel_size=3, stride=1, padding=1,
                                    groups=dim * 3, bias=bias)
        self.project_out = nn.Conv2d(dim, dim, kernel_size=1, bias=bias)

    def branches(self, d):
        """(weights, topk, activation) of the attention op for d channels per head: the branch
        weights (R,), the kept counts and the activations, one per branch."""
        raise NotImplementedError

    def _attend(self, q, k, v):
        weights, topk, activation = self.branches(q.shape[2])
        return sparse_channel_attention(q, k, v, self.temperature, weights, topk, activation, backend=self.backend)

    def forward(self, x):
        if x.dim() != 4 or x.shape[1] != self.dim:
            raise ValueError(f"x: expected (B, {self.dim}, H, W), got {tuple(x.shape)}")
        b, c, h, w = x.shape
        q, k, v = self.qkv_dwconv(self.qkv(x)).chunk(3, dim=1)
        shape = (b, self.num_heads, c // self.num_heads, h * w)
        out = self._attend(q.reshape(shape), k.reshape(shape), v.reshape(shape))
        return self.project_out(out.reshape(b, c, h, w))

    def extra_repr(self):
        return f"dim={self.dim}, num_heads={self.num_heads}, backend={self.backend!r}"


class TopKChannelAttention(_ChannelAttentionBase):
    """DRSformer's top-k sparse attention (TKSA, the official ``Attention``).

    Four branches keep the d/2, 2d/3, 3d/4 and 4d/5 largest scores of each row of the
    channel-attention matrix, each with its own softmax, summed with the learnable weights
    ``attn1``..``attn4``. ``backend`` picks the op's backend ("auto" honours
    :func:`sparse_attn.use_backend`).
    """

    def __init__(self, dim, num_heads, bias, backend="auto"):
        super().__init__(dim, num_heads, bias, backend)
        self.attn1 = nn.Parameter(torch.tensor([0.2]))
        self.attn2 = nn.Parameter(torch.tensor([0.2]))
        self.attn3 = nn.Parameter(torch.tensor([0.2]))
        self.attn4 = nn.Parameter(torch.tensor([0.2]))

    def branches(self, d):
        topk = drsformer_topk(d)
        return torch.cat([self.attn1, self.attn2, self.attn3, self.attn4]), topk, ("softmax",) * len(topk)


class ChannelAttention(_ChannelAttentionBase):
    """Restormer's multi-Dconv head transposed attention (MDTA): one dense softmax branch,
    run on the same op with ``topk=(d,)``."""

    def branches(self, d):
        return self.temperature.new_ones(1), (d,), ("softmax",)
