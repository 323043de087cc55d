"""The sparse gated deblurring transformer (DSGformer): a reconstruction.

"Deep Sparse Gated Transformer for Image Deblurring" (GoPro) published no code; this network is
the composition its description gives, on the library's modules, with every choice a constructor
argument:

- Restormer's four-level U-Net (Zamir et al., CVPR 2022): 3x3 embedding, levels of
  dim·2^l channels with [4, 6, 6, 8] blocks and [1, 2, 4, 8] heads, pixel-unshuffle down and
  pixel-shuffle up, skip concatenation with a 1x1 reduction (none at level 1), 4 refinement
  blocks, 3x3 output plus the input image; pre-norm blocks with Restormer's channel LayerNorm.
- Attention: :class:`sparse_attn.nn.DeepSparseAttention` (DRSformer's top-k selection with a
  softmax and a ReLU² branch, AST-style dynamic weights).
- Feed-forward: :class:`sparse_attn.nn.FrequencyGatedFFN` (FFTformer's per-patch frequency filter
  with Restormer's gate).
The module names follow Restormer's, so the network is read like one.
"""
import functools

from torch import nn

from sparse_attn.nn import DeepSparseAttention, FrequencyGatedFFN

from .common import RestorationUNet, TransformerBlock


class DSGformer(RestorationUNet):
    """Sparse gated deblurring transformer (reconstruction; see the module docstring).

    Args (Restormer's, with its defaults): inp_channels, out_channels, dim, num_blocks,
        num_refinement_blocks, heads, ffn_expansion_factor, bias, LayerNorm_type.
    keep_fraction: (a, b): each attention row keeps its top int(d * a / b) scores (2/3).
    gate: the feed-forward gate, "gelu" or "relu2".
    patch_size: the frequency filter's patch side (8).
    recompute_spectrum: redo the filter's FFT in backward instead of saving the spectrum (True).
    backend: the op backend of every block: attention, norms and the gate ("auto" honours
        :func:`sparse_attn.use_backend`).

    ``forward`` takes images of any size (reflect-padded to a multiple of 8, cropped back).
    """

    def __init__(self, inp_channels=3, out_channels=3, dim=48, num_blocks=(4, 6, 6, 8), num_refinement_blocks=4,
                 heads=(1, 2, 4, 8), ffn_expansion_factor=2.66, bias=False, LayerNorm_type="WithBias",  # noqa: N803
                 keep_fraction=(2, 3), gate="gelu", patch_size=8, recompute_spectrum=True, backend="auto"):
        block = functools.partial(
            TransformerBlock, ffn_expansion_factor=ffn_expansion_factor, bias=bias, LayerNorm_type=LayerNorm_type,
            attention=functools.partial(DeepSparseAttention, keep_fraction=keep_fraction, backend=backend),
            feedforward=functools.partial(FrequencyGatedFFN, gate=gate, patch_size=patch_size,
                                          recompute_spectrum=recompute_spectrum, backend=backend),
            backend=backend)
        dim2 = int(dim * 2 ** 1)
        super().__init__(inp_channels, out_channels, dim, num_blocks, heads, bias, block,
                         refinement=lambda: nn.Sequential(*[block(dim2, heads[0]) for _ in range(num_refinement_blocks)]))
