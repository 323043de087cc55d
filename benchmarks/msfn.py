"""MSFN cases: DRSformer's mixed-scale feed-forward network, its depthwise core and the module.

The official ``FeedForward`` and its depthwise core (``official.py``, bias-free as the network
uses them) are the baselines; ours are ``sparse_attn.mixed_scale_dwconv`` (the core) and
``sparse_attn.nn.MixedScaleFFN`` (the module, loaded with the baseline's weights) on every
backend. Level l = 1..4: dim 48·2^(l-1) at H/2^(l-1) × W/2^(l-1); hidden h = int(2.66·dim).
"""
import torch

import sparse_attn
from sparse_attn.backends import BACKENDS

from .case import Case, Variant, baselines, require_backend
from .official import FeedForward, msfn_depthwise
from .report import Target, find_row, ratio

GROUP = "msfn"
PARTS = {"core": "MSFN core", "module": "MixedScaleFFN"}
EXPANSION = 2.66
BASE_DIM = 48


def level_spec(part, level, side, compile=True, peak=False, errors=True):
    scale = 2 ** (level - 1)
    return {"part": part, "batch": 1, "dim": BASE_DIM * scale, "height": side // scale, "width": side // scale,
            "compile": compile, "peak": peak, "errors": errors}


def default_specs(sweep):
    """quick: the four levels of a 128² image, and level 1 of 256² (issue 4's target, with its
    peak memory); torch.compile and the float64 error (grouped convolutions in float64 take
    PyTorch's slow path on CPU) only at the target shape. targets: the target shape alone.
    full: the four levels of 128², 256² and 512² images, everything measured."""
    target = [level_spec(part, 1, 256, peak=True) for part in PARTS]
    if sweep == "targets":
        return target
    full = sweep == "full"
    sides = (128, 256, 512) if full else (128,)
    specs = [level_spec(part, level, side, compile=full, errors=full) for side in sides for level in range(1, 5)
             for part in PARTS]
    return specs if full else specs + target


def _baseline_module(dim, device, dtype):
    torch.manual_seed(0)
    return FeedForward(dim, EXPANSION, bias=False).to(device=device, dtype=dtype)


def _our_core(backend, device):
    require_backend(backend, device)
    return lambda x, w3, w5, w3_1, w5_1: sparse_attn.mixed_scale_dwconv(x, w3, w5, w3_1, w5_1, backend=backend)


def _our_module(dim, backend, device, dtype):
    require_backend(backend, device)
    module = sparse_attn.nn.MixedScaleFFN(dim, EXPANSION, False, backend=backend).to(device=device, dtype=dtype)
    module.load_state_dict(_baseline_module(dim, device, dtype).state_dict())
    return module


def make_case(spec):
    part, b, dim, height, width = spec["part"], spec["batch"], spec["dim"], spec["height"], spec["width"]
    hidden = int(dim * EXPANSION)

    def seeded(device, dtype, *shapes):
        generator = torch.Generator().manual_seed(0)
        return [(torch.randn(*shape, generator=generator, dtype=torch.float64) * scale)
                .to(device=device, dtype=dtype).requires_grad_() for shape, scale in shapes]

    if part == "core":
        def inputs(device, dtype):
            # Weights at the scale of PyTorch's default init, so activations stay O(1).
            return seeded(device, dtype, ((b, 2 * hidden, height, width), 1.0), ((2 * hidden, 1, 3, 3), 1 / 3),
                          ((2 * hidden, 1, 5, 5), 1 / 5), ((hidden, 2, 3, 3), 1 / 18 ** 0.5),
                          ((hidden, 2, 5, 5), 1 / 50 ** 0.5))
        variants = baselines(lambda device, dtype: msfn_depthwise, compile=spec["compile"])
        variants += [Variant(name, lambda device, dtype, name=name: _our_core(name, device)) for name in BACKENDS]
        truth = lambda device: msfn_depthwise  # noqa: E731  (run in float64)
        shape = f"B{b} C{2 * hidden} {height}x{width}"
    else:
        def inputs(device, dtype):
            return seeded(device, dtype, ((b, dim, height, width), 1.0))
        variants = baselines(lambda device, dtype: _baseline_module(dim, device, dtype), compile=spec["compile"])
        variants += [Variant(name, lambda device, dtype, name=name: _our_module(dim, name, device, dtype))
                     for name in BACKENDS]
        truth = lambda device: _baseline_module(dim, device, torch.float64)  # noqa: E731
        shape = f"B{b} dim{dim} {height}x{width}"
    return Case(group=GROUP, name=PARTS[part], shape=shape, spec=spec, pixels=height * width, inputs=inputs,
                variants=variants, truth=truth if spec["errors"] else None,
                peak_mode="inference" if spec["peak"] else None)


def targets(rows):
    """Issue 4's targets: CPU, native, fp32, level 1 (2h = 254) at 256×256."""
    core_shape = make_case(level_spec("core", 1, 256)).shape
    module_shape = make_case(level_spec("module", 1, 256)).shape
    core = find_row(rows, PARTS["core"], core_shape, "native")
    module = find_row(rows, PARTS["module"], module_shape, "native")
    official = find_row(rows, PARTS["module"], module_shape, "official (eager)")
    get = lambda row, field: getattr(row, field, None)  # noqa: E731
    return [
        Target("4", f"{PARTS['core']} {core_shape}, native: fwd vs official eager", get(core, "speedup_eager_fwd"),
               ">=", 2.0),
        Target("4", f"{PARTS['core']} {core_shape}, native: fwd vs official compiled",
               get(core, "speedup_compiled_fwd"), ">=", 1.0),
        Target("4", f"{PARTS['module']} {module_shape}, native: saved bytes / official FeedForward's",
               ratio(get(module, "saved_bytes"), get(official, "saved_bytes")), "<=", 0.35, "%"),
        Target("4", f"{PARTS['module']} {module_shape}, native: no-grad peak memory / official's",
               ratio(get(module, "peak_bytes"), get(official, "peak_bytes")), "<=", 0.60, "%"),
        Target("4", f"{PARTS['core']} {core_shape}, native: forward error vs float64", get(core, "fwd_error"),
               "<=", 1e-5, "e"),
    ]
