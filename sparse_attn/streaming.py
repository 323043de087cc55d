"""Exact full-image inference in bounded memory: row bands with halos (DESIGN.md §7).

The channel attention of the Restormer family pools over the whole image: its d×d Gram matrix
``q kᵀ`` and the channel norms of q and k are sums over every pixel. Tiled inference therefore
runs another network (each tile its own attention), and seams show. But those sums are streaming
reductions, and everything else in these networks is local (1×1 and depthwise convolutions,
per-pixel norms, per-8×8 spectra) or is another global reduction of a held map (the mean that
gates DRSformer's MEFC experts). So the whole image runs exactly in row bands:

- The U-Net keeps its maps whole, each at its own channel count: the level-1 map (held inside
  a 2·dim buffer whose first half the decoder fills last, so the skip concatenation costs no
  copy, and which holds the level-3 and 4 maps meanwhile), the level-2 map, the padded input
  and the output. Nothing wider is ever held for the whole image.
- A transformer block updates its level's map in place in three walks over the bands: pass 1
  recomputes q and k of every band (norm, 1×1, depthwise 3×3 with a one-row halo) and sums
  their Gram matrix and squared norms; the d×d stage turns the sums into P (the reference's
  :func:`~sparse_attn.reference.attention_matrix`); pass 2 recomputes v, applies P, project_out
  and the residual; the feed-forward is band-local with its halo (4 rows for the mixed-scale
  FFN, 1 for Restormer's, 8 for the 8×8 frequency filter, whose bands start on patch rows).
- A walk writes each band one band late, so the halo rows it reads above a band are still the
  old ones (the band height must be at least the halo).
- Down- and up-sampling and the skip merges write the next level's map band by band from the
  held map of the other level; the merges write in place of the encoder's map of that level.

The result equals ``net(x)`` up to floating-point summation order.
"""
import contextlib
import math
import numbers
import sys

import torch
import torch.nn.functional as F
from torch import nn

from .nn import FrequencyGatedFFN, GatedDconvFFN, MixedScaleFFN
from .nn.attention import ChannelAttentionBase
from .nn.bands import PROGRESS, attended_rows, attention_matrix_of, banded_inference, fill_from, row_bands, \
    update_in_place, with_halo
from .nn.input_checks import check_feature_map

DEFAULT_BAND_ROWS = 64


class MemoryBudgetError(ValueError):
    """``max_memory`` is too small for even the narrowest bands; the message gives the figures."""


# ---------------------------------------------------------------------------------------------
# Reach of local modules
# ---------------------------------------------------------------------------------------------
def reach(module):
    """Rows of input either side of an output row that ``module`` reads: its stride-1
    convolutions' and poolings' radii, summed along a Sequential (or an ``op`` Sequential, as
    DRSformer's experts hold theirs), the largest of alternatives (``_ops``)."""
    if isinstance(module, (nn.Conv2d, nn.AvgPool2d, nn.MaxPool2d)):
        kernel = module.kernel_size if isinstance(module.kernel_size, int) else module.kernel_size[0]
        stride = module.stride if isinstance(module.stride, int) else module.stride[0]
        dilation = getattr(module, "dilation", 1)
        dilation = dilation if isinstance(dilation, int) else dilation[0]
        if stride != 1:
            raise ValueError(f"streaming: {type(module).__name__} with stride {stride} is not row-local")
        return dilation * (kernel - 1) // 2
    if isinstance(module, (nn.ReLU, nn.GELU, nn.Identity)):
        return 0
    if isinstance(module, nn.Sequential):
        return sum(reach(child) for child in module)
    if isinstance(getattr(module, "op", None), nn.Sequential):
        return reach(module.op)
    if isinstance(getattr(module, "_ops", None), nn.ModuleList):
        return max(reach(op) for op in module._ops)
    raise TypeError(f"streaming: no rule for the reach of {type(module).__name__}")


def ffn_halo(ffn):
    """(halo, alignment) of a feed-forward module's band walk: its depthwise convolutions'
    reach; the frequency filter works on p×p patches of the map, so its bands start on patch
    rows and read whole patches either side."""
    if isinstance(ffn, MixedScaleFFN):
        return reach(ffn.dwconv5x5) + reach(ffn.dwconv5x5_1), 1
    if isinstance(ffn, GatedDconvFFN):
        return reach(ffn.dwconv), 1
    if isinstance(ffn, FrequencyGatedFFN):
        p = ffn.patch_size
        return p * math.ceil(reach(ffn.dwconv) / p), p
    raise TypeError(f"streaming: no band rule for the feed-forward {type(ffn).__name__}")


