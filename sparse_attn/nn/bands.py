"""Row bands with halos: a local map evaluated band by band, and the channel attention's two
banded passes (DESIGN.md §7).

Everything in a Restormer-family block is local (1×1 and depthwise convolutions, per-pixel
norms) except the channel attention's d×d Gram matrix and channel norms, which are sums over the
pixels and so can be summed band by band. Two users share these pieces:

- no-grad inference of the blocks themselves: :class:`~sparse_attn.nn.GatedDconvFFN` and
  :class:`~sparse_attn.nn.ChannelAttentionBase` evaluate their forward in bands (see
  :func:`inference_band_rows`), so that their widest intermediates (the FFN's 2h hidden channels,
  the attention's 3·dim q, k, v) never exist for the whole image;
- whole-network streaming (:mod:`sparse_attn.streaming`), which also keeps the network's maps in
  place band by band.

Banded results equal the unbanded ones up to floating-point summation order: the local maps do
the same arithmetic per pixel, the Gram matrix and norms are summed band by band.
"""
import contextlib
import contextvars
import math
import numbers

import torch

from ..backends import requested
from ..reference import attention_matrix, scores_from_gram
from .depthwise import depthwise
from .pointwise import pointwise_conv2d


# ---------------------------------------------------------------------------------------------
# Bands and local walks
# ---------------------------------------------------------------------------------------------
class _NoProgress:
    def update(self, n=1):
        pass


# The progress bar of a streaming run (sparse_attn.streaming sets it); every band walked counts.
PROGRESS = contextvars.ContextVar("band progress", default=_NoProgress())


def row_bands(height, rows):
    """(start, stop) of the row bands of a map ``height`` rows high; each band the caller is
    done with counts one step on the current progress bar (:data:`PROGRESS`)."""
    progress = PROGRESS.get()
    for start in range(0, height, rows):
        yield start, min(start + rows, height)
        progress.update(1)


def with_halo(height, start, stop, halo):
    """The rows [lo, hi) that band [start, stop) reads with ``halo`` rows either side, clipped."""
    return max(start - halo, 0), min(stop + halo, height)


def update_in_place(x, fn, halo, rows):
    """Replace every row band of ``x`` (B, C, H, W) by ``fn`` of it, in place.

    ``fn(part, first, last)`` gets x's rows [lo, hi) — the band [start, stop) with ``halo`` rows
    either side, clipped to the map — and returns the new rows [start, stop), which are
    ``part``'s rows [first, last). It must be local: its rows depend on the input rows within
    ``halo`` of them, with the map's edges treated as its convolutions treat them (the clipped
    slice's edges are the map's). Each band is written once the next one has been computed, so
    every band reads old rows only; this needs ``rows >= halo``.
    """
    if rows < halo:
        raise ValueError(f"band rows: {rows} is less than the halo of {halo} rows this walk needs")
    height = x.shape[-2]
    pending = None
    for start, stop in row_bands(height, rows):
        lo, hi = with_halo(height, start, stop, halo)
        new = fn(x[..., lo:hi, :], start - lo, stop - lo)
        if pending is not None:
            x[..., pending[0]:pending[1], :] = pending[2]
        pending = (start, stop, new)
    x[..., pending[0]:pending[1], :] = pending[2]


def map_rows(x, fn, halo, rows):
    """A new map, row band by row band: its rows [start, stop) are ``fn(part, first, last)`` with
    ``part`` = x's rows [lo, hi) (the band with ``halo`` rows either side, clipped) and [first,
    last) the band's rows within ``part``, as :func:`update_in_place`. The result takes its
    channels, dtype and device from the first band's."""
    height = x.shape[-2]
    out = None
    for start, stop in row_bands(height, rows):
        lo, hi = with_halo(height, start, stop, halo)
        new = fn(x[..., lo:hi, :], start - lo, stop - lo)
        if out is None:
            out = new.new_empty((*new.shape[:-2], height, new.shape[-1]))
        out[..., start:stop, :] = new
    return out


def fill_from(out, src, fn, rows, scale=1, halo=1):
    """Write ``out`` (another map than ``src``) band by band: out's rows [start, stop) are
    ``fn(part, first, last)``, where ``part`` holds src's rows from ``start·scale`` to
    ``stop·scale`` (rounded outwards) with ``halo`` rows either side and fn returns part's rows
    [first, last) mapped to out (``scale`` = 2 for a 2× downsampling, 1/2 for an upsampling:
    then ``fn`` returns 2·(hi - lo) rows and [first, last) index those)."""
    height = src.shape[-2]
    for start, stop in row_bands(out.shape[-2], rows):
        lo, hi = with_halo(height, math.floor(start * scale), math.ceil(stop * scale), halo)
        out[..., start:stop, :] = fn(src[..., lo:hi, :], start - round(lo / scale), stop - round(lo / scale))


# ---------------------------------------------------------------------------------------------
# The channel attention in two passes
# ---------------------------------------------------------------------------------------------
def _accumulation_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _identity(x):
    return x


