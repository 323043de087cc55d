"""sparse-attn: fused Triton and C++/CUDA kernels for image-restoration transformers.

Ops: :func:`sparse_channel_attention`, :func:`mixed_scale_dwconv`, :func:`layer_norm2d`,
:func:`gated_dwconv`, :func:`depthwise_conv2d`, :func:`block_sparse_attention`, :func:`patch_attention`.
Modules: :mod:`sparse_attn.nn`.
Networks: :mod:`sparse_attn.models`. Backends: :mod:`sparse_attn.backends` and :func:`use_backend`.
"""
from . import backends
from .backends import use_backend
from .ops import (block_sparse_attention, depthwise_conv2d, gated_dwconv, layer_norm2d, mixed_scale_dwconv,
                  patch_attention, sparse_channel_attention)
from . import nn

__all__ = ["backends", "use_backend", "sparse_channel_attention", "mixed_scale_dwconv", "layer_norm2d", "gated_dwconv",
           "depthwise_conv2d", "block_sparse_attention", "patch_attention", "nn"]
__version__ = "0.1.0"
