"""Inputs, a direct float64 formula and comparisons shared by the tests of patch_attention
(DESIGN.md §3) on every backend."""
import torch
import torch.nn.functional as F

import sparse_attn
from helpers import assert_matches_float64_reference

# (B, Cq, Cv, (H, W) of q, [(H_l, W_l) of every level]): odd sizes, B > 1, levels of unequal size
# (PANet's pyramid of a 9×11 map), tiny maps (1×1, 2×3, a one-pixel-wide strip), Cq ≠ Cv.
SHAPES = [
    (1, 3, 5, (4, 5), [(4, 5)]),
    (2, 4, 3, (9, 11), [(9, 11), (8, 10), (7, 9), (6, 8), (5, 7)]),
    (1, 2, 3, (1, 1), [(1, 1), (2, 3)]),
    (2, 3, 2, (2, 3), [(2, 3), (1, 1)]),
    (1, 5, 4, (7, 1), [(7, 1), (3, 2)]),
]


def shape_id(shape):
    batch, cq, cv, size, levels = shape
    return f"B{batch}-Cq{cq}-Cv{cv}-{size[0]}x{size[1]}-" + "+".join(f"{h}x{w}" for h, w in levels)


def n_keys(shape):
    return sum(h * w for h, w in shape[4])


# With ``ties``: key_eps above every key patch's norm, so that every key is divided by the same
# power of two and every score is exact; equal scores are then equal on every backend, however
# its sums are ordered (a BLAS product need not give two equal columns equal bits).
TIES_KEY_EPS = 64.0


def make_inputs(shape, dtype=torch.float64, ties=False, zero_keys=False, seed=0):
    """[q, *keys, *values] for ``shape``. ``ties``: maps of -1, 0 and 1 (halves for q), and the
    last level's keys repeat the first level's (its size too): many exactly equal scores, to be
    run with key_eps = TIES_KEY_EPS. ``zero_keys``: a zero block in the first key map, so that
    some key patches have zero norm."""
    batch, cq, cv, (height, width), levels = shape
    if ties and len(levels) > 1:
        levels = levels[:-1] + [levels[0]]
    g = torch.Generator().manual_seed(seed + 1000 * len(levels) + height * width)
    if ties:
        rand = lambda *s: torch.randint(-1, 2, s, generator=g).double()  # noqa: E731
    else:
        rand = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    q = rand(batch, cq, height, width) * 0.5
    keys = [rand(batch, cq, h, w) for h, w in levels]
    values = [rand(batch, cv, h, w) for h, w in levels]
    if ties and len(levels) > 1:
        keys[-1] = keys[0].clone()
    if zero_keys:
        keys[0][:, :, :4, :4] = 0
    return [t.to(dtype) for t in (q, *keys, *values)]


def split(tensors):
    """q, keys, values of a flat [q, *keys, *values]."""
    levels = (len(tensors) - 1) // 2
    return tensors[0], list(tensors[1:1 + levels]), list(tensors[1 + levels:])


def names(inputs):
    levels = (len(inputs) - 1) // 2
    return ("out", "q", *(f"keys[{i}]" for i in range(levels)), *(f"values[{i}]" for i in range(levels)))


def op_fn(backend, scale=10.0, topk=None, key_eps=1e-4):
    """patch_attention on a flat [q, *keys, *values]."""
    def call(*tensors):
        q, keys, values = split(tensors)
        return sparse_attn.patch_attention(q, keys, values, scale, topk, key_eps, backend=backend)
    return call


def _shifted_patches(x):
    """(B, C·9, H·W): the 3×3 patches by explicit shifts of the zero-padded map (not unfold)."""
    batch, channels, height, width = x.shape
    padded = F.pad(x, (1, 1, 1, 1))
    shifts = [padded[:, :, dy:dy + height, dx:dx + width] for dy in range(3) for dx in range(3)]
    return torch.stack(shifts, dim=2).reshape(batch, channels * 9, height * width)


def direct_patch_attention(q, keys, values, scale=10.0, topk=None, key_eps=1e-4):
    """DESIGN.md §3 written out with every N×M score at once (small maps only): the ground truth
    the reference is checked against. Top-k by explicit rank: a key is kept when fewer than t
    keys score higher or score the same at a lower index."""
    batch, _, height, width = q.shape
    query_patches = _shifted_patches(q)
    key_patches = torch.cat([_shifted_patches(k) for k in keys], dim=2)
    value_patches = torch.cat([_shifted_patches(v) for v in values], dim=2)
    norms = key_patches.pow(2).sum(dim=1, keepdim=True).sqrt()
    scores = scale * torch.einsum("bcn,bcm->bnm", query_patches, key_patches / torch.maximum(norms, torch.tensor(key_eps)))
    if topk is not None:
        s = scores.detach()
        index = torch.arange(s.shape[-1])
        before = (s[..., None, :] > s[..., :, None]) | ((s[..., None, :] == s[..., :, None]) & (index[None, :] < index[:, None]))
        scores = scores.masked_fill(before.sum(-1) >= topk, float("-inf"))
    attended = torch.einsum("bnm,bcm->bcn", torch.softmax(scores, dim=-1), value_patches)
    out = torch.zeros(batch, values[0].shape[1], height + 2, width + 2, dtype=q.dtype)
    attended = attended.reshape(batch, -1, 9, height, width)
    for delta in range(9):
        dy, dx = divmod(delta, 3)
        out[:, :, dy:dy + height, dx:dx + width] += attended[:, :, delta]
    return out[:, :, 1:-1, 1:-1]


def assert_backend_close(backend, shape, dtype, topk=None, ties=False, zero_keys=False, scale=10.0, device="cpu"):
    """``backend`` in ``dtype`` against the float64 reference (both on ``device``): output and
    every gradient."""
    inputs = [t.to(device) for t in make_inputs(shape, ties=ties, zero_keys=zero_keys)]
    key_eps = TIES_KEY_EPS if ties else 1e-4
    assert_matches_float64_reference(op_fn(backend, scale, topk, key_eps), op_fn("reference", scale, topk, key_eps),
                                     inputs, dtype,
                                     names(inputs), floor_ulps=FLOAT64_FLOOR_ULPS)


# In float64 the reference is the truth, so only the floor is allowed: the key gradient is the
# difference of two sums over every query (the normalisation's projection removes most of it), in
# another order on the kernels, hence a wider floor than the helpers' 8 ulps.
FLOAT64_FLOOR_ULPS = {torch.float64: 64}