def projected_rows(attn, part, channels, first, last, norm=_identity):
    """Rows [first, last) of the channels ``channels`` (a slice of the 3C) of
    ``qkv_dwconv(qkv(norm(part)))`` of a :class:`~sparse_attn.nn.ChannelAttentionBase`."""
    bias = attn.qkv.bias[channels] if attn.qkv.bias is not None else None
    y = pointwise_conv2d(norm(part), attn.qkv.weight[channels], bias, attn.backend)
    y = depthwise(attn.qkv_dwconv, y, attn.backend, channels)
    return y[..., first:last, :]


def attention_matrix_of(attn, x, rows, norm=_identity):
    """Pass 1 and the d×d stage: P (B, heads, d, d) of ``attn`` (its ``branches``) on
    ``norm(x)``, from the Gram matrix and squared norms of q and k summed band by band (in
    float64 for float64 maps, else float32)."""
    b, c, height, _ = x.shape
    heads, d = attn.num_heads, c // attn.num_heads
    acc = _accumulation_dtype(x.dtype)
    gram = x.new_zeros((b, heads, d, d), dtype=acc)
    q_square, k_square = x.new_zeros((b, heads, d), dtype=acc), x.new_zeros((b, heads, d), dtype=acc)
    for start, stop in row_bands(height, rows):
        lo, hi = with_halo(height, start, stop, 1)
        qk = projected_rows(attn, x[..., lo:hi, :], slice(0, 2 * c), start - lo, stop - lo, norm)
        q, k = qk.reshape(b, 2, heads, d, -1).to(acc).unbind(1)
        gram += q @ k.transpose(-2, -1)
        q_square += q.square().sum(-1)
        k_square += k.square().sum(-1)
    weights, topk, activation = attn.branches(d)
    scores = scores_from_gram(gram, q_square, k_square, attn.temperature.to(acc))
    return attention_matrix(scores, weights.to(acc), topk, activation)


def attended_rows(attn, p, part, first, last, norm=_identity):
    """Pass 2 on one band: rows [first, last) of ``project_out(P v)``, v recomputed from
    ``norm(part)``; ``p`` from :func:`attention_matrix_of`."""
    b, c, _, width = part.shape
    heads, d = attn.num_heads, c // attn.num_heads
    v = projected_rows(attn, part, slice(2 * c, 3 * c), first, last, norm)
    out = (p @ v.reshape(b, heads, d, -1).to(p.dtype)).to(v.dtype).reshape(b, c, last - first, width)
    return attn.project_out(out)


# ---------------------------------------------------------------------------------------------
# When the blocks band their own no-grad inference
# ---------------------------------------------------------------------------------------------
# Pixels per band when banding is automatic: 32 rows of a 512-wide map. A band's widest
# intermediate (Restormer's FFN at dim 96: 510 channels) is then ~35 MB in float32 against ~535
# MB for the whole 512×512 map; the recomputed halo rows add 2/32 to the banded 1×1 and depthwise
# work, and the bands' working sets, closer to the caches, more than pay for it (Restormer's
# no-grad forward on one thread at 256²: 8192 to 16384 pixels per band ran fastest, 1.3-1.4×
# faster than unbanded; at 512² 16384 ran faster than 8192 or 32768).
AUTO_BAND_PIXELS = 16384

_BAND_ROWS = contextvars.ContextVar("inference band rows", default=None)


@contextlib.contextmanager
def banded_inference(rows=None):
    """Within the block, how no-grad forwards of the banding modules (GatedDconvFFN,
    PReLUGatedFFN, ChannelAttentionBase and its subclasses that define ``branches``) run:

    - ``None`` (the default outside any block): automatically, on CPU maps on every backend but
      ``reference`` (which keeps what the official code keeps, being the baseline), in bands of
      about :data:`AUTO_BAND_PIXELS` pixels when the map has more rows than one band;
    - an integer ``rows`` >= 1: in bands of ``rows`` rows on every backend and device;
    - ``False``: never.

    Banding never applies while gradients are recorded or under ``torch.compile``.
    """
    if rows is not None and rows is not False and (
            isinstance(rows, bool) or not isinstance(rows, numbers.Integral) or rows < 1):
        raise ValueError(f"rows: expected None, False or a positive integer, got {rows!r}")
    token = _BAND_ROWS.set(rows)
    try:
        yield
    finally:
        _BAND_ROWS.reset(token)


def inference_band_rows(x, backend, halo=1):
    """The band height a module on ``backend`` should run its forward on the map ``x`` with, or
    None to run it whole (see :func:`banded_inference`). At least ``halo`` rows."""
    if torch.is_grad_enabled() or torch.compiler.is_compiling():
        return None
    rows = _BAND_ROWS.get()
    if rows is False:
        return None
    height, width = x.shape[-2:]
    if rows is None:
        if x.device.type != "cpu" or requested(backend) == "reference":
            return None
        rows = math.ceil(AUTO_BAND_PIXELS / max(width, 1))
    rows = max(rows, halo)
    return rows if rows < height else None