# ---------------------------------------------------------------------------------------------
# Transformer blocks
# ---------------------------------------------------------------------------------------------
def attention_in_place(attn, norm, x, rows):
    """x ← x + attn(norm(x)) on the whole map, in two walks over the bands."""
    if not isinstance(attn, ChannelAttentionBase) or type(attn).attend is not ChannelAttentionBase.attend:
        raise TypeError(f"streaming: no band rule for the attention {type(attn).__name__} (streaming runs "
                        f"channel attentions defined by their branches)")
    p = attention_matrix_of(attn, x, rows, norm)

    def attend(part, first, last):
        return part[..., first:last, :] + attended_rows(attn, p, part, first, last, norm)

    update_in_place(x, attend, 1, rows)


def block_in_place(block, x, rows):
    """One transformer block (``x + attn(norm1(x))``, then ``x + ffn(norm2(x))``) on the whole map."""
    attention_in_place(block.attn, block.norm1, x, rows)
    halo, _ = ffn_halo(block.ffn)
    update_in_place(x, lambda part, first, last: part[..., first:last, :] + block.ffn(block.norm2(part))[
        ..., first:last, :], halo, rows)


def mefc_in_place(mefc, x, rows):
    """DRSformer's MEFC on the whole map: each gate's expert weights come from the mean of the
    held map (a global reduction, taken whole), every expert layer is a band walk with its reach.
    The lean or upstream form is chosen as ``MEFC.forward`` chooses it."""
    lean = mefc.runs_lean()
    for gate, group in zip(mefc.layers[0::2], mefc.layers[1::2]):
        weights = F.softmax(gate(x), dim=-1)
        update_in_place(x, lambda part, first, last: group.preprocess(part[..., first:last, :]), 0, rows)
        for i, layer in enumerate(group._ops):
            def step(part, first, last, layer=layer, w=weights[:, i, :]):
                return F.relu(layer(part, w, lean) + part)[..., first:last, :]
            update_in_place(x, step, reach(layer), rows)


def stage_in_place(stage, x, rows):
    """A level's Sequential of transformer blocks, an MEFC, or None."""
    if stage is None:
        return
    if isinstance(stage, nn.Sequential):
        for block in stage:
            block_in_place(block, x, rows)
    elif type(stage).__name__ == "MEFC":
        mefc_in_place(stage, x, rows)
    else:
        raise TypeError(f"streaming: no band rule for {type(stage).__name__}")


def _stage_halo(stage):
    """The largest halo of the walks of a stage (the least band height it can run with)."""
    if stage is None:
        return 0
    if isinstance(stage, nn.Sequential):
        return max([1] + [ffn_halo(block.ffn)[0] for block in stage])
    return max(reach(layer) for group in stage.layers[1::2] for layer in group._ops)


def _stage_alignment(stage):
    if isinstance(stage, nn.Sequential):
        return max([1] + [ffn_halo(block.ffn)[1] for block in stage])
    return 1


# ---------------------------------------------------------------------------------------------
# The U-Net
# ---------------------------------------------------------------------------------------------
def _stages(net):
    """(stage, level, channels) of every stage of the U-Net: its map's level (0 is full
    resolution) and channel count."""
    dim = net.patch_embed.proj.out_channels
    return [(net.encoder_level0, 0, dim), (net.encoder_level1, 0, dim), (net.encoder_level2, 1, 2 * dim),
            (net.encoder_level3, 2, 4 * dim), (net.latent, 3, 8 * dim), (net.decoder_level3, 2, 4 * dim),
            (net.decoder_level2, 1, 2 * dim), (net.decoder_level1, 0, 2 * dim), (net.refinement, 0, 2 * dim)]


def _largest_halo(net):
    return max(_stage_halo(stage) for stage, _, _ in _stages(net))


def band_requirements(net):
    """(least band rows, alignment) a network's walks need: the largest halo of its walks, and
    the patch rows its bands must start on (8 for an 8×8 frequency filter)."""
    alignment = math.lcm(*[_stage_alignment(stage) for stage, _, _ in _stages(net)])
    least = _largest_halo(net)
    return alignment * math.ceil(max(least, 1) / alignment), alignment


