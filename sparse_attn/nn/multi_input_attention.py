"""ELF's multi-input attention and the transformer block around it, on the fused op.

Magic-ELF (Jiang et al., "Magic ELF: Image Deraining Meets Association Learning and Transformer",
ACM MM 2022) joins its rain-prediction and background-recovery sub-networks with a *multi-input
attention module*: Restormer's transposed (channel) attention whose queries, keys and values come
from three different feature maps, each through its own depthwise 3x3 convolution. Parameter and
module names are those of the official ``Attention`` and ``TransformerBlock`` (``ALformer.py``),
so their state_dicts load unchanged.
"""
import numbers

import torch
from torch import nn

from ..ops.sparse_channel_attention import sparse_channel_attention
from .input_checks import autocast_parameters, check_feature_map
from .norm import LayerNorm2d
from .pointwise import PointwiseConv2d


def kept_per_row(d, topk):
    """The number of scores each row keeps: ``d`` for ``topk=None`` (dense, the official
    attention), else ``int(d * topk)`` for a keep fraction ``0 < topk <= 1`` (Python floats, as
    DRSformer computes its counts)."""
    if topk is None:
        return d
    if isinstance(topk, bool) or not isinstance(topk, numbers.Real) or not 0 < topk <= 1:
        raise ValueError(f"topk: expected None (dense) or a keep fraction in (0, 1], got {topk!r}")
    kept = int(d * topk)
    if kept < 1:
        raise ValueError(f"topk: a keep fraction of {topk} keeps no channel of d = {d}")
    return kept


def _check_same_shape(module, channels, **maps):
    """Each map a (B, channels, H, W) tensor that ``module`` can take, all of the first's shape."""
    (first_name, first), *_ = maps.items()
    for name, x in maps.items():
        check_feature_map(module, x, channels, name=name)
        if x.shape != first.shape:
            raise ValueError(f"{name}: expected the shape of {first_name} {tuple(first.shape)}, got {tuple(x.shape)}")


