"""Model cases: DRSformer, Restormer, the sparse gated deblurring transformer (DSGformer) and
Magic-ELF's ALformer.

Each network (default configuration, seeded weights) runs a training step (forward and the
gradients of every parameter) and a no-grad inference on every backend through
``sparse_attn.use_backend``; the ``reference`` backend in eager mode and under
``torch.compile`` are the baselines. The section after the table gives the largest square
image each backend restores within ``--mem-budget``.
"""
import torch
from torch import nn

import sparse_attn
import sparse_attn.models
from sparse_attn.backends import BACKENDS

from . import breakdown
from .case import COMPILED, EAGER, Case, Skipped, Variant, compile_for_case, make_step, require_backend
from .memory import largest_square
from .report import Target, find_row, ratio

GROUP = "models"
MODELS = ("DRSformer", "Restormer", "DSGformer", "ALformer")
OURS = tuple(b for b in BACKENDS if b != "reference")  # the reference backend is the baseline
MODES = {"train": "train step", "inference": "inference"}


class OnBackend(nn.Module):
    """Runs ``model`` with every op on ``backend`` (sparse_attn.use_backend around the call).
    A network with several outputs (ALformer) is run through its ``restore``: the restored image
    alone, whose gradient reaches every parameter."""

    def __init__(self, model, backend):
        super().__init__()
        self.model, self.backend = model, backend

    def forward(self, x):
        with sparse_attn.use_backend(self.backend):
            return getattr(self.model, "restore", self.model)(x)


def spec(model, mode, side, compile=True, peak=False, timed=True):
    return {"model": model, "mode": mode, "batch": 1, "side": side, "compile": compile, "peak": peak,
            "timed": timed}


def default_specs(sweep):
    """The full networks are slow on a small CPU (DRSformer's training step takes about a minute at
    64² on 2 busy cores, several at 128²), so:
    quick: DRSformer's, DSGformer's and ALformer's training steps at 64², every model's
        inference at 128², not compiled; their inference peak memory at 128², and DRSformer's at 64² (the
        largest-image estimate is drawn through DRSformer's two);
    targets: issue 5's shapes: DRSformer's training step at 128², its inference peak memory at
        256² and 512²; issue 15's: Restormer's and DSGformer's training steps at 128², Restormer's
        inference at 512² (time and peak memory); issue 14's: ALformer's
        training step at 128², its inference at 256² and 512² (time and peak memory);
    full: training steps at 128² and 256², inference at 256² and 512², everything compiled and
        every peak measured, and the largest-image bisection."""
    if sweep == "full":
        return [spec(m, mode, side) for m in MODELS for mode, sides in (("train", (128, 256)),
                                                                       ("inference", (256, 512)))
                for side in sides]
    if sweep == "targets":
        return [spec("DRSformer", "train", 128, compile=False), spec("Restormer", "train", 128, compile=False),
                spec("DSGformer", "train", 128, compile=False),
                spec("Restormer", "inference", 512, compile=False, peak=True),
                *(spec("DRSformer", "inference", side, compile=False, peak=True, timed=False) for side in (256, 512)),
                spec("ALformer", "train", 128, compile=False, peak=True),
                *(spec("ALformer", "inference", side, compile=False, peak=True) for side in (256, 512))]
    specs = [spec(m, "train", 64, compile=False) for m in ("DRSformer", "DSGformer", "ALformer")]
    specs += [spec(m, "inference", 128, compile=False, peak=m in ("DRSformer", "DSGformer")) for m in MODELS]
    return specs + [spec("DRSformer", "inference", 64, compile=False, peak=True, timed=False)]


def _network(name, mode, device, dtype):
    cls = getattr(sparse_attn.models, name)
    torch.manual_seed(0)
    model = cls().to(device=device, dtype=dtype)
    return model.train() if mode == "train" else model.eval()


def _ours(name, mode, backend, device, dtype):
    require_backend(backend, device)
    return OnBackend(_network(name, mode, device, dtype), backend)