def kept_elements(net, batch, height, width):
    """Elements of the whole maps streaming holds at its fullest (the level-1 buffer, which also
    holds levels 3 and 4 while they live, with the level-2 map or with the output), for a padded
    ``height`` × ``width`` input. The caller's input and the cropped result are not counted."""
    pixels = height * width
    dim = net.patch_embed.proj.out_channels
    image = net.inp_channels * pixels  # the padded copy (the input itself when no padding is needed)
    level1 = 2 * dim * pixels
    level2 = 2 * dim * pixels // 4
    return batch * (image + level1 + max(level2, net.out_channels * pixels))


def _band_channel_rows(net, width):
    """Per band row (plus halos), the elements the widest walk has alive: its widest stage's
    channel count times the map width at that level, times the tensors it keeps at once
    (estimated from the stage: the FFN's hidden maps, the attention's q, k, v, MEFC's experts)."""
    return max((width >> level) * _working_channels(stage, channels)
               for stage, level, channels in _stages(net) if stage is not None)


def _working_channels(stage, channels):
    if isinstance(stage, nn.Sequential):
        working = 8 * channels  # the attention's walks: norm, q and k (or v), depthwise, P v
        for block in stage:
            hidden = block.ffn.hidden_features
            per_ffn = {MixedScaleFFN: 4 * hidden + 4 * channels, GatedDconvFFN: 6 * hidden + 4 * channels,
                       FrequencyGatedFFN: 14 * hidden + 4 * channels}[type(block.ffn)]
            working = max(working, per_ffn)
        return working
    return 20 * channels  # MEFC: the experts of one layer (upstream's form concatenates all eight)


def predicted_peak_bytes(net, shape, dtype, band_rows):
    """Predicted peak bytes of ``forward_streaming`` on an input of ``shape`` (B, C, H, W): the
    kept maps plus the widest walk's band working set."""
    batch, _, height, width = shape
    height, width = _padded(height), _padded(width)
    element = torch.empty((), dtype=dtype).element_size()
    rows = min(band_rows + 2 * _largest_halo(net), height)
    return element * (kept_elements(net, batch, height, width) + batch * rows * _band_channel_rows(net, width))


def _padded(side, multiple=8):
    return side + (-side) % multiple


def choose_band_rows(net, shape, dtype, band_rows=None, max_memory=None):
    """The band height: ``band_rows`` (checked), else the largest multiple of the alignment
    whose predicted peak fits ``max_memory``, else DEFAULT_BAND_ROWS (rounded to the alignment).
    Raises MemoryBudgetError when the budget cannot hold even the narrowest bands."""
    least, alignment = band_requirements(net)
    height = _padded(shape[-2])
    if band_rows is not None:
        if isinstance(band_rows, bool) or not isinstance(band_rows, numbers.Integral):
            raise TypeError(f"band_rows: expected an integer, got {type(band_rows).__name__}")
        if band_rows < least or band_rows % alignment:
            raise ValueError(f"band_rows: {type(net).__name__} needs bands of at least {least} rows"
                             + (f" and a multiple of {alignment} (its {alignment}x{alignment} patches)" if alignment > 1 else "")
                             + f", got {band_rows}")
    if max_memory is not None:
        if isinstance(max_memory, bool) or not isinstance(max_memory, numbers.Real) or not max_memory > 0:
            raise ValueError(f"max_memory: expected a positive number of bytes, got {max_memory!r}")
        fits = lambda rows: predicted_peak_bytes(net, shape, dtype, rows) <= max_memory  # noqa: E731
        if not fits(least):
            kept = torch.empty((), dtype=dtype).element_size() * kept_elements(
                net, shape[0], height, _padded(shape[-1]))
            raise MemoryBudgetError(
                f"max_memory: {max_memory / 2**20:.1f} MiB cannot run {type(net).__name__} on "
                f"{tuple(shape)} in {str(dtype).replace('torch.', '')}: the whole maps it keeps take "
                f"{kept / 2**20:.1f} MiB and the narrowest bands ({least} rows) need "
                f"{predicted_peak_bytes(net, shape, dtype, least) / 2**20:.1f} MiB in all")
        if band_rows is not None:
            if not fits(band_rows):
                raise MemoryBudgetError(
                    f"max_memory: {max_memory / 2**20:.1f} MiB is less than the "
                    f"{predicted_peak_bytes(net, shape, dtype, band_rows) / 2**20:.1f} MiB predicted for "
                    f"band_rows={band_rows}; leave band_rows unset to choose them by the budget")
            return band_rows
        rows = least
        while rows < height and fits(rows + alignment):
            rows += alignment
        return rows
    if band_rows is not None:
        return band_rows
    return max(least, alignment * math.ceil(DEFAULT_BAND_ROWS / alignment))