class MultiInputAttention(nn.Module):
    """Transposed channel attention with queries, keys and values from three inputs (ELF's
    ``Attention``).

    ``q = q(q_fea)``, ``k = k(k_fea)``, ``v = v(v_fea)`` (each a depthwise 3x3 convolution), then
    per head the channel attention of :func:`sparse_attn.sparse_channel_attention` with the
    learnable ``temperature``, and the 1x1 ``project_out``.

    Args:
        dim, num_heads, bias: as the official module.
        topk: None (dense softmax over every channel: the official module) or a keep fraction in
            (0, 1]: each row of the attention matrix keeps its ``int(d * topk)`` largest scores
            (d = dim / num_heads), a softmax over those.
        backend: the op backend ("auto" honours :func:`sparse_attn.use_backend`).
    """

    def __init__(self, dim, num_heads, bias, topk=None, backend="auto"):
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"num_heads: {num_heads} does not divide dim = {dim}")
        self.dim, self.num_heads, self.backend = dim, num_heads, backend
        self.topk, self.kept = topk, kept_per_row(dim // num_heads, topk)
        self.temperature = nn.Parameter(torch.ones(num_heads, 1, 1))
        self.q = self._depthwise(dim, bias)
        self.k = self._depthwise(dim, bias)
        self.v = self._depthwise(dim, bias)
        self.project_out = PointwiseConv2d(dim, dim, bias=bias, backend=backend)

    @staticmethod
    def _depthwise(dim, bias):
        return nn.Conv2d(dim, dim, kernel_size=3, stride=1, padding=1, groups=dim, bias=bias)

    def forward(self, q_fea, k_fea, v_fea):
        """Three (B, dim, H, W) maps of one shape -> (B, dim, H, W)."""
        _check_same_shape(self, self.dim, q_fea=q_fea, k_fea=k_fea, v_fea=v_fea)
        b, c, h, w = q_fea.shape
        v = self.v(v_fea)
        if b == 0:  # the op takes no empty tensor; the attention of an empty batch is that batch
            return self.project_out(v)
        shape = (b, self.num_heads, c // self.num_heads, h * w)
        q, k = self.q(q_fea).reshape(shape), self.k(k_fea).reshape(shape)
        (temperature,) = autocast_parameters(q, self.temperature)
        weights = torch.ones(1, dtype=q.dtype, device=q.device)
        out = sparse_channel_attention(q, k, v.reshape(shape), temperature, weights, (self.kept,), "softmax",
                                       backend=self.backend)
        return self.project_out(out.reshape(b, c, h, w))

    def extra_repr(self):
        return f"dim={self.dim}, num_heads={self.num_heads}, topk={self.topk}, backend={self.backend!r}"


class MultiInputTransformerBlock(nn.Module):
    """ELF's ``TransformerBlock``: the multi-input attention with a residual on ``value``, then a
    normalised feed-forward with a residual.

    ``forward(key, query, value)`` keeps the official call, quirk included: the attention is
    called as ``attn(norm_key(key), norm_query(query), norm_value(value))`` with the signature
    ``(q_fea, k_fea, v_fea)``, so the *queries* come from ``key`` (in ELF, the rain features),
    the keys from ``query`` and the values from ``value`` (both the image features). Trained
    checkpoints depend on this order.

    Args:
        dim, num_heads, ffn_expansion_factor, bias, LayerNorm_type: as the official block.
        feedforward: called as ``feedforward(dim, ffn_expansion_factor, bias)``.
        topk: of the attention (:class:`MultiInputAttention`).
        backend: the op backend of the attention and the norms ("auto" honours
            :func:`sparse_attn.use_backend`); the feed-forward is built by ``feedforward``.
        degradation_mask: ``False`` (default) is the official block. ``True`` adds the
            degradation mask of the 2023 extension ("Dynamic Association Learning of
            Self-Attention and Convolution in Image Restoration", Jiang et al.), whose code is
            unpublished, so this is our reconstruction: ``m = sigmoid(degradation_mask(norm_key(key)))``
            (a 1x1 convolution, per pixel and channel) gates the normalised image features before
            the keys and values, ``f -> f * (1 + m)`` -- residual gating, as in the lines left
            commented out in the official STEM (``img * sigmoid(rain) + img``), so that a
            closed mask passes the features through rather than erasing them.
    """

    def __init__(self, dim, num_heads, ffn_expansion_factor, bias, LayerNorm_type, feedforward,  # noqa: N803
                 topk=None, degradation_mask=False, backend="auto"):
        super().__init__()
        self.dim = dim
        self.norm_key = LayerNorm2d(dim, LayerNorm_type, backend=backend)
        self.norm_query = LayerNorm2d(dim, LayerNorm_type, backend=backend)
        self.norm_value = LayerNorm2d(dim, LayerNorm_type, backend=backend)
        self.attn = MultiInputAttention(dim, num_heads, bias, topk=topk, backend=backend)
        self.norm2 = LayerNorm2d(dim, LayerNorm_type, backend=backend)
        self.ffn = feedforward(dim, ffn_expansion_factor, bias)
        self.degradation_mask = PointwiseConv2d(dim, dim, bias=True, backend=backend) if degradation_mask else None

    def forward(self, key, query, value):
        """Three (B, dim, H, W) maps -> (B, dim, H, W): ``value`` plus attention, plus FFN."""
        _check_same_shape(self, self.dim, key=key, query=query, value=value)
        q_fea, k_fea, v_fea = self.norm_key(key), self.norm_query(query), self.norm_value(value)
        if self.degradation_mask is not None:
            gate = 1 + torch.sigmoid(self.degradation_mask(q_fea))
            k_fea, v_fea = k_fea * gate, v_fea * gate
        x = value + self.attn(q_fea, k_fea, v_fea)
        return x + self.ffn(self.norm2(x))
