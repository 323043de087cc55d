"""Triton kernels of the channel LayerNorm of the Restormer family (DESIGN.md §5) and their
launchers.

    centred (bias given, WithBias):   out = (x − μ)·r·weight + bias,   r = 1/√(σ² + eps)
    not centred (BiasFree):           out = x·r·weight

over the C channels of every pixel of an NCHW map. NCHW keeps one channel of neighbouring pixels
contiguous, so a program owns BLOCK_P pixels of one image and walks the channels BLOCK_C at a
time as (BLOCK_C, BLOCK_P) blocks (coalesced along the pixels):

  forward   channel sums (μ), squared deviations (σ²), then the output; μ and r are stored in
            fp32 for the backward.
  backward  sums of g = grad_out·weight and g·ŷ over the channels, then
            dx = r·(g − [centred]·mean(g) − x̂·mean(g·ŷ)) with x̂ = (x − μ)·r; the program's sums of
            grad_out·ŷ and grad_out per channel go to its row of a partial table, added in row
            order by `sum_partials_kernel`. No atomics: the bits never depend on scheduling.

Inputs may be fp32, fp16 or bf16; every sum is fp32, results are rounded once.
`launch_configurations()` lists every (kernel, signature, constexprs, options) the launchers can
choose, for ahead-of-time compilation in the tests.
"""
from typing import Optional

import torch
import triton
import triton.language as tl

from ._launch import aot_signature, launch
from .mixed_scale_dwconv import sum_partials_kernel

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_TRITON_TYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
_SUM_BLOCK = 256


@triton.jit
def _pixel_block(pid, plane, BLOCK_P: tl.constexpr):
    """The image and pixels of program `pid` (pixel blocks of one image are consecutive)."""
    blocks = tl.cdiv(plane, BLOCK_P)
    batch = pid // blocks
    pixels = (pid % blocks) * BLOCK_P + tl.arange(0, BLOCK_P)
    return batch, pixels[None, :], pixels[None, :] < plane


