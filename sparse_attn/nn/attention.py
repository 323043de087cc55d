"""Drop-in attention modules: DRSformer's TKSA and Restormer's MDTA on the fused op, and
:class:`ChannelAttentionBase`, the frame they (and every channel-attention module) share.

Parameter names and shapes are those of the official modules, so their state_dicts load.
"""
import torch
from torch import nn

from ..ops.sparse_channel_attention import sparse_channel_attention
from .bands import attended_rows, attention_matrix_of, inference_band_rows, map_rows
from .depthwise import depthwise
from .input_checks import autocast_parameters, check_feature_map
from .pointwise import PointwiseConv2d


def drsformer_topk(channels):
    """DRSformer's four kept counts, computed as the official code does (Python float division
    then int: int(96*2/3) == 64, where int(96*(2/3)) would give 63)."""
    c = channels
    return (int(c / 2), int(c * 2 / 3), int(c * 3 / 4), int(c * 4 / 5))


class ChannelAttentionBase(nn.Module):
    """The frame of every channel-attention module of the Restormer family (public, to subclass).

    ``forward``: qkv (1x1, dim -> 3·dim) -> depthwise 3x3 (``qkv_dwconv``, run on
    :func:`sparse_attn.depthwise_conv2d`) -> split into q, k, v of
    shape (B, heads, d, H·W), d = dim / heads -> :meth:`attend` -> ``project_out`` (1x1). The
    parameter names (``temperature``, ``qkv``, ``qkv_dwconv``, ``project_out``) are those of
    Restormer's and DRSformer's ``Attention``, so their state_dicts load.

    A subclass adds its own parameters in ``__init__`` and implements :meth:`branches` (the
    weights, kept counts and activations of :func:`sparse_attn.sparse_channel_attention`, which
    the default :meth:`attend` calls with ``backend=self.backend``; exact row-band streaming,
    :mod:`sparse_attn.streaming`, uses them too), or :meth:`attend` for any other attention.
    ``forward`` checks the input (names the argument and the expected shape, dtype and device) and
    returns an empty batch for an empty batch without calling :meth:`attend`.
    """

    def __init__(self, dim, num_heads, bias, backend="auto"):
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"num_heads: {num_heads} does not divide dim = {dim}")
        self.dim, self.num_heads, self.backend = dim, num_heads, backend
        self.temperature = nn.Parameter(torch.ones(num_heads, 1, 1))
        self.qkv = PointwiseConv2d(dim, dim * 3, bias=bias, backend=backend)
        self.qkv_dwconv = nn.Conv2d(dim * 3, dim * 3, kernel_size=3, stride=1, padding=1,
                                    groups=dim * 3, bias=bias)
        self.project_out = PointwiseConv2d(dim, dim, bias=bias, backend=backend)

    def branches(self, d):
        """(weights, topk, activation) of the attention op for d channels per head: the branch
        weights (R,), the kept counts and the activations, one per branch."""
        raise NotImplementedError(f"{type(self).__name__} must implement branches(d) or attend(q, k, v)")

    def attend(self, q, k, v):
        """The attention of q, k, v, each (B, heads, d, H·W) with B >= 1; returns (B, heads, d, H·W).
        Parameters reach the op in q's dtype (:func:`autocast_parameters`)."""
        weights, topk, activation = self.branches(q.shape[2])
        temperature, weights = autocast_parameters(q, self.temperature, weights)
        return sparse_channel_attention(q, k, v, temperature, weights, topk, activation, backend=self.backend)

    def forward(self, x):
        """(B, dim, H, W) -> (B, dim, H, W). Without gradients, on large maps, an attention defined
        by :meth:`branches` runs in row bands (see :func:`sparse_attn.nn.bands.banded_inference`):
        pass 1 sums the Gram matrix and norms of q and k band by band, pass 2 recomputes v per
        band, so q, k, v never exist for the whole map."""
        check_feature_map(self, x, self.dim)
        b, c, h, w = x.shape
        rows = inference_band_rows(x, self.backend) if type(self).attend is ChannelAttentionBase.attend else None
        if rows is not None and b > 0:
            p = attention_matrix_of(self, x, rows)
            return map_rows(x, lambda part, first, last: attended_rows(self, p, part, first, last), 1, rows)
        q, k, v = depthwise(self.qkv_dwconv, self.qkv(x), self.backend).chunk(3, dim=1)
        shape = (b, self.num_heads, c // self.num_heads, h * w)
        # The ops take no empty tensor; the attention of an empty batch is that empty batch.
        out = self.attend(q.reshape(shape), k.reshape(shape), v.reshape(shape)) if b > 0 else v
        return self.project_out(out.reshape(b, c, h, w))

    def extra_repr(self):
        return f"dim={self.dim}, num_heads={self.num_heads}, backend={self.backend!r}"


class TopKChannelAttention(ChannelAttentionBase):
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


class ChannelAttention(ChannelAttentionBase):
    """Restormer's multi-Dconv head transposed attention (MDTA): one dense softmax branch,
    run on the same op with ``topk=(d,)``."""

    def branches(self, d):
        return self.temperature.new_ones(1), (d,), ("softmax",)
