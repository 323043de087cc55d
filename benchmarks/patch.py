"""Patch attention cases: PANet's pyramid attention core (DESIGN.md §3) at C = 64.

The official module (``attention.py`` of PANet) computes, per image, the scores of every query
pixel against every 3×3 key patch of its five-level pyramid as one convolution with the key
patches as kernels, a softmax over all of them, and the output as a transposed convolution with
the value patches: the N×M score map is held (and saved for backward). That core is written out
below in its structure as the baseline; ours is ``sparse_attn.patch_attention`` on every
backend. The maps are PANet's: queries and keys with Cq = C/2 channels (``reduction=2``), values
with C, key/value levels of side ⌊s·side⌋ for s = 1.0, 0.9, ..., 0.6.
"""
import torch
import torch.nn.functional as F

import sparse_attn
from sparse_attn.backends import BACKENDS

from .case import Case, Variant, baselines, require_backend
from .report import Target, find_row, ratio

GROUP = "patch"
NAME = "patch attention (PANet)"
CHANNELS = 64
LEVEL_SCALES = (1.0, 0.9, 0.8, 0.7, 0.6)


def official_patch_attention(q, keys, values, scale=10.0, key_eps=1e-4):
    """The official pyramid attention between its projections and ``/4 + residual``: per image,
    the key patches (unfolded with zero padding 1) normalised by max(‖K‖, escape_NaN) as
    convolution kernels, a softmax over all M of them, a transposed convolution with the value
    patches."""
    outs = []
    for i in range(q.shape[0]):
        key_kernels = torch.cat([F.unfold(k[i:i + 1], 3, padding=1)[0].t() for k in keys]).reshape(-1, q.shape[1], 3, 3)
        value_kernels = torch.cat([F.unfold(v[i:i + 1], 3, padding=1)[0].t() for v in values])
        value_kernels = value_kernels.reshape(-1, values[0].shape[1], 3, 3)
        norms = key_kernels.pow(2).sum(dim=(1, 2, 3), keepdim=True).sqrt().clamp_min(key_eps)
        scores = F.conv2d(q[i:i + 1], key_kernels / norms, padding=1)         # (1, M, H, W)
        attention = torch.softmax(scores * scale, dim=1)
        outs.append(F.conv_transpose2d(attention, value_kernels, padding=1))  # (1, Cv, H, W)
    return torch.cat(outs)


def case_spec(side, topk=None, compile=False, peak=True):
    return {"side": side, "topk": topk, "compile": compile, "peak": peak}


# Whole-image sides where only the forward of our kernels is measured: the official core's
# scores alone are 3.3·N² floats (56 GB at 256², ~170 GB at its peak), and backward is minutes.
FORWARD_ONLY_SIDE = 256


def default_specs(sweep):
    """quick and targets: 48² (PANet's training patch), 64² and 128², dense, and 128² with
    topk = 16; full adds torch.compile of the official core (which at 128² needs ~7 GB) and the
    forward at 256² (ours only)."""
    full = sweep == "full"
    return ([case_spec(side, compile=full and side <= 64) for side in (48, 64, 128)]
            + [case_spec(128, topk=16, peak=False)] + ([case_spec(FORWARD_ONLY_SIDE)] if full else []))


def level_sides(side):
    return [int(side * s) for s in LEVEL_SCALES]


def _ours(backend, device, topk):
    require_backend(backend, device)

    def attention(q, *maps):
        levels = len(maps) // 2
        return sparse_attn.patch_attention(q, list(maps[:levels]), list(maps[levels:]), 10.0, topk, backend=backend)
    return attention


def _official(device, dtype):
    def attention(q, *maps):
        levels = len(maps) // 2
        return official_patch_attention(q, list(maps[:levels]), list(maps[levels:]))
    return attention