def make_case(spec):
    name, mode, b, side = spec["model"], spec["mode"], spec["batch"], spec["side"]

    def inputs(device, dtype):
        generator = torch.Generator().manual_seed(0)
        return [torch.rand(b, 3, side, side, generator=generator).to(device=device, dtype=dtype)]

    def reference(device, dtype):
        return OnBackend(_network(name, mode, device, dtype), "reference")

    def reference_compiled(device, dtype):
        if not spec["compile"]:
            raise Skipped("networks are compiled only with --full (minutes per network on CPU)")
        model = _network(name, mode, device, dtype)
        return OnBackend(compile_for_case(model), "reference")

    # The network is compiled, not the use_backend wrapper: the backend is a global the
    # compiled graph guards on.
    variants = [Variant("reference (eager)", reference, EAGER),
                Variant("reference (compile)", reference_compiled, COMPILED)]
    variants += [Variant(backend, lambda device, dtype, backend=backend: _ours(name, mode, backend, device, dtype))
                 for backend in OURS]
    train, timed = mode == "train", spec["timed"]
    return Case(group=GROUP, name=f"{name} {MODES[mode]}", shape=f"B{b} 3x{side}x{side}", spec=spec,
                pixels=side * side, inputs=inputs, variants=variants, time_forward=timed and not train,
                time_backward=timed and train, peak_mode=("train" if train else "inference") if spec["peak"] else None,
                peak_warmup=False)


def targets(rows):
    """Issue 5's targets (DRSformer), issue 15's (Restormer, DRSformer, DSGformer) and issue 14's
    (ALformer's training step): CPU, fp32, default configurations, batch 1."""
    train_shape, infer_shape = "B1 3x128x128", "B1 3x512x512"  # measured by --targets and --full
    native = find_row(rows, "DRSformer train step", train_shape, "native")
    reference = find_row(rows, "DRSformer train step", train_shape, "reference (eager)")
    native_512 = find_row(rows, "DRSformer inference", infer_shape, "native")
    reference_512 = find_row(rows, "DRSformer inference", infer_shape, "reference (eager)")
    restormer = find_row(rows, "Restormer train step", train_shape, "native")
    restormer_reference = find_row(rows, "Restormer train step", train_shape, "reference (eager)")
    restormer_512 = find_row(rows, "Restormer inference", infer_shape, "native")
    restormer_reference_512 = find_row(rows, "Restormer inference", infer_shape, "reference (eager)")
    deblur = find_row(rows, "DSGformer train step", train_shape, "native")
    elf = find_row(rows, "ALformer train step", train_shape, "native")
    elf_reference = find_row(rows, "ALformer train step", train_shape, "reference (eager)")
    get = lambda row, field: getattr(row, field, None)  # noqa: E731
    return [
        Target("5", f"DRSformer train step {train_shape}: native vs reference", get(native, "speedup_eager_fwdbwd"),
               ">=", 1.5),
        Target("5", f"DRSformer train step {train_shape}: native saved bytes / reference's",
               ratio(get(native, "saved_bytes"), get(reference, "saved_bytes")), "<=", 0.50, "%"),
        Target("5", f"DRSformer inference {infer_shape}: native peak memory / reference's",
               ratio(get(native_512, "peak_bytes"), get(reference_512, "peak_bytes")), "<=", 0.60, "%"),
        Target("15", f"Restormer train step {train_shape}: native vs reference", get(restormer, "speedup_eager_fwdbwd"),
               ">=", 1.5),
        Target("15", f"Restormer train step {train_shape}: native saved bytes / reference's",
               ratio(get(restormer, "saved_bytes"), get(restormer_reference, "saved_bytes")), "<=", 0.50, "%"),
        Target("15", f"Restormer inference {infer_shape}: native vs reference", get(restormer_512, "speedup_eager_fwd"),
               ">=", 1.5),
        Target("15", f"Restormer inference {infer_shape}: native peak memory / reference's",
               ratio(get(restormer_512, "peak_bytes"), get(restormer_reference_512, "peak_bytes")), "<=", 0.50, "%"),
        Target("15", f"DRSformer train step {train_shape}: native vs reference", get(native, "speedup_eager_fwdbwd"),
               ">=", 2.2),
        Target("15", f"DRSformer train step {train_shape}: native saved bytes / reference's",
               ratio(get(native, "saved_bytes"), get(reference, "saved_bytes")), "<=", 0.30, "%"),
        Target("15", f"DSGformer train step {train_shape}: native vs reference", get(deblur, "speedup_eager_fwdbwd"),
               ">=", 1.4),
        Target("14", f"ALformer train step {train_shape}: native vs reference", get(elf, "speedup_eager_fwdbwd"),
               ">=", 1.3),
        Target("14", f"ALformer train step {train_shape}: native saved bytes / reference's",
               ratio(get(elf, "saved_bytes"), get(elf_reference, "saved_bytes")), "<=", 0.70, "%"),
    ]


