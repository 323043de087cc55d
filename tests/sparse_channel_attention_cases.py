"""Inputs and calls shared by the sparse_channel_attention tests of every backend (the tolerance
rule and the checks themselves are in helpers.py)."""
import torch

import sparse_attn
from helpers import assert_matches_float64_reference, why_not

GRAD_NAMES = ("q", "k", "v", "temperature", "weights")
NAMES = ("out",) + GRAD_NAMES
# The kernels sum in blocks, in another order than torch's matmuls and reductions: each score
# sums N products (thousands here) and the weights' gradient B·heads·d² of them. Measured: up to
# 20 ulps of the largest value in float64; in float32 up to 9.1 ulps (the weights' gradient of
# native at B=2, heads=2, d=13, N=18, found by test_properties.py) where the reference strays
# 0.4, so the floor, not twice the reference's error, is what bounds it.
FLOOR_ULPS = {torch.float64: 32, torch.float32: 12}


def make_inputs(batch, heads, d, n, dtype=torch.float64, branches=4, layout="contiguous", device="cpu"):
    """q, k, v, temperature (heads, 1, 1), weights (branches,), as leaves requiring grad.
    layout "transposed": (B, heads, N, d) storage seen as (B, heads, d, N); "chunked": channel
    slices of one qkv map, as the modules produce them."""
    if layout == "transposed":
        q, k, v = (torch.randn(batch, heads, n, d, dtype=dtype, device=device).transpose(-1, -2) for _ in range(3))
    elif layout == "chunked":
        qkv = torch.randn(batch, 3 * heads * d, n, dtype=dtype, device=device)
        q, k, v = (t.reshape(batch, heads, d, n) for t in qkv.chunk(3, dim=1))
    else:
        q, k, v = (torch.randn(batch, heads, d, n, dtype=dtype, device=device) for _ in range(3))
    temperature = torch.rand(heads, 1, 1, dtype=dtype, device=device) + 0.5
    weights = torch.rand(branches, dtype=dtype, device=device) + 0.1
    return [t.detach().requires_grad_() for t in (q, k, v, temperature, weights)]


def attention(backend, topk, activation="softmax"):
    """The op on ``backend`` as a function of (q, k, v, temperature, weights)."""
    def call(q, k, v, temperature, weights):
        return sparse_attn.sparse_channel_attention(q, k, v, temperature, weights, topk, activation, backend=backend)
    return call


def assert_matches_reference(backend, inputs, topk, activation, dtype):
    """``backend`` in ``dtype`` against the reference in float64 on the values of ``inputs``:
    output and every gradient, within the rule of helpers.py."""
    assert_matches_float64_reference(attention(backend, topk, activation), attention("reference", topk, activation),
                                     inputs, dtype, NAMES, floor_ulps=FLOOR_ULPS)


def why_unavailable(backend, dtype=torch.float32, device="cpu", d=2):
    """None when the op runs ``backend`` on ``dtype`` tensors of ``d`` channels per head on
    ``device``; else the BackendUnavailable message saying why not."""
    q = torch.ones(1, 1, d, 3, dtype=dtype, device=device)
    one = torch.ones(1, dtype=dtype, device=device)
    return why_not(lambda: sparse_attn.sparse_channel_attention(q, q, q, one, one, (1,), backend=backend))


def with_ties_and_zero_channels(inputs):
    """A zero channel of q makes its score row all ties; a repeated channel of k makes two equal
    columns in every row; a zero channel of k a zero column."""
    q, k, v, temperature, weights = inputs
    with torch.no_grad():
        q[:, :, 3] = 0
        k[:, :, 7] = k[:, :, 2]
        k[:, :, 5] = 0
    return [q, k, v, temperature, weights]
