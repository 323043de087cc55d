"""sparse-attn: fused Triton and C++/CUDA kernels for image-restoration transformers.

Ops: :func:`sparse_channel_attention`. Modules: :mod:`sparse_attn.nn`. Networks:
:mod:`sparse_attn.models`. Backends: :mod:`sparse_attn.backends` and :func:`use_backend`.
"""
from . import backends
from .backends import use_backend
from .ops import sparse_channel_attention
from . import nn

__all__ = ["backends", "use_backend", "sparse_channel_attention", "nn"]
__version__ = "0.1.0"
