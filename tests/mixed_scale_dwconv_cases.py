"""Inputs and calls shared by the mixed_scale_dwconv tests of every backend (the tolerance rule
and the checks themselves are in helpers.py)."""
import torch

import sparse_attn
from helpers import assert_matches_float64_reference, why_not
from sparse_attn.reference import mixed_scale_dwconv as reference

NAMES = ("x", "w3", "w5", "w3_1", "w5_1", "b3", "b5", "b3_1", "b5_1")

# (B, 2h, H, W). The CPU tiles are 32 x 128 pixels: the shapes cover several tiles with ragged
# edges, images thinner than a 5x5 kernel (1 x N, N x 1, 1 x 1), an odd h and DRSformer's
# level-1 width 2h = 254 (h = 127).
SHAPES = [
    (2, 6, 5, 9),
    (1, 254, 9, 7),
    (2, 6, 1, 7),
    (1, 6, 7, 1),
    (1, 6, 1, 1),
    (1, 2, 2, 3),
    (2, 6, 37, 133),
]


def make_inputs(shape, dtype, bias=True, device="cpu"):
    """x and the eight parameters, scaled like trained weights so that both relus cut."""
    batch, channels, height, width = shape
    hidden = channels // 2
    g = torch.Generator().manual_seed(channels * 1009 + height * 31 + width)

    def rand(*s, scale=1.0):
        return (torch.randn(*s, generator=g, dtype=torch.float64) * scale).to(device=device, dtype=dtype)

    x = rand(batch, channels, height, width)
    weights = [rand(channels, 1, 3, 3, scale=1 / 3), rand(channels, 1, 5, 5, scale=1 / 5),
               rand(hidden, 2, 3, 3, scale=1 / 4), rand(hidden, 2, 5, 5, scale=1 / 7)]
    biases = ([rand(channels, scale=0.2), rand(channels, scale=0.2), rand(hidden, scale=0.2),
               rand(hidden, scale=0.2)] if bias else [None] * 4)
    return [x, *weights, *biases]


def on(backend):
    """The op on ``backend`` as a function of x and the eight parameters."""
    return lambda *args: sparse_attn.mixed_scale_dwconv(*args, backend=backend)


def assert_matches_reference(backend, inputs, dtype):
    """``backend`` in ``dtype`` against the reference in float64 on the values of ``inputs``:
    output and every gradient (none for a missing bias), within the rule of helpers.py."""
    assert_matches_float64_reference(on(backend), reference, inputs, dtype, ("out",) + NAMES)


def assert_close_to_reference(backend, shape, dtype, bias, device="cpu"):
    """The same on the inputs of ``make_inputs(shape)``."""
    assert_matches_reference(backend, make_inputs(shape, torch.float64, bias, device), dtype)


def why_unavailable(backend, dtype=torch.float32, device="cpu"):
    """None when the op runs ``backend`` on ``dtype`` tensors on ``device``; else the
    BackendUnavailable message saying why not."""
    return why_not(lambda: on(backend)(*make_inputs((1, 2, 1, 1), dtype, bias=False, device=device)))
