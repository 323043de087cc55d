"""Triton kernels of the gated depthwise core of Restormer's GDFN (DESIGN.md §5) and their
launchers.

    z = dwconv3x3(x) + bias            (B, 2h, H, W), zero padding 1
    out[g] = act(z[g]) · z[h + g]      (B, h, H, W)

A program works on a TILE_H x TILE_W tile of CHANNELS channels at once, as one
(CHANNELS, TILE_H, TILE_W) block; the 3x3 windows are nine masked, shifted loads (zero outside
the image), which neighbouring programs share in cache.

  forward   one program per (batch, CHANNELS groups, tile): z of channels g and h + g, the gate,
            out written once.
  backward  `gate_grad_kernel`, per (batch, CHANNELS groups, tile): z recomputed from x,
            dz[g] = grad_out·z[h + g]·act'(z[g]) and dz[h + g] = grad_out·act(z[g]) into an fp32
            buffer (B, 2h, H, W) — the only intermediate, and it lives for the backward only —
            with each tile's sums of dz (bias) and of grad_out·z[h + g]·∂act/∂slope (prelu);
            `input_grad_kernel`, per (batch, CHANNELS channels, tile): dx = the transposed 3x3
            convolution of dz and each tile's weight sums Σ dz·shift(x). The sums go to row
            (batch, tile) of a partial table laid out as sparse_attn.encodings.GATED_GRAD_LAYOUT
            (the C++ kernels' too; the launcher passes the offsets) and `sum_partials_kernel`
            adds the rows in order. No atomics: the bits never depend on scheduling.

Inputs may be fp32, fp16 or bf16; every sum is fp32, results are rounded once. The activation is
a compile-time code (sparse_attn.encodings.GATE_ACTIVATION_CODES, which the C++ kernels share).
`launch_configurations()` lists every (kernel, signature, constexprs, options) the launchers can
choose, for ahead-of-time compilation in the tests.
"""
from typing import Optional

import torch
import triton
import triton.language as tl

from sparse_attn.encodings import GATE_ACTIVATION_CODES, gated_grad_offsets

from ._launch import aot_signature, launch
from .mixed_scale_dwconv import sum_partials_kernel

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_TRITON_TYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
_SUM_BLOCK = 256
GELU = tl.constexpr(GATE_ACTIVATION_CODES["gelu"])
PRELU = tl.constexpr(GATE_ACTIVATION_CODES["prelu"])
RELU2 = tl.constexpr(GATE_ACTIVATION_CODES["relu2"])


