"""Triton kernels of the mixed-scale depthwise core of DRSformer's MSFN (DESIGN.md §2) and their
launchers.

    y3 = relu(dwconv3x3(x)), y5 = relu(dwconv5x5(x))           first stage, 2h maps each
    x1 = cat(y3[:h], y5[:h]), x2 = cat(y3[h:], y5[h:])
    out[g] = relu(conv3x3(x1[2g], x1[2g+1])), out[h+g] = relu(conv5x5(x2[2g], x2[2g+1]))

The image is cut into tiles of (FRAME_H - 2·HALO) x (FRAME_W - 2·HALO) pixels; a program works on
a tile's frame, the tile plus HALO = 2 pixels (the largest second-stage radius) on each side, as
one (FRAME_H, FRAME_W) block per channel, CHANNELS channels at a time. Every first-stage map is
read by exactly one output channel (the mapping of csrc/common/mixed_scale_dwconv.h), so:

  forward   one item per (batch, CHANNELS output channels, tile): for each of the two input
            slots, the first-stage map on the whole frame straight from x (masked loads, zero
            outside the image), then the second stage on the tile; out is written once. The
            launcher splits the output groups by which convolutions (y3 or y5) their slots read,
            so that the kernel sizes are compile-time constants.
  backward  one item per (batch, CHANNELS input channels c, tile): for y3[c] and y5[c] in turn,
            recompute the map on the frame, take the gradient of its one reader back through the
            second stage (dz = grad_out·[out > 0] read from memory at every tap, so the frame
            needs no wider halo) and the map's relu, then into dx, which only this item writes.
            Weight and bias gradients are the item's sums over its tile, stored as one partial
            per (batch, tile) and parameter entry; `sum_partials_kernel` adds them in row order.
            No atomics: the bits never depend on scheduling or on the number of programs.

The second stage reads each first-stage value at K2² shifted positions. A Triton block cannot be
indexed at shifted positions (no register shuffles in the language), and recomputing the first
stage for each shift would cost K2² times its work (625 instead of 50 loads per pixel for 5x5
after 5x5). So each program keeps its frame of the current map in a small scratch of its own
in global memory, which stays in L1/L2: write it, barrier, read the shifted windows, barrier.
The scratch is per program, not per item, so the grid is persistent (a fixed number of programs
looping over the items) and the scratch is a few MB whatever the image size.

Inputs may be fp32, fp16 or bf16; every sum is fp32 (the scratch too), results are rounded once.
Channels (h is odd in DRSformer), H and W are any size: ragged tiles and images smaller than the
kernels are masked.

`launch_configurations()` lists every (kernel, signature, constexprs, options) the launchers can
choose, for ahead-of-time compilation in the tests.
"""
import math
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from sparse_attn.encodings import msfn_grad_offsets

from ._launch import aot_signature, launch

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_TRITON_TYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
_HALO = 2  # the second stage's largest radius
HALO = tl.constexpr(_HALO)  # (constexpr: kernels read it)
_SUM_BLOCK = 256


# ---------------------------------------------------------------------------------------------
# Helpers shared by the kernels
#
# Blocks are 4-d: (taps, CHANNELS, FRAME_H, FRAME_W), one frame per channel of the item and,
# where a loop runs over the taps of a K x K kernel, one tap at a time on a GPU (ALL_TAPS off)
# or all of them at once (padded to a power of two) in the interpreter, which pays per operation
# and per helper call rather than per element. (For that reason, too, the kernels call few
# helpers per item.) Tap t of a K x K kernel is the shift (t // K - K//2, t % K - K//2). The tap
# loops run at run time: unrolled, the backward's 25-tap loops and their reductions took ptxas
# minutes per configuration.
# ---------------------------------------------------------------------------------------------
@triton.jit
def _frame_layout(CHANNELS: tl.constexpr, FRAME_H: tl.constexpr, FRAME_W: tl.constexpr):
    """What every item's frame shares: lanes (1, CHANNELS, 1, 1), frame rows (1, 1, FRAME_H, 1)
    and columns (1, 1, 1, FRAME_W), the offsets of a (CHANNELS, FRAME_H, FRAME_W) scratch, and
    which frame pixels are the tile's (not its halo)."""
    lanes = tl.arange(0, CHANNELS)[None, :, None, None]
    frame_rows = tl.arange(0, FRAME_H)[None, None, :, None]
    frame_cols = tl.arange(0, FRAME_W)[None, None, None, :]
    scratch = (lanes * FRAME_H + frame_rows) * FRAME_W + frame_cols
    interior = ((frame_rows >= HALO) & (frame_rows < FRAME_H - HALO)
                & (frame_cols >= HALO) & (frame_cols < FRAME_W - HALO))
    return lanes, frame_rows, frame_cols, scratch, interior


