"""Attention cases: DRSformer's top-k channel attention and Restormer's dense MDTA.

Each is timed as the official formula (eager and ``torch.compile``) and as
``sparse_attn.sparse_channel_attention`` on every backend, at the DRSformer level shapes
(level l = 1..4: 48·2^(l-1) channels in 2^(l-1) heads of d = 48, at H/2^(l-1) × W/2^(l-1)).
"""
import torch

import sparse_attn
from sparse_attn.backends import BACKENDS
from sparse_attn.nn import drsformer_topk

from .case import Case, Variant, baselines, require_backend
from .official import drsformer_attention, restormer_attention
from .report import Target, find_row, ratio

GROUP = "attention"
OPS = {"topk": "top-k attention", "dense": "dense attention (MDTA)"}
HEAD_DIM = 48


def level_spec(op, level, side, compile=True):
    """The attention of DRSformer level ``level`` (1-4) of a side × side image."""
    scale = 2 ** (level - 1)
    return {"op": op, "batch": 1, "heads": scale, "d": HEAD_DIM, "height": side // scale,
            "width": side // scale, "compile": compile}


def default_specs(sweep):
    """quick: the four levels of a 128² image and the issue-2 target shape (level 1 of 256²),
    torch.compile only at the target shape; targets: the target shape alone; full: the four
    levels of 128², 256² and 512² images."""
    target = [level_spec(op, 1, 256) for op in OPS]
    if sweep == "targets":
        return target
    full = sweep == "full"
    sides = (128, 256, 512) if full else (128,)
    specs = [level_spec(op, level, side, compile=full) for side in sides for level in range(1, 5) for op in OPS]
    return specs if full else specs + target


def _official(op, topk):
    if op == "topk":
        return lambda q, k, v, temperature, weights: drsformer_attention(q, k, v, temperature, weights, topk)
    return lambda q, k, v, temperature, weights: restormer_attention(q, k, v, temperature)


def _ours(topk, backend, device):
    require_backend(backend, device)

    def attention(q, k, v, temperature, weights):
        return sparse_attn.sparse_channel_attention(q, k, v, temperature, weights, topk, "softmax",
                                                    backend=backend)
    return attention


def make_case(spec):
    op, b, heads, d = spec["op"], spec["batch"], spec["heads"], spec["d"]
    n = spec["height"] * spec["width"]
    topk = drsformer_topk(d) if op == "topk" else (d,)
    branches = len(topk)

    def inputs(device, dtype):
        generator = torch.Generator().manual_seed(0)

        def tensor(*shape, scale=1.0, offset=0.0):
            t = torch.randn(*shape, generator=generator, dtype=torch.float64) * scale + offset
            return t.to(device=device, dtype=dtype).requires_grad_()
        # MDTA's one branch has weight 1 (the official formula has no weights); DRSformer's
        # attn1..attn4 start at 0.2.
        weights = tensor(branches, scale=0.05, offset=0.2) if op == "topk" else tensor(1, scale=0.0, offset=1.0)
        return [tensor(b, heads, d, n), tensor(b, heads, d, n), tensor(b, heads, d, n),
                tensor(heads, 1, 1, scale=0.1, offset=1.0), weights]

    def floor(tensors):
        q, k, v = (t.detach() for t in tensors[:3])
        p = torch.randn(b, heads, d, d, dtype=q.dtype, device=q.device)
        kt = k.transpose(-2, -1)
        return lambda: (torch.matmul(q, kt), torch.matmul(p, v))

    def moved_bytes(tensors):
        q = tensors[0]
        return 4 * q.numel() * q.element_size()  # read q, k, v; write out

    official = _official(op, topk)
    variants = baselines(lambda device, dtype: official, compile=spec["compile"])
    variants += [Variant(name, lambda device, dtype, name=name: _ours(topk, name, device)) for name in BACKENDS]
    return Case(
        group=GROUP, name=OPS[op], shape=f"B{b} heads{heads} d{d} {spec['height']}x{spec['width']}",
        spec=spec, pixels=n, inputs=inputs, variants=variants,
        truth=lambda device: _ours(topk, "reference", device), floor=floor, moved_bytes=moved_bytes,
        peak_mode=None)


def targets(rows):
    """Issue 2's targets: CPU, native, fp32, B=1, heads=1, d=48, N=256×256."""
    shape = make_case(level_spec("topk", 1, 256)).shape
    native = find_row(rows, OPS["topk"], shape, "native")
    official = find_row(rows, OPS["topk"], shape, "official (eager)")
    where = f"{OPS['topk']} {shape}, native"
    get = lambda field: getattr(native, field, None)  # noqa: E731
    floor_ok = native is not None and native.floor_kind.startswith("two-GEMM")
    return [
        Target("2", f"{where}: fwd vs official eager", get("speedup_eager_fwd"), ">=", 5.0, "x"),
        Target("2", f"{where}: fwd vs official compiled", get("speedup_compiled_fwd"), ">=", 1.5, "x"),
        Target("2", f"{where}: fwd / two-GEMM floor (CPU)", get("floor_ratio") if floor_ok else None, "<=", 1.5, "x"),
        Target("2", f"{where}: fwd+bwd vs official eager", get("speedup_eager_fwdbwd"), ">=", 3.0, "x"),
        Target("2", f"{where}: fwd+bwd vs official compiled", get("speedup_compiled_fwdbwd"), ">=", 2.5, "x"),
        Target("2", f"{where}: saved bytes / official's", ratio(get("saved_bytes"), getattr(official, "saved_bytes", None)),
               "<=", 0.30, "%"),
        Target("2", f"{where}: forward error vs float64", get("fwd_error"), "<=", 1e-5, "e"),
        Target("2", f"{where}: gradient error vs float64", get("grad_error"), "<=", 1e-4, "e"),
    ]