def _walks(stage):
    """Band walks a stage makes over its level's map: three per transformer block (pass 1, pass 2,
    the feed-forward), one per MEFC gate group's preprocessing and one per expert layer."""
    if stage is None:
        return 0
    if isinstance(stage, nn.Sequential):
        return 3 * len(stage)
    return sum(1 + len(group._ops) for group in stage.layers[1::2])


def band_steps(net, height, rows):
    """Bands ``forward_streaming`` walks on an input ``height`` rows high (padded) with bands of
    ``rows`` (the progress bar's total): every stage's walks, the embedding, the three
    down-samplings, the two merges, the last up-sampling and the output."""
    def bands(level):
        return math.ceil((height >> level) / rows)
    stages = sum(_walks(stage) * bands(level) for stage, level, _ in _stages(net))
    return stages + 3 * bands(0) + bands(1) + bands(2) + bands(3) + bands(2) + bands(1)


def _progress_bar(progress, total, description):
    """A tqdm bar of ``total`` bands: shown when ``progress`` is True; when it is None, shown on
    a terminal only, and only once the run has taken two seconds; never when False."""
    if progress is False:
        return contextlib.nullcontext(PROGRESS.get())
    from tqdm import tqdm

    auto = progress is None
    return tqdm(total=total, desc=description, unit="band", leave=not auto, file=sys.stderr,
                disable=None if auto else False, delay=2 if auto else 0)


def forward_streaming(net, x, band_rows=None, max_memory=None, progress=None):
    """``net(x)`` for a Restormer-family U-Net (see :class:`~sparse_attn.models.common.RestorationUNet`),
    computed in row bands so that memory stays bounded whatever the image size; no gradients.

    Args:
        net: a DRSformer (with or without MEFC), Restormer or DSGformer.
        x: (B, inp_channels, H, W) images, any H, W (reflect-padded to multiples of 8 and cropped
            back, as ``forward``).
        band_rows: rows per band at every level (at least the largest halo of the network's
            walks; a multiple of 8 for DSGformer). Memory grows with it, the recomputed halo rows
            shrink relative to it.
        max_memory: a budget in bytes for the predicted peak (the kept maps and one band's working
            set): the band height is the largest that fits. A MemoryBudgetError says when even
            the narrowest bands do not.
        progress: a tqdm bar of the bands walked (on stderr): None shows it on a terminal for
            runs longer than two seconds, True always, False never.

    Returns:
        (B, out_channels, H, W): the same as ``net(x)`` up to floating-point summation order.
    """
    from .models.common import RestorationUNet, pad_to_multiple

    if not isinstance(net, RestorationUNet):
        raise NotImplementedError(getattr(net, "streaming_unsupported", None) or (
            f"net: streaming runs the Restormer-family U-Net (DRSformer, Restormer, DSGformer), not "
            f"{type(net).__name__}"))
    check_feature_map(net, x, net.inp_channels)
    if progress is not None and not isinstance(progress, bool):
        raise TypeError(f"progress: expected None, True or False, got {progress!r}")
    if x.numel() and not torch.isfinite(x).all():
        raise ValueError("x: contains non-finite values (inf or nan)")
    rows = choose_band_rows(net, x.shape, x.dtype, band_rows, max_memory)

    batch, _, height, width = x.shape
    if batch == 0:  # as forward: the levels of an empty batch would not fit
        return x.new_empty((0, net.out_channels, height, width))
    image = pad_to_multiple(x)
    total = band_steps(net, image.shape[-2], rows)
    description = f"{type(net).__name__} {width}x{height} streaming"
    # The blocks' own banded inference is off: streaming's walks are bands already.
    with torch.no_grad(), banded_inference(False), _progress_bar(progress, total, description) as bar:
        token = PROGRESS.set(bar)
        try:
            return _unet(net, image, rows)[..., :height, :width]
        finally:
            PROGRESS.reset(token)


