"""DRSformer (Chen et al., "Learning A Sparse Transformer Network for Effective Image Deraining",
CVPR 2023) on the library's modules, with the official module and parameter names.

Every sparse transformer block runs :class:`sparse_attn.nn.TopKChannelAttention` (TKSA) and
:class:`sparse_attn.nn.MixedScaleFFN` (MSFN), so :func:`sparse_attn.use_backend` moves the whole
network between backends. The mixture-of-experts feature compensator (MEFC, the official
``subnet``) is plain PyTorch convolutions: it has no attention or feed-forward block, but off the
``reference`` backend it runs in a memory-lean form (see :class:`MEFC`).
"""
import functools

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from sparse_attn import backends, depthwise_conv2d
from sparse_attn.nn import MixedScaleFFN, TopKChannelAttention
from sparse_attn.nn.depthwise import depthwise
from sparse_attn.nn.input_checks import check_feature_map
from sparse_attn.nn.pointwise import pointwise_conv2d

from .common import RestorationUNet, TransformerBlock


# ---------------------------------------------------------------------------------------------
# MEFC: the official `subnet` and its parts (names as upstream, so checkpoints load)
# ---------------------------------------------------------------------------------------------
class SepConv(nn.Module):
    """Depthwise k x k -> 1x1 -> ReLU -> depthwise k x k -> 1x1, no biases (``op`` indices 0, 1, 3, 4)."""

    def __init__(self, channels, kernel_size):
        super().__init__()
        pad = kernel_size // 2
        self.op = nn.Sequential(
            nn.Conv2d(channels, channels, kernel_size, padding=pad, groups=channels, bias=False),
            nn.Conv2d(channels, channels, 1, bias=False),
            nn.ReLU(),
            nn.Conv2d(channels, channels, kernel_size, padding=pad, groups=channels, bias=False),
            nn.Conv2d(channels, channels, 1, bias=False))

    def forward(self, x):
        return self.op(x)


class DilConv(nn.Module):
    """Depthwise k x k with dilation 2 (same size) -> 1x1, no biases."""

    def __init__(self, channels, kernel_size):
        super().__init__()
        self.op = nn.Sequential(
            nn.Conv2d(channels, channels, kernel_size, padding=kernel_size - 1, dilation=2, groups=channels,
                      bias=False),
            nn.Conv2d(channels, channels, 1, bias=False))

    def forward(self, x):
        return self.op(x)


class ConvReLU(nn.Module):
    """1x1 conv then ReLU (upstream's ``ReLUConv``, whose ``op`` is in this order)."""

    def __init__(self, channels):
        super().__init__()
        self.op = nn.Sequential(nn.Conv2d(channels, channels, 1, bias=False), nn.ReLU())

    def forward(self, x):
        return self.op(x)


def _expert_operations(channels):
    """The eight experts, in the official order (their indices are checkpoint keys)."""
    return [SepConv(channels, 1), SepConv(channels, 3), SepConv(channels, 5), SepConv(channels, 7),
            DilConv(channels, 3), DilConv(channels, 5), DilConv(channels, 7),
            nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False)]


NUM_EXPERTS = len(_expert_operations(1))


class OperationLayer(nn.Module):
    """Every expert on x, each scaled by its per-image weight, concatenated, 1x1 back to C + ReLU."""

    def __init__(self, channels):
        super().__init__()
        self._ops = nn.ModuleList(_expert_operations(channels))
        self._out = nn.Sequential(nn.Conv2d(channels * NUM_EXPERTS, channels, 1, bias=False), nn.ReLU())

    def forward(self, x, weights, lean=False, backend="auto"):
        """weights: (B, NUM_EXPERTS). lean: sum the experts' shares of the 1x1 instead of
        concatenating their outputs (the same sum, in another order), so that one expert's
        output is alive at a time rather than all eight and their concatenation; an expert's own
        closing 1x1 is folded into its share, and its depthwise convolutions (and the average
        pool, a depthwise sum) run on :func:`sparse_attn.depthwise_conv2d` on ``backend``."""
        scales = [weights[:, i].reshape(-1, 1, 1, 1) for i in range(len(self._ops))]
        if not lean:
            return self._out(torch.cat([op(x) * s for op, s in zip(self._ops, scales)], dim=1))
        channels = x.shape[1]
        shares = self._out[0].weight.split(channels, dim=1)  # the 1x1's input channels, expert by expert
        out = None
        for op, scale, share in zip(self._ops, scales, shares):
            if isinstance(op, (SepConv, DilConv)):
                # The expert ends in a 1x1 too: one product of two C x C matrices replaces a
                # 1x1 convolution of the whole map (forward and backward).
                body, last = op.op[:-1], op.op[-1]
                share = (share.reshape(channels, channels) @ last.weight.reshape(channels, channels)
                         ).reshape(channels, channels, 1, 1)
                expert = x
                for layer in body:
                    expert = depthwise(layer, expert, backend) if isinstance(layer, nn.Conv2d) else layer(expert)
            else:
                expert = _average_pool(op, x, backend)
            term = pointwise_conv2d(expert * scale, share, None, backend)
            out = term if out is None else out.add_(term)  # no autograd node needs a term back
        return self._out[1](out)


