"""Restormer (Zamir et al., "Restormer: Efficient Transformer for High-Resolution Image
Restoration", CVPR 2022) on the library's modules, with the official module and parameter names.

Its multi-Dconv head transposed attention runs as :class:`sparse_attn.nn.ChannelAttention`, the
channel-attention op with one dense branch (``topk=(d,)``): the dense baseline of the top-k
networks, on the same kernels.
"""
import functools

from torch import nn

from sparse_attn.nn import ChannelAttention, GatedDconvFFN

from .common import RestorationUNet, TransformerBlock


class Restormer(RestorationUNet):
    """Restormer: MDTA + GDFN blocks in a four-level U-Net with refinement blocks.

    Arguments and defaults are the official ones (``restormer_arch.py``), plus ``backend`` (the op
    backend of every block: attention, norms and GDFN; "auto" honours :func:`sparse_attn.use_backend`).
    ``dual_pixel_task=True`` (dual-pixel defocus deblurring; use ``inp_channels=6``) adds the
    official ``skip_conv`` from the embedding to the output and drops the global residual.
    The default configuration has 26,126,644 parameters. ``forward`` accepts any image size
    (see :class:`~sparse_attn.models.common.RestorationUNet`).
    """

    def __init__(self, inp_channels=3, out_channels=3, dim=48, num_blocks=(4, 6, 6, 8), num_refinement_blocks=4,
                 heads=(1, 2, 4, 8), ffn_expansion_factor=2.66, bias=False, LayerNorm_type="WithBias",  # noqa: N803
                 dual_pixel_task=False, backend="auto"):
        block = functools.partial(
            TransformerBlock, ffn_expansion_factor=ffn_expansion_factor, bias=bias, LayerNorm_type=LayerNorm_type,
            attention=functools.partial(ChannelAttention, backend=backend),
            feedforward=functools.partial(GatedDconvFFN, backend=backend), backend=backend)
        dim2 = int(dim * 2 ** 1)
        super().__init__(inp_channels, out_channels, dim, num_blocks, heads, bias, block,
                         refinement=lambda: nn.Sequential(*[block(dim2, heads[0]) for _ in range(num_refinement_blocks)]),
                         skip_conv=functools.partial(nn.Conv2d, dim, dim2, kernel_size=1, bias=bias) if dual_pixel_task
                         else None)
        self.dual_pixel_task = dual_pixel_task

    def _config_summary(self):
        return f"{super()._config_summary()}, dual_pixel_task={self.dual_pixel_task}"

    def _checkpoint_hint(self, missing, unexpected):
        if not self.dual_pixel_task and any(k.startswith("skip_conv.") for k in unexpected):
            return "the checkpoint is a dual-pixel model: construct Restormer(dual_pixel_task=True, inp_channels=6)"
        if self.dual_pixel_task and any(k.startswith("skip_conv.") for k in missing):
            return "the checkpoint is not a dual-pixel model: construct Restormer(dual_pixel_task=False)"
        return ""