def _unet(net, image, rows):
    b, _, height, width = image.shape
    dim = net.patch_embed.proj.out_channels

    def new_map(channels, level):
        return image.new_empty((b, channels, height >> level, width >> level))

    # Level 1: the decoder's 2·dim buffer; the encoder works in its second half, which is the
    # skip half of the decoder's concatenation [up2_1(level 2), encoder level 1].
    level1 = new_map(2 * dim, 0)
    encoder1 = level1[:, dim:]
    fill_from(encoder1, image, lambda part, first, last: net.patch_embed(part)[..., first:last, :], rows)
    stage_in_place(net.encoder_level0, encoder1, rows)
    stage_in_place(net.encoder_level1, encoder1, rows)

    # Levels 3 and 4 live in the first half of the level-1 buffer, idle until the decoder's last
    # merge (by then both are consumed): 3/8 of it. Level 2 cannot, as that merge reads it.
    skips = [encoder1]
    idle = _IdleRegion(level1, dim)
    for down, stage, level in ((net.down1_2, net.encoder_level2, 1), (net.down2_3, net.encoder_level3, 2),
                               (net.down3_4, net.latent, 3)):
        lower = new_map(dim * 2 ** level, level) if level == 1 else idle.take(dim * 2 ** level, level)
        fill_from(lower, skips[-1], lambda part, first, last, down=down: down(part)[..., first:last, :], rows,
                  scale=2, halo=2)
        stage_in_place(stage, lower, rows)
        skips.append(lower)

    x = skips.pop()  # the latent
    for up, reduce, stage in ((net.up4_3, net.reduce_chan_level3, net.decoder_level3),
                              (net.up3_2, net.reduce_chan_level2, net.decoder_level2)):
        skip = skips.pop()
        _merge_in_place(skip, x, up, reduce, rows)
        x = skip
        stage_in_place(stage, x, rows)

    fill_from(level1[:, :dim], x, lambda part, first, last: net.up2_1(part)[..., first:last, :], rows,
              scale=0.5, halo=1)
    del x, skips  # the level-2 map: the decoder's level 1 holds the level-1 buffer only
    stage_in_place(net.decoder_level1, level1, rows)
    stage_in_place(net.refinement, level1, rows)

    out = image.new_empty((b, net.out_channels, height, width))
    if net.skip_conv is None:
        for start, stop in row_bands(height, rows):
            lo, hi = with_halo(height, start, stop, 1)
            out[..., start:stop, :] = (net.output(level1[..., lo:hi, :])[..., start - lo:stop - lo, :]
                                       + image[..., start:stop, :])
    else:  # Restormer's dual-pixel form: the embedding is recomputed from the image, not kept
        for start, stop in row_bands(height, rows):
            lo, hi = with_halo(height, start, stop, 2)
            merged = level1[..., lo:hi, :] + net.skip_conv(net.patch_embed(image[..., lo:hi, :]))
            out[..., start:stop, :] = net.output(merged)[..., start - lo:stop - lo, :]
    return out


class _IdleRegion:
    """Maps carved, one after the other, out of the first ``channels`` channels of every batch
    element of a contiguous (B, C, H, W) buffer, each map (B, c, H >> level, W >> level)."""

    def __init__(self, buffer, channels):
        self.buffer, self.free = buffer, channels * buffer.shape[-2] * buffer.shape[-1]
        self.offset = buffer.storage_offset()

    def take(self, channels, level):
        b, _, height, width = self.buffer.shape
        height, width = height >> level, width >> level
        size = channels * height * width
        if size > self.free:
            raise AssertionError("streaming: the idle region is too small")  # a bug, not an input error
        view = self.buffer.as_strided((b, channels, height, width), (self.buffer.stride(0), height * width, width, 1),
                                      self.offset)
        self.offset, self.free = self.offset + size, self.free - size
        return view


def _merge_in_place(skip, lower, up, reduce, rows):
    """skip ← reduce(cat(up(lower), skip)) band by band: the decoder's merge of a level, written
    over the encoder's map of that level (the 1x1 reads a band's own rows only)."""
    height = lower.shape[-2]
    for start, stop in row_bands(skip.shape[-2], rows):
        lo, hi = with_halo(height, start // 2, (stop + 1) // 2, 1)
        upsampled = up(lower[..., lo:hi, :])[..., start - 2 * lo:stop - 2 * lo, :]
        skip[..., start:stop, :] = reduce(torch.cat([upsampled, skip[..., start:stop, :]], 1))