@triton.jit
def _frame(item, tiles, tiles_w, first, count, height, width, lanes, frame_rows, frame_cols, interior,
           CHANNELS: tl.constexpr, FRAME_H: tl.constexpr, FRAME_W: tl.constexpr):
    """A persistent program's item of a launch over channels [first, first + count) (output
    groups or input channels): its batch, tile, the image rows and columns of the tile's frame,
    which frame pixels lie in the image and which are the tile's own, its lanes' channels and
    which lanes are real. Lanes past the range compute on its last channel (valid addresses) and
    store nothing. Tiles vary fastest, so programs that run together share the halos of
    neighbouring tiles in cache."""
    channel_blocks = (count + CHANNELS - 1) // CHANNELS
    tile = item % tiles
    block_start = ((item // tiles) % channel_blocks) * CHANNELS
    batch = item // (tiles * channel_blocks)
    rows = (tile // tiles_w) * (FRAME_H - 2 * HALO) - HALO + frame_rows
    cols = (tile % tiles_w) * (FRAME_W - 2 * HALO) - HALO + frame_cols
    in_image = ((rows >= 0) & (rows < height)) & ((cols >= 0) & (cols < width))
    channel = first + tl.minimum(block_start + lanes, count - 1)
    return batch, tile, rows, cols, in_image, in_image & interior, channel, block_start + lanes < count


@triton.constexpr_function
def _taps_per_step(k, all_taps):
    """Taps per step of a loop over a k x k kernel's taps (a power of two)."""
    return (16 if k == 3 else 32) if all_taps else 1


@triton.jit
def _shifted(planes, rows, cols, height, width, mask, first, K: tl.constexpr, TAPS: tl.constexpr):
    """planes[rows + dy, cols + dx] in fp32 for taps first .. first + TAPS - 1 of a K x K kernel,
    as (TAPS, CHANNELS, FRAME_H, FRAME_W): zero outside the image, past the K² taps and where
    `mask` is false. Also returns the taps' indices (TAPS, 1, 1, 1) and validity."""
    t = first + tl.arange(0, TAPS)[:, None, None, None]
    r = rows + (t // K - K // 2)
    c = cols + (t % K - K // 2)
    ok = (mask & (t < K * K)) & ((r >= 0) & (r < height)) & ((c >= 0) & (c < width))
    return tl.load((planes + r * width) + c, mask=ok, other=0.0).to(tl.float32), t, t < K * K


@triton.jit
def _scratch_shifted(scratch, frame, in_tile, first, K: tl.constexpr, TAPS: tl.constexpr, FRAME_W: tl.constexpr):
    """The scratch frames shifted by taps first .. first + TAPS - 1 at the tiles' pixels (whose
    shifts stay within the frame), as (TAPS, CHANNELS, FRAME_H, FRAME_W); the taps' indices and
    validity."""
    t = first + tl.arange(0, TAPS)[:, None, None, None]
    shift = (t // K - K // 2) * FRAME_W + (t % K - K // 2)
    return tl.load((scratch + shift) + frame, mask=in_tile & (t < K * K), other=0.0), t, t < K * K


@triton.jit
def _first_stage(planes, taps, bias, rows, cols, in_image, height, width, K: tl.constexpr, ALL_TAPS: tl.constexpr):
    """relu(bias + conv_KxK(x)) of each lane's plane on the frame, (1, CHANNELS, FRAME_H, FRAME_W),
    zero outside the image (the second stage's zero padding). `taps` points at each lane's K²
    taps, row-major, as F.conv2d (a cross-correlation) reads them."""
    TAPS: tl.constexpr = _taps_per_step(K, ALL_TAPS)
    acc = bias + tl.zeros(in_image.shape, tl.float32)
    for first in range(0, K * K, TAPS):
        x, t, t_ok = _shifted(planes, rows, cols, height, width, in_image, first, K, TAPS)
        w = tl.load(taps + t, mask=t_ok, other=0.0).to(tl.float32)
        acc += tl.sum(w * x, axis=0, keep_dims=True)
    return tl.where(in_image, tl.maximum(acc, 0.0), 0.0)


@triton.jit
def _add_slot(acc, x_ptr, w1_ptr, b1_ptr, w2_ptr, scratch, frame, batch, group, slot, channels, height, width,
              rows, cols, in_image, in_tile, K1: tl.constexpr, K2: tl.constexpr, ALL_TAPS: tl.constexpr,
              FRAME_W: tl.constexpr):
    """acc + conv_K2(y, w2[group, slot]) on the tile, where y is the first-stage map of the K1 x K1
    convolution that output group `group` reads in `slot` (w1, b1: that convolution's weights)."""
    hidden = channels // 2
    j = 2 * group + slot  # channel of x1 (x2 in the second half): cat(y3[...], y5[...])
    if K1 == 3:  # y3[j], or y3[h + j] in the second half
        c = hidden + j if K2 == 5 else j
    else:  # y5[j - h], or y5[j] in the second half
        c = j if K2 == 5 else j - hidden
    x_planes = x_ptr + (batch * channels + c).to(tl.int64) * height * width
    y = _first_stage(x_planes, w1_ptr + c * (K1 * K1), tl.load(b1_ptr + c).to(tl.float32),
                     rows, cols, in_image, height, width, K1, ALL_TAPS)
    tl.store(scratch + frame, y)
    tl.debug_barrier()  # the shifted reads below cross the threads that wrote the scratch
    TAPS2: tl.constexpr = _taps_per_step(K2, ALL_TAPS)
    taps2 = w2_ptr + (group * 2 + slot) * (K2 * K2)
    for first in range(0, K2 * K2, TAPS2):
        y_shifted, t, t_ok = _scratch_shifted(scratch, frame, in_tile, first, K2, TAPS2, FRAME_W)
        w = tl.load(taps2 + t, mask=t_ok, other=0.0).to(tl.float32)
        acc += tl.sum(w * y_shifted, axis=0, keep_dims=True)
    tl.debug_barrier()  # every read of this map is done before the next one is written
    return acc


@triton.jit
def _backward_map(grad_x, grad_out_ptr, x_planes, out_ptr, w1_ptr, b1_ptr, w2_ptr, partial, w1_at, b1_at, w2_at, b2_at,
                  scratch_y, scratch_dy, frame, batch, c, lane_ok, channels, height, width, rows, cols, in_image, in_tile,
                  K1: tl.constexpr, K2: tl.constexpr, ALL_TAPS: tl.constexpr, FRAME_W: tl.constexpr):
    """grad_x + the gradient through the first-stage map y of the K1 x K1 convolution of input
    channels c; writes that map's weight and bias partials and those of its reader's slot, each
    from its entry's start (``*_at``) in the item's row ``partial`` of the gradient table."""
    hidden = channels // 2
    TAPS1: tl.constexpr = _taps_per_step(K1, ALL_TAPS)
    TAPS2: tl.constexpr = _taps_per_step(K2, ALL_TAPS)
    taps1 = w1_ptr + c * (K1 * K1)
    y = _first_stage(x_planes, taps1, tl.load(b1_ptr + c).to(tl.float32), rows, cols, in_image, height, width,
                     K1, ALL_TAPS)
    tl.store(scratch_y + frame, y)

    # The reader of y[c]: its position j in x1 (x2 in the second half), then (group, slot).
    if K2 == 5:
        j = c if K1 == 5 else c - hidden
    else:
        j = c + hidden if K1 == 5 else c
    group = j // 2
    slot = j % 2
    o_offset = (batch * channels + (hidden if K2 == 5 else 0) + group).to(tl.int64) * height * width
    taps2 = w2_ptr + (group * 2 + slot) * (K2 * K2)
    dy = tl.zeros(in_image.shape, tl.float32)
    for first in range(0, K2 * K2, TAPS2):  # the transposed convolution: taps flipped
        g, t, t_ok = _shifted(grad_out_ptr + o_offset, rows, cols, height, width, in_image, first, K2, TAPS2)
        alive, _, _ = _shifted(out_ptr + o_offset, rows, cols, height, width, in_image, first, K2, TAPS2)
        w = tl.load(taps2 + (K2 * K2 - 1 - t), mask=t_ok, other=0.0).to(tl.float32)
        dy += tl.sum(w * tl.where(alive > 0.0, g, 0.0), axis=0, keep_dims=True)
    dy = tl.where(y > 0.0, dy, 0.0)
    tl.store(scratch_dy + frame, dy)
    tl.debug_barrier()  # the shifted reads below cross the threads that wrote the scratch

    pixels = rows * width + cols
    g = tl.load((grad_out_ptr + o_offset) + pixels, mask=in_tile, other=0.0).to(tl.float32)
    dz = tl.where(tl.load((out_ptr + o_offset) + pixels, mask=in_tile, other=0.0) > 0.0, g, 0.0)
    w2_entries = partial + w2_at + (group * 2 + slot) * (K2 * K2)
    for first in range(0, K2 * K2, TAPS2):
        y_shifted, t, t_ok = _scratch_shifted(scratch_y, frame, in_tile, first, K2, TAPS2, FRAME_W)
        dw2 = tl.sum(tl.sum(dz * y_shifted, axis=3, keep_dims=True), axis=2, keep_dims=True)
        tl.store(w2_entries + t, dw2, mask=lane_ok & t_ok)
    # Each output channel has one slot-0 reader: that item owns the channel's bias entry.
    db2 = tl.sum(tl.sum(dz, axis=3, keep_dims=True), axis=2, keep_dims=True)
    b2_entry = partial + b2_at + group
    tl.store(b2_entry, db2, mask=lane_ok & (slot == 0))

    dy_tile = tl.where(in_tile, dy, 0.0)
    w1_entries = partial + w1_at + c * (K1 * K1)
    for first in range(0, K1 * K1, TAPS1):
        x_shifted, t, t_ok = _shifted(x_planes, rows, cols, height, width, in_tile, first, K1, TAPS1)
        dw1 = tl.sum(tl.sum(dy_tile * x_shifted, axis=3, keep_dims=True), axis=2, keep_dims=True)
        tl.store(w1_entries + t, dw1, mask=lane_ok & t_ok)
    db1 = tl.sum(tl.sum(dy_tile, axis=3, keep_dims=True), axis=2, keep_dims=True)
    tl.store(partial + b1_at + c, db1, mask=lane_ok)

    for first in range(0, K1 * K1, TAPS1):  # the transposed convolution: taps flipped
        dy_shifted, t, t_ok = _scratch_shifted(scratch_dy, frame, in_tile, first, K1, TAPS1, FRAME_W)
        w = tl.load(taps1 + (K1 * K1 - 1 - t), mask=t_ok, other=0.0).to(tl.float32)
        grad_x += tl.sum(w * dy_shifted, axis=0, keep_dims=True)
    tl.debug_barrier()  # every read of the scratch is done before the next map is written
    return grad_x


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------
@triton.jit
def mixed_scale_dwconv_forward_kernel(x_ptr, w3_ptr, w5_ptr, w3_1_ptr, w5_1_ptr, b3_ptr, b5_ptr, b3_1_ptr,
                                      b5_1_ptr, out_ptr, scratch_ptr,
                                      channels, height, width, tiles_w, tiles,
                                      first_group, groups, items,
                                      K2: tl.constexpr, SLOT0_K1: tl.constexpr, SLOT1_K1: tl.constexpr,
                                      CHANNELS: tl.constexpr, FRAME_H: tl.constexpr, FRAME_W: tl.constexpr,
                                      ALL_TAPS: tl.constexpr):
    """Persistent program over the items (batch, CHANNELS output channels, tile) of the output
    groups g in [first_group, first_group + groups) of z1 (K2 = 3: channel g) or z2 (K2 = 5:
    channel h + g), whose slot s reads a first-stage map of the K x K convolution with
    K = SLOT0_K1 / SLOT1_K1 (the launcher splits the groups so that these are constants)."""
    hidden = channels // 2
    w2_ptr = w5_1_ptr if K2 == 5 else w3_1_ptr
    pid = tl.program_id(0)
    scratch = scratch_ptr + pid.to(tl.int64) * (CHANNELS * FRAME_H * FRAME_W)
    lanes, frame_rows, frame_cols, frame, interior = _frame_layout(CHANNELS, FRAME_H, FRAME_W)
    for item in range(pid, items, tl.num_programs(0)):
        batch, tile, rows, cols, in_image, in_tile, group, lane_ok = _frame(
            item, tiles, tiles_w, first_group, groups, height, width, lanes, frame_rows, frame_cols, interior,
            CHANNELS, FRAME_H, FRAME_W)
        acc = tl.load((b5_1_ptr if K2 == 5 else b3_1_ptr) + group).to(tl.float32) + tl.zeros(in_image.shape, tl.float32)
        acc = _add_slot(acc, x_ptr, w3_ptr if SLOT0_K1 == 3 else w5_ptr, b3_ptr if SLOT0_K1 == 3 else b5_ptr,
                        w2_ptr, scratch, frame, batch, group, 0, channels, height, width,
                        rows, cols, in_image, in_tile, SLOT0_K1, K2, ALL_TAPS, FRAME_W)
        acc = _add_slot(acc, x_ptr, w3_ptr if SLOT1_K1 == 3 else w5_ptr, b3_ptr if SLOT1_K1 == 3 else b5_ptr,
                        w2_ptr, scratch, frame, batch, group, 1, channels, height, width,
                        rows, cols, in_image, in_tile, SLOT1_K1, K2, ALL_TAPS, FRAME_W)
        o = group + hidden if K2 == 5 else group
        out_planes = out_ptr + (batch * channels + o).to(tl.int64) * height * width
        tl.store((out_planes + rows * width) + cols, tl.maximum(acc, 0.0).to(out_ptr.dtype.element_ty),
                 mask=in_tile & lane_ok)


@triton.jit
def mixed_scale_dwconv_backward_kernel(grad_out_ptr, x_ptr, out_ptr, w3_ptr, w5_ptr, w3_1_ptr, w5_1_ptr,
                                       b3_ptr, b5_ptr, grad_x_ptr, partial_ptr, scratch_ptr,
                                       channels, height, width, tiles_w, tiles, items,
                                       w3_at, w5_at, w3_1_at, w5_1_at, b3_at, b5_at, b3_1_at, b5_1_at, row_len,
                                       K2: tl.constexpr, CHANNELS: tl.constexpr,
                                       FRAME_H: tl.constexpr, FRAME_W: tl.constexpr, ALL_TAPS: tl.constexpr):
    """Persistent program over the items (batch, CHANNELS input channels c, tile) of one half of
    the input channels: c < h (whose maps z1 reads, K2 = 3) or c >= h (z2 reads them, K2 = 5).

    For each map y of c (y3, then y5), with (o, slot) its reader and dz = grad_out[o]·[out[o] > 0]:
        dy  = [y > 0] · conv_transpose_K2(dz) with w2[o, slot]     (on the frame; y in the scratch)
        dw2[o, slot] = Σ_tile dz · shift(y),   db2[o] = Σ_tile dz  (from the slot-0 item only)
        dw1[c] = Σ_tile dy · shift(x),        db1[c] = Σ_tile dy
        dx[c] += conv_transpose_K1(dy)                              (dy in the scratch)
    Each Σ_tile is a fixed reduction tree (the same bits on every run). Partials go to row
    (batch, tile) of the partial table (row_len entries), each parameter's entries from its
    ``*_at`` on: the launcher passes sparse_attn.encodings' layout, which the C++ kernels share."""
    hidden = channels // 2
    first_channel = hidden if K2 == 5 else 0
    w2_ptr = w5_1_ptr if K2 == 5 else w3_1_ptr
    w2_at = w5_1_at if K2 == 5 else w3_1_at
    b2_at = b5_1_at if K2 == 5 else b3_1_at
    pid = tl.program_id(0)
    scratch_y = scratch_ptr + pid.to(tl.int64) * (2 * CHANNELS * FRAME_H * FRAME_W)
    scratch_dy = scratch_y + CHANNELS * FRAME_H * FRAME_W
    lanes, frame_rows, frame_cols, frame, interior = _frame_layout(CHANNELS, FRAME_H, FRAME_W)
    for item in range(pid, items, tl.num_programs(0)):
        batch, tile, rows, cols, in_image, in_tile, c, lane_ok = _frame(
            item, tiles, tiles_w, first_channel, hidden, height, width, lanes, frame_rows, frame_cols, interior,
            CHANNELS, FRAME_H, FRAME_W)
        x_planes = x_ptr + (batch * channels + c).to(tl.int64) * height * width
        partial = partial_ptr + (batch * tiles + tile).to(tl.int64) * row_len
        grad_x = tl.zeros(in_image.shape, tl.float32)
        grad_x = _backward_map(grad_x, grad_out_ptr, x_planes, out_ptr, w3_ptr, b3_ptr, w2_ptr, partial,
                               w3_at, b3_at, w2_at, b2_at, scratch_y, scratch_dy, frame, batch, c, lane_ok, channels, height, width,
                               rows, cols, in_image, in_tile, 3, K2, ALL_TAPS, FRAME_W)
        grad_x = _backward_map(grad_x, grad_out_ptr, x_planes, out_ptr, w5_ptr, b5_ptr, w2_ptr, partial,
                               w5_at, b5_at, w2_at, b2_at, scratch_y, scratch_dy, frame, batch, c, lane_ok, channels, height, width,
                               rows, cols, in_image, in_tile, 5, K2, ALL_TAPS, FRAME_W)
        grad_x_planes = grad_x_ptr + (batch * channels + c).to(tl.int64) * height * width
        tl.store((grad_x_planes + rows * width) + cols, grad_x.to(grad_x_ptr.dtype.element_ty), mask=in_tile & lane_ok)


@triton.jit
def sum_partials_kernel(partial_ptr, sums_ptr, rows, total, BLOCK: tl.constexpr):
    """sums[k] = Σ_row partial[row, k] for a block of k, added in row order (fp32)."""
    cols = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < total
    acc = tl.zeros((BLOCK,), tl.float32)
    entries = partial_ptr + cols
    for _ in range(0, rows):
        acc += tl.load(entries, mask=ok, other=0.0)
        entries += total  # pointer arithmetic: 64-bit however large the table
    tl.store(sums_ptr + cols, acc, mask=ok)


# ---------------------------------------------------------------------------------------------
# Launch configurations: the one place that chooses block sizes (launchers and AOT tests)
# ---------------------------------------------------------------------------------------------
# On a GPU a program holds one channel's 32 x 64 frame (its 28 x 60 tile is 82% of the frame) in
# 8 warps. Unconstrained, ptxas gives the backward 255 registers (one block of 256 threads per
# SM); capped at 128 it spills ~50 bytes and two blocks fit. (Chosen from ptxas's figures: no GPU
# was at hand to time either.) Programs are persistent: enough of them to fill any current GPU
# several times over; the scratch is then 8 KB per program and map.
GPU_BLOCKS = {"CHANNELS": 1, "FRAME_H": 32, "FRAME_W": 64, "ALL_TAPS": False, "programs": 1024, "num_warps": 8,
              "backward_maxnreg": 128}


def interpreter_blocks(height, width, hidden):
    """The blocks of the interpreter (CPU tensors), which pays per operation, not per element:
    all taps at once, a frame as large as the image (up to 32 x 64) and as many channels as make
    32K pixels (times 32 taps, Triton's largest block), so that an item does as much work as it
    can. (The kernels run opaque there, so a choice by shape costs torch.compile nothing.)
    Programs run one after another; a few of them exercise the striding over items."""
    def fit(n, most):
        return max(8, min(most, triton.next_power_of_2(n + 2 * _HALO)))

    frame_h, frame_w = fit(height, 32), fit(width, 64)
    channels = min(triton.next_power_of_2(hidden), 32768 // (frame_h * frame_w))
    return {"CHANNELS": channels, "FRAME_H": frame_h, "FRAME_W": frame_w, "ALL_TAPS": True, "programs": 3,
            "num_warps": 4, "backward_maxnreg": None}


def _blocks(x):
    if x.device.type == "cuda":
        return GPU_BLOCKS
    return interpreter_blocks(x.shape[2], x.shape[3], x.shape[1] // 2)


def _constexprs(blocks):
    return {name: blocks[name] for name in ("CHANNELS", "FRAME_H", "FRAME_W", "ALL_TAPS")}


def _options(blocks, backward=False):
    # num_stages=1: no software pipelining, which could move a scratch read of the persistent
    # loop across the barrier that orders it after the writes.
    options = {"num_warps": blocks["num_warps"], "num_stages": 1}
    if backward and blocks["backward_maxnreg"] is not None:
        options["maxnreg"] = blocks["backward_maxnreg"]
    return options


def _forward_ranges(hidden):
    """The launches of one half of the forward: (first group, groups, K1 of slot 0, K1 of
    slot 1). Group g reads x1 (or x2) channels 2g and 2g + 1, which come from y3 below h and
    from y5 from h on: groups [0, ⌊h/2⌋) read two y3 maps, [⌈h/2⌉, h) two y5 maps, and for odd h
    (every DRSformer level) group ⌊h/2⌋ reads one of each."""
    low, high = hidden // 2, (hidden + 1) // 2
    ranges = ((0, low, 3, 3), (low, high - low, 3, 5), (high, hidden - high, 5, 5))
    return [r for r in ranges if r[1] > 0]


_SLOT_KINDS = ((3, 3), (3, 5), (5, 5))


def launch_configurations():
    """Every (kernel, signature, constexprs, options) the launchers below can choose on a GPU."""
    blocks = GPU_BLOCKS
    configs = []
    tensors = ("x_ptr", "w3_ptr", "w5_ptr", "w3_1_ptr", "w5_1_ptr", "b3_ptr", "b5_ptr")
    for dtype in DTYPES:
        t = _TRITON_TYPE_NAMES[dtype]
        forward_types = {name: t for name in tensors + ("b3_1_ptr", "b5_1_ptr", "out_ptr")}
        backward_types = {name: t for name in tensors + ("grad_out_ptr", "out_ptr", "grad_x_ptr")}
        for k2 in (3, 5):
            for slot0, slot1 in _SLOT_KINDS:
                cx = {"K2": k2, "SLOT0_K1": slot0, "SLOT1_K1": slot1, **_constexprs(blocks)}
                configs.append((mixed_scale_dwconv_forward_kernel,
                                aot_signature(mixed_scale_dwconv_forward_kernel, cx, forward_types), cx,
                                _options(blocks)))
            cx = {"K2": k2, **_constexprs(blocks)}
            configs.append((mixed_scale_dwconv_backward_kernel,
                            aot_signature(mixed_scale_dwconv_backward_kernel, cx, backward_types), cx,
                            _options(blocks, backward=True)))
    cx = {"BLOCK": _SUM_BLOCK}
    configs.append((sum_partials_kernel, aot_signature(sum_partials_kernel, cx, {}), cx, {"num_warps": 4}))
    return configs


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------
def _tiles(height, width, blocks):
    """(tiles per row, tiles) of an image."""
    tiles_w = triton.cdiv(width, blocks["FRAME_W"] - 2 * _HALO)
    return tiles_w, triton.cdiv(height, blocks["FRAME_H"] - 2 * _HALO) * tiles_w


def _bias_or_zeros(bias, size, like):
    """A missing bias as zeros: one compiled kernel serves both cases, at the cost of a load."""
    return bias.contiguous() if bias is not None else like.new_zeros(size)


def forward(x: Tensor, w3: Tensor, w5: Tensor, w3_1: Tensor, w5_1: Tensor, b3: Optional[Tensor],
            b5: Optional[Tensor], b3_1: Optional[Tensor], b5_1: Optional[Tensor]) -> Tensor:
    """The op's forward: out (B, 2h, H, W) of x's dtype, contiguous.

    x: (B, 2h, H, W) fp32/fp16/bf16; w3 (2h,1,3,3), w5 (2h,1,5,5), w3_1 (h,2,3,3), w5_1 (h,2,5,5)
    and the biases (2h,), (2h,), (h,), (h,) or None, all of x's dtype and device."""
    x = x.contiguous()
    batch, channels, height, width = x.shape
    hidden = channels // 2
    params = [w.contiguous() for w in (w3, w5, w3_1, w5_1)]
    params += [_bias_or_zeros(b, n, x) for b, n in ((b3, channels), (b5, channels), (b3_1, hidden), (b5_1, hidden))]
    out = torch.empty_like(x)
    blocks = _blocks(x)
    tiles_w, tiles = _tiles(height, width, blocks)
    scratch = x.new_empty((blocks["programs"], blocks["CHANNELS"] * blocks["FRAME_H"] * blocks["FRAME_W"]),
                          dtype=torch.float32)
    # Launches run in order on one stream, so they share the scratch.
    for k2 in (3, 5):
        for first_group, groups, slot0, slot1 in _forward_ranges(hidden):
            items = batch * triton.cdiv(groups, blocks["CHANNELS"]) * tiles
            launch(mixed_scale_dwconv_forward_kernel, (blocks["programs"],), x, *params, out, scratch,
                   channels, height, width, tiles_w, tiles, first_group, groups, items,
                   K2=k2, SLOT0_K1=slot0, SLOT1_K1=slot1, **_constexprs(blocks), **_options(blocks))
    return out


def backward(grad_out: Tensor, x: Tensor, out: Tensor, w3: Tensor, w5: Tensor, w3_1: Tensor, w5_1: Tensor,
             b3: Optional[Tensor], b5: Optional[Tensor]
             ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The op's backward from the saved x and out: the gradients of x, w3, w5, w3_1, w5_1, b3,
    b5, b3_1, b5_1 (bias gradients always), each of its parameter's dtype and shape."""
    x = x.contiguous()
    out = out.contiguous()
    grad_out = grad_out.to(x.dtype).contiguous()
    batch, channels, height, width = x.shape
    hidden = channels // 2
    blocks = _blocks(x)
    tiles_w, tiles = _tiles(height, width, blocks)
    layout = msfn_grad_offsets(hidden)  # where each gradient starts in a row of the partial table
    total = layout.pop("total")
    partial = x.new_empty((batch * tiles, total), dtype=torch.float32)
    scratch = x.new_empty((blocks["programs"], 2 * blocks["CHANNELS"] * blocks["FRAME_H"] * blocks["FRAME_W"]),
                          dtype=torch.float32)
    grad_x = torch.empty_like(x)
    items = batch * triton.cdiv(hidden, blocks["CHANNELS"]) * tiles
    for k2 in (3, 5):  # the two halves of the input channels
        launch(mixed_scale_dwconv_backward_kernel, (blocks["programs"],),
               grad_out, x, out, *(w.contiguous() for w in (w3, w5, w3_1, w5_1)),
               _bias_or_zeros(b3, channels, x), _bias_or_zeros(b5, channels, x), grad_x, partial, scratch,
               channels, height, width, tiles_w, tiles, items, *layout.values(), total,
               K2=k2, **_constexprs(blocks), **_options(blocks, backward=True))
    sums = x.new_empty((total,), dtype=torch.float32)
    launch(sum_partials_kernel, (triton.cdiv(total, _SUM_BLOCK),), partial, sums, batch * tiles, total,
           BLOCK=_SUM_BLOCK, num_warps=4)
    shapes = ((channels, 1, 3, 3), (channels, 1, 5, 5), (hidden, 2, 3, 3), (hidden, 2, 5, 5),
              (channels,), (channels,), (hidden,), (hidden,))
    # Copies: the op's outputs must not share storage.
    grads = [sums[start:start + math.prod(shape)].reshape(shape).to(x.dtype, copy=True)
             for start, shape in zip(layout.values(), shapes)]
    return (grad_x, *grads)