def make_case(spec):
    side, topk = spec["side"], spec["topk"]
    sides = level_sides(side)

    def inputs(device, dtype):
        generator = torch.Generator().manual_seed(0)

        def tensor(*shape):
            return torch.randn(*shape, generator=generator, dtype=torch.float64).to(device=device, dtype=dtype).requires_grad_()
        return ([tensor(1, CHANNELS // 2, side, side)] + [tensor(1, CHANNELS // 2, s, s) for s in sides]
                + [tensor(1, CHANNELS, s, s) for s in sides])

    forward_only = side >= FORWARD_ONLY_SIDE
    variants = [] if topk is not None or forward_only else baselines(_official, compile=spec["compile"])
    backends = [b for b in BACKENDS if b != "reference" or side <= 64]  # the reference's chunks are slow at 128²
    variants += [Variant(name, lambda device, dtype, name=name: _ours(name, device, topk)) for name in backends]
    label = f"B1 Cq{CHANNELS // 2} Cv{CHANNELS} {side}x{side}, 5 levels" + (f", topk={topk}" if topk else "")
    return Case(group=GROUP, name=NAME, shape=label, spec=spec, pixels=side * side, inputs=inputs, variants=variants,
                truth=(lambda device: _ours("reference", device, topk)) if side <= 64 else None,
                time_backward=not forward_only,
                peak_mode=("inference" if forward_only else "train") if spec["peak"] else None)


def targets(rows):
    """Issue 12's op targets (CPU, fp32): forward at 64² ≥ 3× the official eager, forward+backward
    ≥ 2.5×; peak memory at 128² ≤ 5% of the official's; topk = 16 ≥ 1.3× faster than dense at 128²;
    (--full) the forward at 256² within 1 GiB."""
    get = lambda row, field: getattr(row, field, None)  # noqa: E731
    shape64, shape128 = make_case(case_spec(64)).shape, make_case(case_spec(128)).shape
    native64, native128 = find_row(rows, NAME, shape64, "native"), find_row(rows, NAME, shape128, "native")
    official128 = find_row(rows, NAME, shape128, "official (eager)")
    sparse128 = find_row(rows, NAME, make_case(case_spec(128, topk=16)).shape, "native")
    shape256 = make_case(case_spec(FORWARD_ONLY_SIDE)).shape
    native256 = find_row(rows, NAME, shape256, "native")  # the --full sweep only
    return [
        Target("12", f"{NAME} {shape64}, native: fwd vs official eager", get(native64, "speedup_eager_fwd"), ">=", 3.0, "x"),
        Target("12", f"{NAME} {shape64}, native: fwd+bwd vs official eager", get(native64, "speedup_eager_fwdbwd"),
               ">=", 2.5, "x"),
        Target("12", f"{NAME} {shape128}, native: peak memory / official's",
               ratio(get(native128, "peak_bytes"), get(official128, "peak_bytes")), "<=", 0.05, "%"),
        Target("12", f"{NAME} {shape128}, native: saved bytes / official's",
               ratio(get(native128, "saved_bytes"), get(official128, "saved_bytes")), "<=", 0.05, "%"),
        Target("12", f"{NAME} 128x128, native: fwd dense / fwd topk=16",
               ratio(get(native128, "fwd_ms"), get(sparse128, "fwd_ms")), ">=", 1.3, "x"),
    ] + ([] if native256 is None else [
        Target("12", f"{NAME} {shape256}, native: forward peak memory (GiB)",
               native256.peak_bytes / 2 ** 30 if native256.peak_bytes else None, "<=", 1.0, "GiB")])


def section(rows, opts, sweep):
    """The largest square image each takes within the memory budget for a forward+backward (the
    training peak, batch 1), from the peaks measured in this run: ours is affine in the number of
    pixels N (an O(N + M) working set), the official module's quadratic (its N×M scores), so a
    line through the smallest and largest measured side, and for the official a parabola
    through three sides. An estimate: the 8 GB sizes themselves take hours on this CPU."""
    budget = opts.mem_budget_bytes
    lines = [f"\nLargest square image within {budget / 2**30:.1f} GiB for a forward+backward of {NAME} "
             f"(C = {CHANNELS}, batch 1; estimated from the measured peaks):"]
    for backend, degree in (("official (eager)", 2), ("native", 1)):
        measured = sorted((r.pixels, r.peak_bytes) for r in rows if r.name == NAME and r.backend == backend
                          and r.peak_bytes and "topk" not in r.shape and r.fwdbwd_ms is not None)
        side = largest_side(measured, budget, degree)
        if side is not None:
            points = ", ".join(f"{int(p ** 0.5)}²: {m / 2**20:.0f} MiB" for p, m in measured)
            lines.append(f"  {backend:18} about {side}x{side} (peaks {points})")
    return "\n".join(lines) if len(lines) > 1 else ""


def largest_side(measured, budget, degree):
    """The side s (a multiple of 8) at which a polynomial of ``degree`` 1 or 2 in the pixels N,
    through the smallest, (middle) and largest measured (N, peak), reaches ``budget``; None
    without enough points or when the fit does not grow."""
    if len(measured) < degree + 1:
        return None
    (n0, m0), (n2, m2) = measured[0], measured[-1]
    if degree == 1:
        slope = (m2 - m0) / (n2 - n0)
        n = (budget - m0) / slope + n0 if slope > 0 else None
    else:
        n1, m1 = measured[len(measured) // 2]
        # Newton's divided differences: peak(N) = m0 + d01 (N − n0) + d012 (N − n0)(N − n1)
        d01, d12 = (m1 - m0) / (n1 - n0), (m2 - m1) / (n2 - n1)
        d012 = (d12 - d01) / (n2 - n0)
        a, b, c = d012, d01 - d012 * (n0 + n1), m0 - d01 * n0 + d012 * n0 * n1 - budget
        n = (-b + (b * b - 4 * a * c) ** 0.5) / (2 * a) if a > 0 else None
    return None if n is None or n <= 0 else int(n ** 0.5) // 8 * 8