def section(rows, opts, sweep):
    """Where each network's training step spends its time (per module class, native against
    reference), then the largest square image each backend restores."""
    return "\n".join([profile_section(rows, opts), largest_image_section(rows, opts, sweep)])


def profile_section(rows, opts):
    """A per-module time breakdown (benchmarks/breakdown.py) of one training step of each network
    at the smallest side its training step was measured at in this run, native against reference."""
    parts = []
    for name in MODELS:
        sides = sorted(int(r.pixels ** 0.5) for r in rows
                       if r.name == f"{name} {MODES['train']}" and r.backend == "native" and r.status == "ok")
        if not sides:
            continue
        x = torch.rand(1, 3, sides[0], sides[0], generator=torch.Generator().manual_seed(0)).to(opts.device)
        tables = {}
        for backend in ("native", "reference"):
            model = _network(name, "train", opts.device, torch.float32)
            step = make_step(OnBackend(model, backend), [x], "train")
            tables[backend] = breakdown.module_breakdown(model, step)
        parts.append(breakdown.render(f"\n{name} training step, B1 3x{sides[0]}x{sides[0]}: self CPU time per module "
                                      f"class, native (reference for comparison)", tables["native"],
                                      tables["reference"]))
    return "\n".join(parts) if parts else "\n(no training step was measured on native: no profile table)"


def largest_image_section(rows, opts, sweep):
    """The largest square image each backend restores (no-grad, batch 1) within the budget:
    bisection over fresh processes with --full; other sweeps extrapolate from the measured peaks
    (peak memory is affine in the number of pixels for these networks)."""
    budget = opts.mem_budget_bytes
    lines = [f"\nLargest square image restored without tiling within {budget / 2**30:.1f} GiB (no-grad, batch 1):"]
    for name in MODELS:
        for backend in ("reference (eager)",) + OURS:
            measured = sorted((r.pixels, r.peak_bytes) for r in rows
                              if r.name == f"{name} inference" and r.backend == backend and r.peak_bytes)
            if sweep == "full":
                found = _bisect(name, backend, opts)
            elif len(measured) >= 2:
                found = _extrapolate(measured, budget)
            else:
                continue
            lines.append(f"  {name:10} {backend:18} {found}")
    if len(lines) == 1:
        lines.append("  (needs DRSformer's inference peak memory at two sizes: not in this sweep)")
    return "\n".join(lines)


def _bisect(name, backend, opts):
    try:
        side, peak = largest_square(lambda s: make_case(spec(name, "inference", s, compile=False)), backend,
                                    opts.device, opts.mem_budget_bytes)
    except Exception as exc:  # a backend that cannot run is reported, not raised
        return f"unavailable: {type(exc).__name__}: {str(exc).splitlines()[0][:100]}"
    if side is None:
        return "not even 64x64"
    return f"{side}x{side} (peak {peak / 2**30:.2f} GiB, measured)"


def _extrapolate(measured, budget):
    (p0, m0), (p1, m1) = measured[0], measured[-1]
    per_pixel = (m1 - m0) / (p1 - p0)
    if per_pixel <= 0:
        return "cannot extrapolate (peak does not grow with size)"
    side = int(((budget - m0) / per_pixel + p0) ** 0.5) // 8 * 8
    return f"about {side}x{side} (estimated from the peaks at {int(p0 ** 0.5)}² and {int(p1 ** 0.5)}²; --full measures)"