def _average_pool(pool, x, backend):
    """The 3x3 average pool expert (stride 1, padding 1, ``count_include_pad=False``) as a
    depthwise sum of ones times 1 / (the pixels of each window inside the map): the same values up
    to rounding (a product by the reciprocal where the pool divides)."""
    if x.numel() == 0 or (pool.kernel_size, pool.stride, pool.padding, pool.count_include_pad) != (3, 1, 1, False):
        return pool(x)
    h, w = x.shape[-2:]
    counts = _inside(h, x)[:, None] * _inside(w, x)[None, :]
    return depthwise_conv2d(x, x.new_ones(x.shape[1], 1, 3, 3), None, 1, backend=backend) * counts.reciprocal()


def _inside(n, like):
    """For each of n positions, how many of the 3 taps of a window centred there lie in [0, n)."""
    counts = like.new_full((n,), 3.0)
    counts[0] -= 1
    counts[-1] -= 1  # n = 1: the one position loses both neighbours
    return counts


class GroupOLs(nn.Module):
    """1x1 conv + ReLU, then ``steps`` residual OperationLayers: x = relu(layer(x) + x)."""

    def __init__(self, steps, channels):
        super().__init__()
        self.preprocess = ConvReLU(channels)
        self._steps = steps
        self._ops = nn.ModuleList(OperationLayer(channels) for _ in range(steps))

    def forward(self, x, weights, lean=False, backend="auto"):
        """weights: (B, steps, NUM_EXPERTS); lean, backend: see OperationLayer."""
        if lean:  # the preprocessing 1x1 as products too (see sparse_attn.nn.pointwise)
            x = F.relu(pointwise_conv2d(x, self.preprocess.op[0].weight, None, backend))
        else:
            x = self.preprocess(x)
        for i, layer in enumerate(self._ops):
            x = F.relu(layer(x, weights[:, i, :], lean, backend) + x)
        return x


class OALayer(nn.Module):
    """The gate: global average pool -> Linear -> ReLU -> Linear to (steps, NUM_EXPERTS) logits."""

    def __init__(self, channel, k, num_ops):
        super().__init__()
        self.k, self.num_ops = k, num_ops
        self.ca_fc = nn.Sequential(nn.Linear(channel, k * num_ops * 2), nn.ReLU(),
                                   nn.Linear(k * num_ops * 2, k * num_ops))

    def forward(self, x):
        return self.ca_fc(x.mean(dim=(2, 3))).reshape(-1, self.k, self.num_ops)


