"""Block-sparse region attention cases (DESIGN.md §4): the fine stage of region-selection
attention, t = R/4 key regions of 8 × 8 pixels per query region, d = 16 per head (LAA's dim 64 in
4 heads), at 128² and 256².

Baselines: the same attention run densely in PyTorch (full N × N scores, the non-selected regions
masked to −∞, softmax, times v) and ``F.scaled_dot_product_attention`` with that boolean mask;
ours: ``sparse_attn.block_sparse_attention`` on every backend. A baseline whose N × N matrices do
not fit the memory a benchmark may take is a row that says how much it would need.
"""
import torch
import torch.nn.functional as F

import sparse_attn
from sparse_attn.backends import BACKENDS

from .case import EAGER, Case, Skipped, Variant, require_backend
from .report import Target, find_row, ratio

GROUP = "regions"
NAME = "block-sparse region attention"
D, REGION = 16, 8
# The dense baseline holds about three N × N float32 matrices per head (scores, masked scores,
# probabilities; more in backward): beyond this many bytes for one of them it is not run.
DENSE_LIMIT_BYTES = 2 * 2**30


def spec_of(side, heads):
    return {"batch": 1, "heads": heads, "side": side}


def default_specs(sweep):
    """One head at 128² (where the dense baselines fit), and LAA's four heads at 128² and 256²."""
    return [spec_of(128, 1), spec_of(128, 4), spec_of(256, 4)]


def _key_blocks(batch, heads, regions, device):
    """t = R/4 distinct key regions per query region, seeded."""
    generator = torch.Generator().manual_seed(1)
    order = torch.rand(batch, heads, regions, regions, generator=generator).argsort(-1)
    return order[..., :regions // 4].to(device)


def _allowed(key_blocks, side):
    """(B, heads, N, N) boolean mask: key pixel j is read by query pixel i."""
    columns = side // REGION
    pixel_region = ((torch.arange(side) // REGION)[:, None] * columns
                    + (torch.arange(side) // REGION)[None, :]).reshape(-1).to(key_blocks.device)
    batch, heads, regions, _ = key_blocks.shape
    selected = torch.zeros(batch, heads, regions, regions, dtype=torch.bool, device=key_blocks.device)
    selected.scatter_(-1, key_blocks, True)
    return selected[:, :, pixel_region][:, :, :, pixel_region]


def _flat(x):
    batch, heads, d, height, width = x.shape
    return x.reshape(batch, heads, d, height * width).transpose(-1, -2)


def _dense_bytes(spec):
    n = spec["side"] ** 2
    return spec["batch"] * spec["heads"] * n * n * 4


def _dense(spec, kind, device):
    need = _dense_bytes(spec) if kind == "masked" else _dense_bytes(spec) // 4  # bool mask
    if need > DENSE_LIMIT_BYTES:
        what = "each N x N float32 matrix" if kind == "masked" else "the N x N boolean mask"
        raise Skipped(f"not runnable within the memory limit: {what} needs {need / 2**30:.1f} GiB "
                      f"({need / spec['heads'] / 2**30:.1f} GiB per head)")
    side, regions = spec["side"], (spec["side"] // REGION) ** 2
    allowed = _allowed(_key_blocks(spec["batch"], spec["heads"], regions, device), side)

    def masked(q, k, v):
        scores = _flat(q) @ _flat(k).transpose(-1, -2) * D ** -0.5
        out = torch.softmax(scores.masked_fill(~allowed, -torch.inf), dim=-1) @ _flat(v)
        return out.transpose(-1, -2).reshape(q.shape)

    def sdpa(q, k, v):
        out = F.scaled_dot_product_attention(_flat(q), _flat(k), _flat(v), attn_mask=allowed)
        return out.transpose(-1, -2).reshape(q.shape)
    return masked if kind == "masked" else sdpa


def _ours(spec, backend, device):
    require_backend(backend, device)
    regions = (spec["side"] // REGION) ** 2
    key_blocks = _key_blocks(spec["batch"], spec["heads"], regions, device)
    return lambda q, k, v: sparse_attn.block_sparse_attention(q, k, v, key_blocks, REGION, backend=backend)


def make_case(spec):
    b, heads, side = spec["batch"], spec["heads"], spec["side"]

    def inputs(device, dtype):
        generator = torch.Generator().manual_seed(0)
        return [torch.randn(b, heads, D, side, side, generator=generator, dtype=torch.float64)
                .to(device=device, dtype=dtype).requires_grad_() for _ in range(3)]

    variants = [Variant("dense masked (eager)", lambda device, dtype: _dense(spec, "masked", device), EAGER),
                Variant("SDPA masked", lambda device, dtype: _dense(spec, "sdpa", device))]
    variants += [Variant(name, lambda device, dtype, name=name: _ours(spec, name, device)) for name in BACKENDS
                 if not (name == "reference" and heads * side * side > 128 * 128)]
    return Case(group=GROUP, name=NAME, shape=f"B{b} heads{heads} d{D} {side}x{side} t=R/4", spec=spec,
                pixels=side * side, inputs=inputs, variants=variants, peak_mode="inference")


def targets(rows):
    """Issue 13's targets (CPU, fp32): at 128², forward >= 3x the masked dense attention with at
    most 10% of its peak memory, forward+backward >= 2x; measured with one head, where the dense
    baseline fits (heads are independent: the ratios hold per head)."""
    shape = make_case(spec_of(128, 1)).shape
    native = find_row(rows, NAME, shape, "native")
    dense = find_row(rows, NAME, shape, "dense masked (eager)")
    where = f"{NAME} {shape}, native"
    get = lambda row, field: getattr(row, field, None)  # noqa: E731
    return [
        Target("13", f"{where}: fwd vs dense masked", get(native, "speedup_eager_fwd"), ">=", 3.0),
        Target("13", f"{where}: peak / dense masked's", ratio(get(native, "peak_bytes"), get(dense, "peak_bytes")),
               "<=", 0.10, "%"),
        Target("13", f"{where}: fwd+bwd vs dense masked", get(native, "speedup_eager_fwdbwd"), ">=", 2.0),
    ]
