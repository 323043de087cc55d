"""Triton kernels of the depthwise convolution op (DESIGN.md §5) and their launchers.

    out[c] = bias[c] + Σ_{i,j<K} w[c, i, j] · x[c](p + ((i - r)·d, (j - r)·d))

r = (K - 1) / 2, d the dilation, zero outside the image, out of x's size. K (1, 3, 5 or 7) is a
compile-time constant, the dilation a run-time argument. A program works on a TILE_H x TILE_W
tile of CHANNELS channels at once, as one (CHANNELS, TILE_H, TILE_W) block; each tap is a masked,
shifted load (zero outside the image), which neighbouring programs share in cache. The block
helpers are gated_dwconv's.

  forward   one program per (batch, CHANNELS channels, tile): the K² taps, then the bias.
  backward  one program per (batch, CHANNELS channels, tile): dx = the transposed convolution
            of grad_out (taps rotated by 180 degrees), written once; the tile's sums
            Σ grad_out·shift_t(x) (weight) and Σ grad_out (bias) go to row (batch, tile) of a
            partial table, per channel its K² weight sums then its bias sum (the CPU kernel's
            layout), and `sum_partials_kernel` adds the rows in order. No atomics: the bits
            never depend on scheduling.

Inputs may be fp32, fp16 or bf16; every sum is fp32, results are rounded once.
`launch_configurations()` lists every (kernel, signature, constexprs, options) the launchers can
choose, for ahead-of-time compilation in the tests.
"""
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._launch import aot_signature, launch
from .gated_dwconv import _item, _programs, _shifted, _tile_sum, interpreter_blocks  # noqa: F401 (tests patch it here)
from .mixed_scale_dwconv import sum_partials_kernel

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_TRITON_TYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
# The op's kernel sizes (sparse_attn.ops.depthwise_conv2d.KERNEL_SIZES, which imports this module;
# a test checks that the two agree).
KERNEL_SIZES = (1, 3, 5, 7)
_SUM_BLOCK = 256


