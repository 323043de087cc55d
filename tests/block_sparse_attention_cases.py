"""Inputs and the ground truth shared by the tests of block_sparse_attention (DESIGN.md §4) on
every backend: the dense masked attention (full N × N scores, the non-selected regions at −∞)
and the comparison of a backend in some dtype against it in float64, by the rule of
tests/helpers.py."""
import torch

import sparse_attn
from helpers import assert_matches_float64_reference

NAMES = ("out", "q", "k", "v")

# (B, heads, d, H, W, region, t): one region per query (t = 1); an odd number of regions (15, in
# 3 x 5); t = R; non-square regions; several heads and images; the module's 8 x 8 regions with
# d = 16; an odd d.
CASES = [
    (1, 1, 4, 8, 8, (4, 4), 1),
    (2, 3, 5, 12, 20, (4, 4), 4),
    (1, 2, 8, 8, 12, (4, 4), 6),
    (2, 2, 6, 12, 12, (2, 3), 7),
    (1, 2, 16, 24, 16, (8, 8), 3),
    (2, 1, 3, 6, 10, (2, 2), 15),
]


def case_id(case):
    batch, heads, d, height, width, (region_h, region_w), t = case
    return f"B{batch}h{heads}d{d}_{height}x{width}_r{region_h}x{region_w}_t{t}"


def region_count(height, width, region):
    return (height // region[0]) * (width // region[1])


def random_key_blocks(batch, heads, regions, t, seed=0, device="cpu"):
    """(B, heads, R, t) int64: t distinct key regions per query region, in random order."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, heads, regions, regions, generator=g).argsort(-1)[..., :t].to(device)


def inputs(case, dtype=torch.float64, device="cpu", seed=0):
    """q, k, v (scaled so that the softmax is neither flat nor one-hot) and key_blocks."""
    batch, heads, d, height, width, region, t = case
    g = torch.Generator().manual_seed(seed)
    qkv = [(torch.randn(batch, heads, d, height, width, generator=g, dtype=torch.float64) * 1.5).to(device, dtype)
           for _ in range(3)]
    return qkv, random_key_blocks(batch, heads, region_count(height, width, region), t, seed, device)


def region_of_pixels(height, width, region):
    """(H·W,) the region (row-major) of every pixel (row-major)."""
    rows = torch.arange(height) // region[0]
    cols = torch.arange(width) // region[1]
    return (rows[:, None] * (width // region[1]) + cols[None, :]).reshape(-1)


def dense_masked_attention(q, k, v, key_blocks, region, scale=None):
    """The truth: full N × N attention, every score outside the selected regions at −∞."""
    batch, heads, d, height, width = q.shape
    scale = d ** -0.5 if scale is None else scale
    regions = region_count(height, width, region)
    selected = torch.zeros(batch, heads, regions, regions, dtype=torch.bool, device=q.device)
    selected.scatter_(-1, key_blocks, True)
    pixel_region = region_of_pixels(height, width, region).to(q.device)
    allowed = selected[:, :, pixel_region][:, :, :, pixel_region]  # B, heads, N, N
    flat = lambda x: x.reshape(batch, heads, d, -1).transpose(-1, -2)  # noqa: E731  B, heads, N, d
    scores = scale * flat(q) @ flat(k).transpose(-1, -2)
    attention = torch.softmax(scores.masked_fill(~allowed, -torch.inf), dim=-1)
    return (attention @ flat(v)).transpose(-1, -2).reshape(q.shape)


def op_fn(backend, key_blocks, region, scale=None):
    return lambda q, k, v: sparse_attn.block_sparse_attention(q, k, v, key_blocks, region, scale, backend=backend)


# In float64 (where the truth's own error is 0 by definition) the kernels sum dq over t·P keys block
# by block, the truth over all N pixels at once: a floor of 64 ulps of the largest value.
_FLOOR_ULPS = {torch.float64: 64}


def assert_matches_dense(backend, case, dtype, device="cpu", scale=None, transform=None):
    """The backend in ``dtype`` against the dense masked attention in float64: out and the
    gradients of q, k and v. ``transform`` may make the inputs non-contiguous."""
    (q, k, v), key_blocks = inputs(case, torch.float64, device)
    if transform is not None:
        q, k, v = (transform(t) for t in (q, k, v))
    region = case[5]
    truth = lambda q, k, v: dense_masked_attention(q, k, v, key_blocks, region, scale)  # noqa: E731
    assert_matches_float64_reference(op_fn(backend, key_blocks, region, scale), truth, [q, k, v], dtype, NAMES,
                                     floor_ulps=_FLOOR_ULPS)