# ---------------------------------------------------------------------------------------------
# Helpers shared by the kernels
# ---------------------------------------------------------------------------------------------
@triton.jit
def _item(pid, count, height, width, CHANNELS: tl.constexpr, TILE_H: tl.constexpr, TILE_W: tl.constexpr):
    """Program `pid`'s batch, its lanes' channel offsets in [0, count) (lanes past the end
    compute on the last one and store nothing) and which lanes are real, and the rows, columns
    and in-image mask of its tile. Tiles vary fastest, so neighbouring programs share halos."""
    tiles_w = tl.cdiv(width, TILE_W)
    tiles = tl.cdiv(height, TILE_H) * tiles_w
    blocks = tl.cdiv(count, CHANNELS)
    tile = pid % tiles
    block = (pid // tiles) % blocks
    batch = pid // (tiles * blocks)
    lanes = block * CHANNELS + tl.arange(0, CHANNELS)[:, None, None]
    rows = (tile // tiles_w) * TILE_H + tl.arange(0, TILE_H)[None, :, None]
    cols = (tile % tiles_w) * TILE_W + tl.arange(0, TILE_W)[None, None, :]
    in_image = (rows < height) & (cols < width)
    return batch, tile, tl.minimum(lanes, count - 1), lanes < count, rows, cols, in_image


@triton.jit
def _shifted(planes, rows, cols, height, width, mask, dy, dx):
    """planes[rows + dy, cols + dx] in fp32, zero outside the image and where `mask` is false."""
    r = rows + dy
    c = cols + dx
    ok = mask & (r >= 0) & (r < height) & (c >= 0) & (c < width)
    return tl.load(planes + r * width + c, mask=ok, other=0.0).to(tl.float32)


@triton.jit
def _conv3x3(planes, taps, bias, rows, cols, height, width, in_image):
    """bias + the 3x3 cross-correlation (F.conv2d) of each lane's plane; `taps` points at each
    lane's nine taps, row-major."""
    acc = bias + tl.zeros(in_image.shape, tl.float32)
    for t in range(9):
        w = tl.load(taps + t).to(tl.float32)
        acc += w * _shifted(planes, rows, cols, height, width, in_image, t // 3 - 1, t % 3 - 1)
    return acc


@triton.jit
def _activation(z, slope, ACTIVATION: tl.constexpr):
    if ACTIVATION == GELU:
        return 0.5 * z * (1.0 + tl.erf(z * 0.7071067811865476))
    elif ACTIVATION == PRELU:
        return tl.where(z > 0.0, z, slope * z)
    elif ACTIVATION == RELU2:
        r = tl.maximum(z, 0.0)
        return r * r
    else:
        return z


@triton.jit
def _activation_grad(z, slope, ACTIVATION: tl.constexpr):
    if ACTIVATION == GELU:
        cdf = 0.5 * (1.0 + tl.erf(z * 0.7071067811865476))
        return cdf + z * tl.exp(-0.5 * z * z) * 0.3989422804014327
    elif ACTIVATION == PRELU:
        return tl.where(z > 0.0, 1.0, slope)
    elif ACTIVATION == RELU2:
        return 2.0 * tl.maximum(z, 0.0)
    else:
        return tl.full(z.shape, 1.0, tl.float32)


@triton.jit
def _tile_sum(v):
    """Σ over a lane's tile: (CHANNELS, 1, 1), a fixed reduction tree."""
    return tl.sum(tl.sum(v, axis=2, keep_dims=True), axis=1, keep_dims=True)


@triton.jit
def _gate_inputs(x_ptr, weight_ptr, bias_ptr, batch, group, hidden, height, width, rows, cols, in_image):
    """z of channels `group` and h + `group` on the tile."""
    channels = 2 * hidden
    plane = height * width
    za = _conv3x3(x_ptr + (batch * channels + group).to(tl.int64) * plane, weight_ptr + group * 9,
                  tl.load(bias_ptr + group).to(tl.float32), rows, cols, height, width, in_image)
    zb = _conv3x3(x_ptr + (batch * channels + hidden + group).to(tl.int64) * plane, weight_ptr + (hidden + group) * 9,
                  tl.load(bias_ptr + hidden + group).to(tl.float32), rows, cols, height, width, in_image)
    return za, zb


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------
@triton.jit
def gated_dwconv_forward_kernel(x_ptr, weight_ptr, bias_ptr, slope_ptr, out_ptr, hidden, height, width,
                                ACTIVATION: tl.constexpr, CHANNELS: tl.constexpr, TILE_H: tl.constexpr,
                                TILE_W: tl.constexpr):
    """One program per (batch, CHANNELS groups, tile): out[g] = act(z[g])·z[h + g]."""
    batch, _, group, lane_ok, rows, cols, in_image = _item(tl.program_id(0), hidden, height, width,
                                                           CHANNELS, TILE_H, TILE_W)
    za, zb = _gate_inputs(x_ptr, weight_ptr, bias_ptr, batch, group, hidden, height, width, rows, cols, in_image)
    out = _activation(za, tl.load(slope_ptr).to(tl.float32), ACTIVATION) * zb
    out_planes = out_ptr + (batch * hidden + group).to(tl.int64) * height * width
    tl.store(out_planes + rows * width + cols, out.to(out_ptr.dtype.element_ty), mask=in_image & lane_ok)


@triton.jit
def gate_grad_kernel(grad_out_ptr, x_ptr, weight_ptr, bias_ptr, slope_ptr, dz_ptr, partial_ptr, bias_at, slope_at,
                     total, hidden, height, width, ACTIVATION: tl.constexpr, CHANNELS: tl.constexpr, TILE_H: tl.constexpr, TILE_W: tl.constexpr):
    """One program per (batch, CHANNELS groups, tile): dz of channels g and h + g into the fp32
    buffer; the tile's bias sums and (prelu) slope sums into its row of the partial table."""
    batch, tile, group, lane_ok, rows, cols, in_image = _item(tl.program_id(0), hidden, height, width,
                                                              CHANNELS, TILE_H, TILE_W)
    za, zb = _gate_inputs(x_ptr, weight_ptr, bias_ptr, batch, group, hidden, height, width, rows, cols, in_image)
    slope = tl.load(slope_ptr).to(tl.float32)
    pixels = rows * width + cols
    plane = height * width
    mask = in_image & lane_ok
    g = tl.load(grad_out_ptr + (batch * hidden + group).to(tl.int64) * plane + pixels, mask=mask,
                other=0.0).to(tl.float32)
    dza = g * zb * _activation_grad(za, slope, ACTIVATION)
    dzb = g * _activation(za, slope, ACTIVATION)
    channels = 2 * hidden
    tl.store(dz_ptr + (batch * channels + group).to(tl.int64) * plane + pixels, dza, mask=mask)
    tl.store(dz_ptr + (batch * channels + hidden + group).to(tl.int64) * plane + pixels, dzb, mask=mask)
    tiles = tl.cdiv(height, TILE_H) * tl.cdiv(width, TILE_W)
    partial = partial_ptr + (batch * tiles + tile).to(tl.int64) * total
    tl.store(partial + bias_at + group, _tile_sum(dza), mask=lane_ok)
    tl.store(partial + bias_at + hidden + group, _tile_sum(dzb), mask=lane_ok)
    if ACTIVATION == PRELU:
        slope_grad = tl.where(za > 0.0, 0.0, g * zb * za)
        tl.store(partial + slope_at + group, _tile_sum(slope_grad), mask=lane_ok)
    else:
        tl.store(partial + slope_at + group, tl.zeros((CHANNELS, 1, 1), tl.float32), mask=lane_ok)


@triton.jit
def input_grad_kernel(dz_ptr, x_ptr, weight_ptr, grad_x_ptr, partial_ptr, weight_at, total, channels, height, width,
                      CHANNELS: tl.constexpr, TILE_H: tl.constexpr, TILE_W: tl.constexpr):
    """One program per (batch, CHANNELS channels c, tile): dx[c] = Σ_t w[c, t]·dz[c](p − shift_t)
    and the tile's weight sums Σ dz[c]·x[c](p + shift_t) into its row of the partial table."""
    batch, tile, c, lane_ok, rows, cols, in_image = _item(tl.program_id(0), channels, height, width,
                                                          CHANNELS, TILE_H, TILE_W)
    plane = height * width
    dz_planes = dz_ptr + (batch * channels + c).to(tl.int64) * plane
    x_planes = x_ptr + (batch * channels + c).to(tl.int64) * plane
    mask = in_image & lane_ok
    dz = tl.load(dz_planes + rows * width + cols, mask=mask, other=0.0)
    tiles = tl.cdiv(height, TILE_H) * tl.cdiv(width, TILE_W)
    partial = partial_ptr + (batch * tiles + tile).to(tl.int64) * total + weight_at + c * 9
    dx = tl.zeros(in_image.shape, tl.float32)
    for t in range(9):
        dy = t // 3 - 1
        dxx = t % 3 - 1
        w = tl.load(weight_ptr + c * 9 + t).to(tl.float32)
        dx += w * _shifted(dz_planes, rows, cols, height, width, mask, -dy, -dxx)
        tl.store(partial + t, _tile_sum(dz * _shifted(x_planes, rows, cols, height, width, mask, dy, dxx)),
                 mask=lane_ok)
    tl.store(grad_x_ptr + (batch * channels + c).to(tl.int64) * plane + rows * width + cols,
             dx.to(grad_x_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------
# Launch configurations: the one place that chooses block sizes (launchers and AOT tests)
# ---------------------------------------------------------------------------------------------
# On a GPU a program holds one channel's 16 x 64 tile in 4 warps (rows of 64 contiguous pixels).
# (Chosen, not tuned: no GPU was at hand to time it.)
GPU_BLOCKS = {"CHANNELS": 1, "TILE_H": 16, "TILE_W": 64, "num_warps": 4}


def interpreter_blocks(height, width, hidden):
    """The interpreter (CPU tensors) pays per operation, not per element: a tile as large as the
    image (up to 32 x 64) and as many channels as make 16K pixels."""
    tile_h = min(triton.next_power_of_2(height), 32)
    tile_w = min(triton.next_power_of_2(width), 64)
    channels = min(triton.next_power_of_2(hidden), 16384 // (tile_h * tile_w))
    return {"CHANNELS": channels, "TILE_H": tile_h, "TILE_W": tile_w, "num_warps": 4}


def _blocks(x):
    if x.device.type == "cuda":
        return GPU_BLOCKS
    return interpreter_blocks(x.shape[2], x.shape[3], x.shape[1] // 2)


def _constexprs(blocks):
    return {name: blocks[name] for name in ("CHANNELS", "TILE_H", "TILE_W")}


def launch_configurations():
    """Every (kernel, signature, constexprs, options) the launchers below can choose on a GPU."""
    configs = []
    cx = _constexprs(GPU_BLOCKS)
    options = {"num_warps": GPU_BLOCKS["num_warps"]}
    for dtype in DTYPES:
        t = _TRITON_TYPE_NAMES[dtype]
        params = {name: t for name in ("x_ptr", "weight_ptr", "bias_ptr", "slope_ptr")}
        for code in GATE_ACTIVATION_CODES.values():
            acx = {"ACTIVATION": code, **cx}
            configs.append((gated_dwconv_forward_kernel,
                            aot_signature(gated_dwconv_forward_kernel, acx, {**params, "out_ptr": t}), acx, options))
            configs.append((gate_grad_kernel,
                            aot_signature(gate_grad_kernel, acx, {**params, "grad_out_ptr": t}), acx, options))
        configs.append((input_grad_kernel,
                        aot_signature(input_grad_kernel, cx, {"x_ptr": t, "weight_ptr": t, "grad_x_ptr": t}),
                        cx, options))
    return configs


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------
def _programs(batch, count, height, width, blocks):
    tiles = triton.cdiv(height, blocks["TILE_H"]) * triton.cdiv(width, blocks["TILE_W"])
    return batch * triton.cdiv(count, blocks["CHANNELS"]) * tiles, tiles


def _parameters(x, weight, bias, activation_weight):
    """weight, bias and the slope, contiguous; a missing bias or slope as zeros (one compiled
    kernel serves both cases, at the cost of a load)."""
    bias = bias.contiguous() if bias is not None else x.new_zeros(x.shape[1])
    slope = activation_weight.contiguous() if activation_weight is not None else x.new_zeros(1)
    return weight.contiguous(), bias, slope


def forward(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], activation: int,
            activation_weight: Optional[torch.Tensor]) -> torch.Tensor:
    """The op's forward: out (B, h, H, W) of x's dtype, contiguous.

    x: (B, 2h, H, W) fp32/fp16/bf16; weight (2h, 1, 3, 3); bias (2h,) or None; activation: the
    code (sparse_attn.encodings.GATE_ACTIVATION_CODES); activation_weight: prelu's slope (1,) or None."""
    x = x.contiguous()
    batch, channels, height, width = x.shape
    hidden = channels // 2
    out = x.new_empty((batch, hidden, height, width))
    blocks = _blocks(x)
    programs, _ = _programs(batch, hidden, height, width, blocks)
    launch(gated_dwconv_forward_kernel, (programs,), x, *_parameters(x, weight, bias, activation_weight), out,
           hidden, height, width, ACTIVATION=activation, **_constexprs(blocks), num_warps=blocks["num_warps"])
    return out


def backward(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
             activation: int, activation_weight: Optional[torch.Tensor]
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The op's backward from the saved x: the gradients of x, weight, bias and
    activation_weight (the last two always; (2h,) and (1,)), each of x's dtype."""
    x = x.contiguous()
    grad_out = grad_out.to(x.dtype).contiguous()
    batch, channels, height, width = x.shape
    hidden = channels // 2
    blocks = _blocks(x)
    weight, bias, slope = _parameters(x, weight, bias, activation_weight)
    programs, tiles = _programs(batch, hidden, height, width, blocks)
    layout = gated_grad_offsets(hidden)  # where each gradient starts in a row of the partial table
    total = layout["total"]
    partial = x.new_empty((batch * tiles, total), dtype=torch.float32)
    dz = x.new_empty(x.shape, dtype=torch.float32)
    launch(gate_grad_kernel, (programs,), grad_out, x, weight, bias, slope, dz, partial, layout["bias"], layout["slope"],
           total, hidden, height, width,
           ACTIVATION=activation, **_constexprs(blocks), num_warps=blocks["num_warps"])
    grad_x = torch.empty_like(x)
    programs, _ = _programs(batch, channels, height, width, blocks)
    launch(input_grad_kernel, (programs,), dz, x, weight, grad_x, partial, layout["weight"], total, channels, height,
           width,
           **_constexprs(blocks), num_warps=blocks["num_warps"])
    sums = x.new_empty((total,), dtype=torch.float32)
    launch(sum_partials_kernel, (triton.cdiv(total, _SUM_BLOCK),), partial, sums, batch * tiles, total,
           BLOCK=_SUM_BLOCK, num_warps=4)
    # Copies: the op's outputs must not share storage.
    grad_weight = sums[layout["weight"]:layout["weight"] + 9 * channels].reshape(channels, 1, 3, 3).to(x.dtype, copy=True)
    grad_bias = sums[layout["bias"]:layout["bias"] + channels].to(x.dtype, copy=True)
    grad_slope = sums[layout["slope"]:layout["slope"] + hidden].sum().reshape(1).to(x.dtype)
    return grad_x, grad_weight, grad_bias, grad_slope