@triton.jit
def _tap_shift(t, dilation, K: tl.constexpr):
    """The (rows, columns) offset of tap t (row-major in a K x K kernel) at this dilation."""
    return (t // K - K // 2) * dilation, (t % K - K // 2) * dilation


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------
@triton.jit
def depthwise_conv2d_forward_kernel(x_ptr, weight_ptr, bias_ptr, out_ptr, channels, height, width, dilation,
                                    K: tl.constexpr, CHANNELS: tl.constexpr, TILE_H: tl.constexpr,
                                    TILE_W: tl.constexpr):
    """One program per (batch, CHANNELS channels c, tile): out[c] = Σ_t w[c, t]·x[c](p + shift_t)
    + bias[c]."""
    batch, _, c, lane_ok, rows, cols, in_image = _item(tl.program_id(0), channels, height, width,
                                                       CHANNELS, TILE_H, TILE_W)
    plane = height * width
    x_planes = x_ptr + (batch * channels + c).to(tl.int64) * plane
    acc = tl.zeros(in_image.shape, tl.float32)
    for t in range(K * K):
        dy, dx = _tap_shift(t, dilation, K)
        w = tl.load(weight_ptr + c * (K * K) + t).to(tl.float32)
        acc += w * _shifted(x_planes, rows, cols, height, width, in_image, dy, dx)
    out = acc + tl.load(bias_ptr + c).to(tl.float32)
    tl.store(out_ptr + (batch * channels + c).to(tl.int64) * plane + rows * width + cols,
             out.to(out_ptr.dtype.element_ty), mask=in_image & lane_ok)


@triton.jit
def depthwise_conv2d_backward_kernel(grad_out_ptr, x_ptr, weight_ptr, grad_x_ptr, partial_ptr, channels, height,
                                     width, dilation, K: tl.constexpr, CHANNELS: tl.constexpr,
                                     TILE_H: tl.constexpr, TILE_W: tl.constexpr):
    """One program per (batch, CHANNELS channels c, tile): dx[c] = Σ_t w[c, t]·g[c](p − shift_t)
    on the tile; the tile's weight sums Σ g[c]·x[c](p + shift_t) and bias sum Σ g[c] into its row
    of the partial table."""
    batch, tile, c, lane_ok, rows, cols, in_image = _item(tl.program_id(0), channels, height, width,
                                                          CHANNELS, TILE_H, TILE_W)
    plane = height * width
    offset = (batch * channels + c).to(tl.int64) * plane
    mask = in_image & lane_ok
    g = tl.load(grad_out_ptr + offset + rows * width + cols, mask=mask, other=0.0).to(tl.float32)
    tiles = tl.cdiv(height, TILE_H) * tl.cdiv(width, TILE_W)
    entries = partial_ptr + (batch * tiles + tile).to(tl.int64) * (channels * (K * K + 1)) + c * (K * K + 1)
    dx = tl.zeros(in_image.shape, tl.float32)
    for t in range(K * K):
        dy, dxx = _tap_shift(t, dilation, K)
        w = tl.load(weight_ptr + c * (K * K) + t).to(tl.float32)
        dx += w * _shifted(grad_out_ptr + offset, rows, cols, height, width, mask, -dy, -dxx)
        tl.store(entries + t, _tile_sum(g * _shifted(x_ptr + offset, rows, cols, height, width, mask, dy, dxx)),
                 mask=lane_ok)
    tl.store(entries + K * K, _tile_sum(g), mask=lane_ok)
    tl.store(grad_x_ptr + offset + rows * width + cols, dx.to(grad_x_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------
# Launch configurations: the one place that chooses block sizes (launchers and AOT tests)
# ---------------------------------------------------------------------------------------------
# On a GPU a program holds one channel's 16 x 64 tile in 4 warps (rows of 64 contiguous pixels),
# as gated_dwconv's. (Chosen, not tuned: no GPU was at hand to time it.)
GPU_BLOCKS = {"CHANNELS": 1, "TILE_H": 16, "TILE_W": 64, "num_warps": 4}


def _blocks(x):
    if x.device.type == "cuda":
        return GPU_BLOCKS
    return interpreter_blocks(x.shape[2], x.shape[3], x.shape[1])


def _constexprs(blocks):
    return {name: blocks[name] for name in ("CHANNELS", "TILE_H", "TILE_W")}


def launch_configurations():
    """Every (kernel, signature, constexprs, options) the launchers below can choose on a GPU
    (sum_partials_kernel is mixed_scale_dwconv's, listed there)."""
    configs = []
    options = {"num_warps": GPU_BLOCKS["num_warps"]}
    for dtype in DTYPES:
        t = _TRITON_TYPE_NAMES[dtype]
        for k in KERNEL_SIZES:
            cx = {"K": k, **_constexprs(GPU_BLOCKS)}
            configs.append((depthwise_conv2d_forward_kernel,
                            aot_signature(depthwise_conv2d_forward_kernel, cx,
                                          {"x_ptr": t, "weight_ptr": t, "bias_ptr": t, "out_ptr": t}), cx, options))
            configs.append((depthwise_conv2d_backward_kernel,
                            aot_signature(depthwise_conv2d_backward_kernel, cx,
                                          {"grad_out_ptr": t, "x_ptr": t, "weight_ptr": t, "grad_x_ptr": t}),
                            cx, options))
    return configs


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------
def _kernel_size(weight):
    """K as a Python int, a compile-time constant of the kernels. (Under torch.compile a shape may
    be symbolic: comparing it with each size specializes the graph on K.)"""
    for k in KERNEL_SIZES:
        if weight.shape[-1] == k:
            return k
    raise ValueError(f"weight: the kernel size K must be one of {KERNEL_SIZES}, got {weight.shape[-1]}")


def _bias_or_zeros(bias, like):
    """A missing bias as zeros: one compiled kernel serves both cases, at the cost of a load."""
    return bias.contiguous() if bias is not None else like.new_zeros(like.shape[1])


def forward(x: Tensor, weight: Tensor, bias: Optional[Tensor], dilation: int) -> Tensor:
    """The op's forward: out (B, C, H, W) of x's dtype, contiguous.

    x: (B, C, H, W) fp32/fp16/bf16; weight (C, 1, K, K), K one of 1, 3, 5, 7; bias (C,) or None;
    dilation >= 1."""
    x = x.contiguous()
    batch, channels, height, width = x.shape
    out = torch.empty_like(x)
    blocks = _blocks(x)
    programs, _ = _programs(batch, channels, height, width, blocks)
    launch(depthwise_conv2d_forward_kernel, (programs,), x, weight.contiguous(), _bias_or_zeros(bias, x), out,
           channels, height, width, dilation,
           K=_kernel_size(weight), **_constexprs(blocks), num_warps=blocks["num_warps"])
    return out


def backward(grad_out: Tensor, x: Tensor, weight: Tensor, bias: Optional[Tensor], dilation: int
             ) -> tuple[Tensor, Tensor, Tensor]:
    """The op's backward from the saved x: the gradients of x, weight and bias (the last always,
    (C,)), each of x's dtype."""
    x = x.contiguous()
    grad_out = grad_out.to(x.dtype).contiguous()
    batch, channels, height, width = x.shape
    k = _kernel_size(weight)
    blocks = _blocks(x)
    programs, tiles = _programs(batch, channels, height, width, blocks)
    total = channels * (k * k + 1)
    partial = x.new_empty((batch * tiles, total), dtype=torch.float32)
    grad_x = torch.empty_like(x)
    launch(depthwise_conv2d_backward_kernel, (programs,), grad_out, x, weight.contiguous(), grad_x, partial,
           channels, height, width, dilation,
           K=k, **_constexprs(blocks), num_warps=blocks["num_warps"])
    sums = x.new_empty((total,), dtype=torch.float32)
    launch(sum_partials_kernel, (triton.cdiv(total, _SUM_BLOCK),), partial, sums, batch * tiles, total,
           BLOCK=_SUM_BLOCK, num_warps=4)
    sums = sums.reshape(channels, k * k + 1).to(x.dtype)
    # Copies (a reshape or `contiguous` of one channel's row would be a view): the op's outputs
    # are dense and share no storage.
    grad_weight = sums[:, :k * k].reshape(channels, 1, k, k).clone(memory_format=torch.contiguous_format)
    grad_bias = sums[:, k * k].clone(memory_format=torch.contiguous_format)
    return grad_x, grad_weight, grad_bias