@triton.jit
def layer_norm2d_forward_kernel(x_ptr, weight_ptr, bias_ptr, out_ptr, mean_ptr, rstd_ptr, channels, plane, eps,
                                CENTRED: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    """One program per BLOCK_P pixels of one image; bias_ptr is read only when CENTRED."""
    pid = tl.program_id(0)
    batch, pixels, pixel_ok = _pixel_block(pid, plane, BLOCK_P)
    image = batch.to(tl.int64) * channels * plane
    lanes = tl.arange(0, BLOCK_C)[:, None]
    total = tl.zeros((1, BLOCK_P), tl.float32)
    for c0 in range(0, channels, BLOCK_C):
        ok = (c0 + lanes < channels) & pixel_ok
        x = tl.load(x_ptr + image + (c0 + lanes) * plane + pixels, mask=ok, other=0.0).to(tl.float32)
        total += tl.sum(x, axis=0, keep_dims=True)
    mean = total / channels
    squares = tl.zeros((1, BLOCK_P), tl.float32)
    for c0 in range(0, channels, BLOCK_C):
        ok = (c0 + lanes < channels) & pixel_ok
        x = tl.load(x_ptr + image + (c0 + lanes) * plane + pixels, mask=ok, other=0.0).to(tl.float32)
        d = tl.where(ok, x - mean, 0.0)
        squares += tl.sum(d * d, axis=0, keep_dims=True)
    rstd = 1.0 / tl.sqrt(squares / channels + eps)
    for c0 in range(0, channels, BLOCK_C):
        c_ok = c0 + lanes < channels
        ok = c_ok & pixel_ok
        offsets = image + (c0 + lanes) * plane + pixels
        x = tl.load(x_ptr + offsets, mask=ok, other=0.0).to(tl.float32)
        w = tl.load(weight_ptr + c0 + lanes, mask=c_ok, other=0.0).to(tl.float32)
        if CENTRED:
            b = tl.load(bias_ptr + c0 + lanes, mask=c_ok, other=0.0).to(tl.float32)
            y = (x - mean) * rstd * w + b
        else:
            y = x * rstd * w
        tl.store(out_ptr + offsets, y.to(out_ptr.dtype.element_ty), mask=ok)
    stats = batch.to(tl.int64) * plane + pixels
    tl.store(mean_ptr + stats, mean, mask=pixel_ok)
    tl.store(rstd_ptr + stats, rstd, mask=pixel_ok)


@triton.jit
def layer_norm2d_backward_kernel(grad_out_ptr, x_ptr, weight_ptr, mean_ptr, rstd_ptr, grad_x_ptr, partial_ptr,
                                 channels, plane, CENTRED: tl.constexpr, BLOCK_C: tl.constexpr,
                                 BLOCK_P: tl.constexpr):
    """One program per BLOCK_P pixels of one image: dx, and the row `pid` of the partial table
    (Σ grad_out·ŷ per channel at [0, C), Σ grad_out at [C, 2C))."""
    pid = tl.program_id(0)
    batch, pixels, pixel_ok = _pixel_block(pid, plane, BLOCK_P)
    image = batch.to(tl.int64) * channels * plane
    stats = batch.to(tl.int64) * plane + pixels
    mean = tl.load(mean_ptr + stats, mask=pixel_ok, other=0.0)
    rstd = tl.load(rstd_ptr + stats, mask=pixel_ok, other=0.0)
    lanes = tl.arange(0, BLOCK_C)[:, None]
    partial = partial_ptr + pid.to(tl.int64) * (2 * channels)
    sum_g = tl.zeros((1, BLOCK_P), tl.float32)
    sum_gy = tl.zeros((1, BLOCK_P), tl.float32)
    for c0 in range(0, channels, BLOCK_C):
        c_ok = c0 + lanes < channels
        ok = c_ok & pixel_ok
        offsets = image + (c0 + lanes) * plane + pixels
        x = tl.load(x_ptr + offsets, mask=ok, other=0.0).to(tl.float32)
        dy = tl.load(grad_out_ptr + offsets, mask=ok, other=0.0).to(tl.float32)
        w = tl.load(weight_ptr + c0 + lanes, mask=c_ok, other=0.0).to(tl.float32)
        y_hat = (x - mean) * rstd if CENTRED else x * rstd
        sum_g += tl.sum(dy * w, axis=0, keep_dims=True)
        sum_gy += tl.sum(dy * w * y_hat, axis=0, keep_dims=True)
        tl.store(partial + c0 + lanes, tl.sum(dy * y_hat, axis=1, keep_dims=True), mask=c_ok)
        tl.store(partial + channels + c0 + lanes, tl.sum(dy, axis=1, keep_dims=True), mask=c_ok)
    mean_g = sum_g / channels
    mean_gy = sum_gy / channels
    for c0 in range(0, channels, BLOCK_C):
        c_ok = c0 + lanes < channels
        ok = c_ok & pixel_ok
        offsets = image + (c0 + lanes) * plane + pixels
        x = tl.load(x_ptr + offsets, mask=ok, other=0.0).to(tl.float32)
        g = tl.load(grad_out_ptr + offsets, mask=ok, other=0.0).to(tl.float32) * \
            tl.load(weight_ptr + c0 + lanes, mask=c_ok, other=0.0).to(tl.float32)
        if CENTRED:
            g = g - mean_g
        dx = rstd * (g - (x - mean) * rstd * mean_gy)
        tl.store(grad_x_ptr + offsets, dx.to(grad_x_ptr.dtype.element_ty), mask=ok)


# ---------------------------------------------------------------------------------------------
# Launch configurations: the one place that chooses block sizes (launchers and AOT tests)
# ---------------------------------------------------------------------------------------------
# On a GPU a program holds 32 channels x 128 pixels (16 KB of fp32) in 4 warps, each warp reading
# 128 contiguous pixels of a channel. (Chosen, not tuned: no GPU was at hand to time it.)
GPU_BLOCKS = {"BLOCK_C": 32, "BLOCK_P": 128, "num_warps": 4}


def interpreter_blocks(channels, plane):
    """The interpreter (CPU tensors) pays per operation, not per element: as many pixels and
    channels per program as make 32K values."""
    block_c = min(triton.next_power_of_2(channels), 64)
    block_p = min(triton.next_power_of_2(plane), 32768 // block_c)
    return {"BLOCK_C": block_c, "BLOCK_P": block_p, "num_warps": 4}


def _blocks(x):
    return GPU_BLOCKS if x.device.type == "cuda" else interpreter_blocks(x.shape[1], x.shape[2] * x.shape[3])


def launch_configurations():
    """Every (kernel, signature, constexprs, options) the launchers below can choose on a GPU."""
    configs = []
    blocks = {"BLOCK_C": GPU_BLOCKS["BLOCK_C"], "BLOCK_P": GPU_BLOCKS["BLOCK_P"]}
    options = {"num_warps": GPU_BLOCKS["num_warps"]}
    for dtype in DTYPES:
        t = _TRITON_TYPE_NAMES[dtype]
        for centred in (True, False):
            cx = {"CENTRED": centred, **blocks}
            signature = aot_signature(layer_norm2d_forward_kernel, cx,
                                      {name: t for name in ("x_ptr", "weight_ptr", "bias_ptr", "out_ptr")})
            configs.append((layer_norm2d_forward_kernel, {**signature, "eps": "fp32"}, cx, options))
            configs.append((layer_norm2d_backward_kernel,
                            aot_signature(layer_norm2d_backward_kernel, cx,
                                          {name: t for name in ("grad_out_ptr", "x_ptr", "weight_ptr", "grad_x_ptr")}),
                            cx, options))
    return configs


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------
def forward(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], eps: float
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The op's forward: out (x's dtype and shape, contiguous) and the per-pixel mean and
    1/√(σ² + eps), (B, H, W) in fp32.

    x: (B, C, H, W) fp32/fp16/bf16; weight (C,), bias (C,) or None, of x's dtype and device."""
    x = x.contiguous()
    batch, channels, height, width = x.shape
    plane = height * width
    out = torch.empty_like(x)
    mean = x.new_empty((batch, height, width), dtype=torch.float32)
    rstd = torch.empty_like(mean)
    blocks = _blocks(x)
    weight = weight.contiguous()
    launch(layer_norm2d_forward_kernel, (batch * triton.cdiv(plane, blocks["BLOCK_P"]),),
           x, weight, bias.contiguous() if bias is not None else weight, out, mean, rstd, channels, plane, eps,
           CENTRED=bias is not None, BLOCK_C=blocks["BLOCK_C"], BLOCK_P=blocks["BLOCK_P"],
           num_warps=blocks["num_warps"])
    return out, mean, rstd


def backward(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
             mean: torch.Tensor, rstd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The op's backward from the saved x, mean and rstd: the gradients of x, weight and bias
    (the bias gradient always), each of its input's dtype and shape."""
    x = x.contiguous()
    grad_out = grad_out.to(x.dtype).contiguous()
    batch, channels, height, width = x.shape
    plane = height * width
    blocks = _blocks(x)
    programs = batch * triton.cdiv(plane, blocks["BLOCK_P"])
    grad_x = torch.empty_like(x)
    partial = x.new_empty((programs, 2 * channels), dtype=torch.float32)
    launch(layer_norm2d_backward_kernel, (programs,), grad_out, x, weight.contiguous(), mean.contiguous(),
           rstd.contiguous(), grad_x, partial, channels, plane, CENTRED=bias is not None,
           BLOCK_C=blocks["BLOCK_C"], BLOCK_P=blocks["BLOCK_P"], num_warps=blocks["num_warps"])
    sums = x.new_empty((2 * channels,), dtype=torch.float32)
    launch(sum_partials_kernel, (triton.cdiv(2 * channels, _SUM_BLOCK),), partial, sums, programs, 2 * channels,
           BLOCK=_SUM_BLOCK, num_warps=4)
    # Copies: the op's outputs must not share storage.
    return grad_x, sums[:channels].to(x.dtype, copy=True), sums[channels:].to(x.dtype, copy=True)