class MEFC(nn.Module):
    """DRSformer's mixture-of-experts feature compensator (the official ``subnet``).

    ``layer_num`` times: an OALayer computes softmax weights over the eight experts for each of
    ``steps`` steps from the pooled input, and a GroupOLs applies them. ``layers`` alternates
    OALayer and GroupOLs, as upstream.

    MEFC works at full resolution with eight experts, so upstream's form is DRSformer's largest
    memory cost: the no-grad peak of the whole network (all eight expert outputs and their
    concatenation alive at once) and about 40% of what a training step saves for backward
    (every expert's intermediates). Unless ``reference`` is requested (by ``backend``, else by
    ``use_backend``; decided from the request, so that a build without the extension keeps the
    same form) it runs a lean form with the same result up to rounding:
    the experts are summed through their shares of the output 1x1 one at a time (an expert's own
    closing 1x1 folded into its share), and in training the whole compensator is recomputed in
    backward (activation checkpointing), so that autograd keeps only its input. The fold about
    pays for the recomputation: a checkpointed lean MEFC trains as fast as upstream's. The
    ``reference`` backend runs upstream's form.
    """

    def __init__(self, dim, layer_num=1, steps=4, backend="auto"):
        super().__init__()
        self._C, self._layer_num, self._steps = dim, layer_num, steps
        self.backend = backend
        self.num_ops = NUM_EXPERTS
        self.layers = nn.ModuleList()
        for _ in range(layer_num):
            self.layers.append(OALayer(dim, steps, NUM_EXPERTS))
            self.layers.append(GroupOLs(steps, dim))

    def runs_lean(self):
        """Whether the lean form runs: off ``reference``, judged by the request (not by what a
        build resolves it to)."""
        return backends.requested(self.backend) != "reference"

    def forward(self, x):
        """(B, dim, H, W) -> (B, dim, H, W)."""
        check_feature_map(self, x, self._C)
        if not self.runs_lean():
            return self._compensate(x, lean=False)
        if torch.is_grad_enabled():
            return checkpoint(self._compensate, x, True, use_reentrant=False)
        return self._compensate(x, lean=True)

    def _compensate(self, x, lean):
        for i in range(0, len(self.layers), 2):
            weights = F.softmax(self.layers[i](x), dim=-1)
            x = self.layers[i + 1](x, weights, lean, self.backend)
        return x


# ---------------------------------------------------------------------------------------------
# The network
# ---------------------------------------------------------------------------------------------
class DRSformer(RestorationUNet):
    """DRSformer: Restormer's U-Net with top-k sparse attention, mixed-scale FFN and MEFC.

    Arguments and defaults are the official ones (``DRSformer_arch.py``), plus:

    mefc: True (default) builds the network of ``DRSformer_arch.py``, with an MEFC after the patch
        embedding (``encoder_level0``) and one on the 2·dim decoder output (``refinement``).
        False builds ``DRSformer_arch_200L+SPA.py``, which the authors use for Rain200L and
        SPA-Data: the same network without the two MEFCs.
    backend: the op backend of every block ("auto" honours :func:`sparse_attn.use_backend`).

    The default configuration has 33,655,424 parameters (32,610,304 with ``mefc=False``).
    Unlike the official module, ``forward`` accepts any image size (see
    :class:`~sparse_attn.models.common.RestorationUNet`); on sizes that are multiples of 8 it
    computes exactly what the official one does.
    """

    def __init__(self, inp_channels=3, out_channels=3, dim=48, num_blocks=(4, 6, 6, 8), heads=(1, 2, 4, 8),
                 ffn_expansion_factor=2.66, bias=False, LayerNorm_type="WithBias", mefc=True,  # noqa: N803
                 backend="auto"):
        block = functools.partial(
            TransformerBlock, ffn_expansion_factor=ffn_expansion_factor, bias=bias, LayerNorm_type=LayerNorm_type,
            attention=functools.partial(TopKChannelAttention, backend=backend),
            feedforward=functools.partial(MixedScaleFFN, backend=backend), backend=backend)
        super().__init__(inp_channels, out_channels, dim, num_blocks, heads, bias, block,
                         stem=functools.partial(MEFC, dim, backend=backend) if mefc else None,
                         refinement=functools.partial(MEFC, int(dim * 2 ** 1), backend=backend) if mefc else None)
        self.mefc = mefc

    def _config_summary(self):
        return f"{super()._config_summary()}, mefc={self.mefc}"

    def _checkpoint_hint(self, missing, unexpected):
        mefc_key = ("encoder_level0.", "refinement.")
        if not self.mefc and any(k.startswith(mefc_key) for k in unexpected):
            return "the checkpoint has MEFC weights: construct DRSformer(mefc=True)"
        if self.mefc and unexpected == [] and all(k.startswith(mefc_key) for k in missing):
            return "the checkpoint has no MEFC (Rain200L / SPA-Data models): construct DRSformer(mefc=False)"
        return ""
