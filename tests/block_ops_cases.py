"""Inputs and comparisons shared by the tests of the per-block ops layer_norm2d, gated_dwconv and
depthwise_conv2d (DESIGN.md §5) on every backend: the backend in some dtype against the float64 reference, by the
rule of tests/helpers.py."""
import torch

import sparse_attn
from helpers import assert_matches_float64_reference
from sparse_attn.reference import depthwise_conv2d as reference_depthwise_conv2d
from sparse_attn.reference import gated_dwconv as reference_gated_dwconv
from sparse_attn.reference import layer_norm2d as reference_layer_norm2d

LAYER_NORM_NAMES = ("x", "weight", "bias")
GATED_NAMES = ("x", "weight", "bias", "activation_weight")
DEPTHWISE_NAMES = ("x", "weight", "bias")

# (B, C, H, W). The CPU kernels walk blocks of 64 pixels in tasks of 2048, the CUDA and Triton
# ones blocks of 128: one pixel, fewer pixels than a block, several ragged blocks and tasks, an
# odd C and Restormer's level-1 width 48 and level-4 width 384.
LAYER_NORM_SHAPES = [(2, 5, 3, 7), (1, 48, 9, 13), (1, 3, 1, 1), (2, 384, 4, 5), (1, 7, 50, 47)]

# (B, 2h, H, W). The CPU tiles are 32 x 128 pixels, the CUDA ones 16 x 32: several tiles with
# ragged edges, images thinner than the 3x3 kernel, an odd h and Restormer's level-1 width
# 2h = 2·int(48·2.66) = 254.
GATED_SHAPES = [(2, 6, 5, 9), (1, 254, 9, 7), (2, 6, 1, 7), (1, 6, 7, 1), (1, 2, 1, 1), (2, 6, 37, 133)]

# (B, C, H, W, K, dilation). The CPU kernels compute blocks of 16 columns and bands of about 4096
# pixels: images narrower than a block and than the window's reach (K = 7, dilation 2 reaches 6
# pixels), ragged blocks and several bands; every kernel size, dilations 1 to 3. The AVX-512
# forward computes 8 rows of a dilation phase by 32 columns where the window stays inside the
# image, else 16 masked columns, and a phase's last rows in groups of 4, 2 and 1: the last five
# cases reach those inside blocks for every kernel size and dilations 1, 2 and 3 (at 3 the
# dilation is not a compile-time constant), with phases of 8 + 4 + 2 + 1 rows and one channel.
DEPTHWISE_CASES = [(2, 3, 5, 9, 3, 1), (1, 4, 7, 37, 7, 2), (2, 5, 1, 1, 5, 1), (1, 3, 9, 4, 7, 1),
                   (2, 6, 13, 19, 1, 1), (1, 2, 70, 133, 3, 2), (1, 3, 11, 40, 5, 3), (1, 48, 12, 16, 3, 1),
                   (1, 2, 30, 70, 7, 2), (2, 3, 21, 50, 3, 1), (1, 1, 29, 75, 7, 3), (1, 3, 15, 45, 1, 1),
                   (1, 2, 19, 64, 5, 2)]


def _generator(shape):
    return torch.Generator().manual_seed(sum(s * 31 ** i for i, s in enumerate(shape)))


def layer_norm_inputs(shape, dtype, bias=True, device="cpu"):
    """x (off-centre, so that WithBias and BiasFree differ), weight and bias (or None)."""
    g = _generator(shape)
    channels = shape[1]

    def rand(*s, scale=1.0, shift=0.0):
        return (torch.randn(*s, generator=g, dtype=torch.float64) * scale + shift).to(device=device, dtype=dtype)

    return [rand(*shape, scale=2.0, shift=0.5), rand(channels, scale=0.5, shift=1.0),
            rand(channels, scale=0.3) if bias else None]


def gated_inputs(shape, dtype, bias=True, activation="gelu", device="cpu"):
    """x, weight, bias (or None) and prelu's slope (None for the other activations), scaled like
    trained weights so that the gate's nonlinearity matters."""
    g = _generator(shape)
    channels = shape[1]

    def rand(*s, scale=1.0):
        return (torch.randn(*s, generator=g, dtype=torch.float64) * scale).to(device=device, dtype=dtype)

    slope = torch.tensor([0.25], dtype=dtype, device=device) if activation == "prelu" else None
    return [rand(*shape), rand(channels, 1, 3, 3, scale=0.4), rand(channels, scale=0.2) if bias else None, slope]


def layer_norm_fn(backend):
    return lambda x, w, b: sparse_attn.layer_norm2d(x, w, b, backend=backend)


def gated_fn(backend, activation):
    return lambda x, w, b, a: sparse_attn.gated_dwconv(x, w, b, activation, a, backend=backend)


def _reference_gated(activation):
    return lambda x, w, b, a: reference_gated_dwconv(x, w, b, activation, a)


# In float64 (where the reference is the truth) the parameter gradients sum up to ~10^4 pixels in
# another order than the reference's reduction: a floor of 64 ulps of the largest value.
_FLOOR_ULPS = {torch.float64: 64}


def assert_layer_norm_close(backend, shape, dtype, bias, device="cpu"):
    inputs64 = layer_norm_inputs(shape, torch.float64, bias, device)
    grad64 = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(7)).to(device)
    assert_matches_float64_reference(layer_norm_fn(backend), reference_layer_norm2d, inputs64, dtype,
                                     ("out",) + LAYER_NORM_NAMES, grad64, _FLOOR_ULPS)


def assert_gated_close(backend, shape, dtype, bias, activation, device="cpu"):
    inputs64 = gated_inputs(shape, torch.float64, bias, activation, device)
    out_shape = (shape[0], shape[1] // 2, shape[2], shape[3])
    grad64 = torch.randn(out_shape, dtype=torch.float64, generator=torch.Generator().manual_seed(7)).to(device)
    assert_matches_float64_reference(gated_fn(backend, activation), _reference_gated(activation), inputs64, dtype,
                                     ("out",) + GATED_NAMES, grad64, _FLOOR_ULPS)


def depthwise_inputs(shape, kernel, dtype, bias=True, device="cpu"):
    """x, weight (C, 1, K, K) and bias (or None)."""
    g = _generator(tuple(shape) + (kernel,))
    channels = shape[1]

    def rand(*s, scale=1.0):
        return (torch.randn(*s, generator=g, dtype=torch.float64) * scale).to(device=device, dtype=dtype)

    return [rand(*shape), rand(channels, 1, kernel, kernel, scale=1.0 / kernel), rand(channels, scale=0.2) if bias else None]


def depthwise_fn(backend, dilation):
    return lambda x, w, b: sparse_attn.depthwise_conv2d(x, w, b, dilation, backend=backend)


def assert_depthwise_close(backend, case, dtype, bias, device="cpu"):
    *shape, kernel, dilation = case
    inputs64 = depthwise_inputs(shape, kernel, torch.float64, bias, device)
    grad64 = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(7)).to(device)
    reference = lambda x, w, b: reference_depthwise_conv2d(x, w, b, dilation)  # noqa: E731
    assert_matches_float64_reference(depthwise_fn(backend, dilation), reference, inputs64, dtype,
                                     ("out",) + DEPTHWISE_NAMES, grad64, _FLOOR_ULPS)
