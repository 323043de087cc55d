"""What a benchmark case is, and how one is measured into table rows.

A :class:`Case` is one op or model at one shape, with the :class:`Variant` s that compute it
(the official code in eager mode and under ``torch.compile``, and each backend of ours). Every
variant of a case gets the same seeded inputs. :func:`measure` turns a case into one
:class:`Row` per variant; a variant that cannot run becomes a row that says why.
"""
import dataclasses
import traceback
from typing import Callable, Optional

import torch

from . import memory, timing

EAGER, COMPILED, BACKEND = "eager", "compiled", "backend"


@dataclasses.dataclass
class Variant:
    """One way of computing a case. ``build(device, dtype)`` returns the forward callable
    ``f(*inputs)`` (a function or an nn.Module) and raises when it cannot run here."""
    backend: str
    build: Callable
    role: str = BACKEND  # EAGER / COMPILED: the baselines the speed-ups are taken against


@dataclasses.dataclass
class Options:
    device: str = "cpu"
    repeat: int = 5
    budget_s: float = 5.0       # per timing: fewer samples than `repeat` (down to 3) beyond this
    peak: Optional[bool] = None  # measure peak memory: None = where the case asks for it
    errors: bool = True
    bandwidth_gbps: Optional[float] = None  # CUDA: the roof of the roofline column
    mem_budget_bytes: int = 8 * 2**30  # the largest-image search
    verbose: bool = False       # print the traceback of every failure to stderr


@dataclasses.dataclass
class Case:
    group: str                  # "attention", "msfn", "models": the module that makes it
    name: str                   # op or model, as shown in the table
    shape: str                  # as shown in the table
    spec: dict                  # JSON-able; suite.make_case(group, spec) rebuilds the case
    pixels: int                 # H*W, the x axis of the plots
    inputs: Callable            # (device, dtype) -> list of tensors, seeded
    variants: list
    time_forward: bool = True   # no-grad forward
    time_backward: bool = True  # forward + backward (gradients of every input and parameter)
    peak_mode: Optional[str] = None  # "inference"/"train": the step whose peak memory is measured
    peak_warmup: bool = True    # run a step before the measured one (always done for compiled variants)
    truth: Optional[Callable] = None  # (device) -> float64 forward callable, for the error columns
    floor: Optional[Callable] = None  # (inputs) -> callable: the op's unavoidable work (CPU)
    moved_bytes: Optional[Callable] = None  # (inputs) -> bytes the op must read and write (GPU)

    def variant(self, backend):
        for v in self.variants:
            if v.backend == backend:
                return v
        raise KeyError(f"{self.name} {self.shape} has no variant {backend!r}")

    def step(self, variant, device, mode):
        """A closure running one no-grad forward ("inference") or forward+backward ("train")."""
        inputs = self.inputs(device, torch.float32)
        fn = variant.build(device, torch.float32)
        return make_step(fn, inputs, mode)


@dataclasses.dataclass
class Row:
    group: str
    name: str
    shape: str
    backend: str
    role: str
    pixels: int
    status: str = "ok"          # "ok", "unavailable" or "skipped" (note says why)
    note: str = ""
    fwd_ms: Optional[float] = None
    fwdbwd_ms: Optional[float] = None
    peak_bytes: Optional[float] = None
    saved_bytes: Optional[int] = None
    fwd_error: Optional[float] = None   # max |out - truth| / max |truth|, truth in float64
    grad_error: Optional[float] = None  # the same over the gradients of the inputs
    floor_ms: Optional[float] = None    # CPU: the two-GEMM floor; GPU: bytes / copy bandwidth
    floor_kind: str = ""
    speedup_eager_fwd: Optional[float] = None
    speedup_eager_fwdbwd: Optional[float] = None
    speedup_compiled_fwd: Optional[float] = None
    speedup_compiled_fwdbwd: Optional[float] = None

    @property
    def floor_ratio(self):
        """Forward time over the floor: 1.0 means the op runs as fast as its floor allows."""
        if self.fwd_ms is None or not self.floor_ms:
            return None
        return self.fwd_ms / self.floor_ms


class Skipped(Exception):
    """A variant left out of this run on purpose (the message says why and how to include it)."""


COMPILE_SKIPPED = "compiled only at the target shapes in a quick run; --full compiles every case"


def compile_for_case(fn):
    """``torch.compile(fn)`` for the case's exact shapes: a fresh compile per case, so neither a
    recompile limit nor a dynamic-shape fallback is what gets measured."""
    torch._dynamo.reset()
    return torch.compile(fn, dynamic=False)


def baselines(build, label="official", compile=True):
    """The two baseline variants of ``build`` (a Variant builder): as it is (EAGER) and under
    torch.compile (COMPILED); with ``compile=False`` the latter is a row marked skipped."""
    def build_compiled(device, dtype):
        if not compile:
            raise Skipped(COMPILE_SKIPPED)
        return compile_for_case(build(device, dtype))
    return [Variant(f"{label} (eager)", build, EAGER), Variant(f"{label} (compile)", build_compiled, COMPILED)]


def require_backend(name, device):
    """Raise, with sparse_attn's reason, when backend ``name`` cannot run on ``device`` at all
    (op-specific limits are raised by the op itself when it is called)."""
    from sparse_attn import backends

    reason = backends.why_unavailable(name, torch.device(device).type)
    if reason is not None:
        raise backends.BackendUnavailable(f"backend {name!r} cannot run here: {reason}")


def _leaves(fn, inputs):
    params = list(fn.parameters()) if isinstance(fn, torch.nn.Module) else []
    return [t for t in inputs if t.requires_grad] + [p for p in params if p.requires_grad]


def make_step(fn, inputs, mode):
    """One no-grad forward ("inference") or one forward + backward ("train") of ``fn``. The
    backward takes the gradients of every input and parameter (not accumulated into .grad) for a
    fixed random output gradient."""
    if mode == "inference":
        def step():
            with torch.no_grad():
                return fn(*inputs)
        return step
    leaves = _leaves(fn, inputs)
    with torch.no_grad():
        shape_out = fn(*inputs)
    generator = torch.Generator(device=shape_out.device).manual_seed(1)
    grad_out = torch.randn(shape_out.shape, generator=generator, device=shape_out.device,
                           dtype=shape_out.dtype)
    del shape_out

    def step():
        # allow_unused: a baseline may ignore an input that ours takes (MDTA has no branch weights)
        return torch.autograd.grad(fn(*inputs), leaves, grad_out, allow_unused=True)
    return step


def _relative_error(value, truth):
    scale = truth.abs().max().item()
    return (value.double() - truth).abs().max().item() / (scale if scale > 0 else 1.0)


def _errors(case, fn, device):
    """Forward and input-gradient errors of ``fn`` (float32) against the float64 truth."""
    inputs = case.inputs(device, torch.float32)
    inputs64 = [t.detach().double().requires_grad_(t.requires_grad) for t in inputs]
    truth = case.truth(device)
    out, out64 = fn(*inputs), truth(*inputs64)
    fwd = _relative_error(out.detach(), out64.detach())
    grad_leaves = [i for i, t in enumerate(inputs) if t.requires_grad]
    if not grad_leaves or not case.time_backward:
        return fwd, None
    grad_out = torch.randn_like(out64)
    grads = torch.autograd.grad(out, [inputs[i] for i in grad_leaves], grad_out.float(), allow_unused=True)
    grads64 = torch.autograd.grad(out64, [inputs64[i] for i in grad_leaves], grad_out, allow_unused=True)
    pairs = [(g, g64) for g, g64 in zip(grads, grads64) if g is not None and g64 is not None]
    return fwd, max((_relative_error(g, g64) for g, g64 in pairs), default=None)


def _reason(exc):
    """One line saying why a variant could not run."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:160]


def measure_variant(case, variant, opts):
    """One row: times, memory and errors of one variant; 'unavailable' with the reason when
    it cannot be built or run. Each figure that fails on its own is left empty with a note."""
    row = Row(case.group, case.name, case.shape, variant.backend, variant.role, case.pixels)
    device = torch.device(opts.device)
    try:
        inputs = case.inputs(device, torch.float32)
        fn = variant.build(device, torch.float32)
        if case.time_forward or case.time_backward:
            with torch.no_grad():
                fn(*inputs)  # fails fast (and compiles) before anything is timed
    except Skipped as exc:
        row.status, row.note = "skipped", str(exc)
        return row
    except Exception as exc:
        row.status, row.note = "unavailable", _reason(exc)
        if opts.verbose:
            traceback.print_exc()
        return row
    notes = []

    def attempt(what, action):
        try:
            action()
        except Exception as exc:
            notes.append(f"{what}: {_reason(exc)}")
            if opts.verbose:
                traceback.print_exc()

    if case.time_forward:
        attempt("fwd", lambda: setattr(row, "fwd_ms", timing.median_ms(
            make_step(fn, inputs, "inference"), device, opts.repeat, opts.budget_s)))
    if case.time_backward:
        attempt("fwd+bwd", lambda: setattr(row, "fwdbwd_ms", timing.median_ms(
            make_step(fn, inputs, "train"), device, opts.repeat, opts.budget_s)))
        attempt("saved", lambda: setattr(row, "saved_bytes", memory.saved_bytes(lambda: fn(*inputs))[0]))
    # A quick run measures peaks only where a case asks, and not for compiled baselines (a fresh
    # process would compile again).
    want_peak = opts.peak if opts.peak is not None else (case.peak_mode is not None and variant.role != COMPILED)
    if want_peak:
        mode = case.peak_mode or ("train" if not case.time_forward else "inference")
        warmup = case.peak_warmup or variant.role == COMPILED
        attempt("peak", lambda: setattr(row, "peak_bytes", memory.peak_bytes(
            case, variant.backend, mode, device, warmup=warmup)))
    if opts.errors and case.truth is not None and variant.role != COMPILED:
        def errors():
            row.fwd_error, row.grad_error = _errors(case, fn, device)
        attempt("error", errors)
    if case.floor is not None and case.time_forward and device.type == "cpu":
        attempt("floor", lambda: setattr(row, "floor_ms", timing.median_ms(
            case.floor(inputs), device, opts.repeat, opts.budget_s)))
        row.floor_kind = "two-GEMM floor (q·kᵀ and P·v as torch.matmul)"
    if case.moved_bytes is not None and device.type == "cuda":
        def roofline():
            row.floor_ms = case.moved_bytes(inputs) / (opts.bandwidth_gbps * 1e9) * 1e3
        attempt("roofline", roofline)
        row.floor_kind = "roofline: bytes read+written at the copy bandwidth"
    row.note = "; ".join(notes)
    if not (case.time_forward or case.time_backward) and row.peak_bytes is None:
        row.status = "unavailable"  # a peak-only case: its one figure could not be measured
    return row


def add_speedups(rows):
    """Fill each row's speed-ups against the eager and compiled baselines of its case."""
    cases = {}
    for row in rows:
        cases.setdefault((row.group, row.name, row.shape), []).append(row)
    for case_rows in cases.values():
        for role, prefix in ((EAGER, "speedup_eager"), (COMPILED, "speedup_compiled")):
            base = next((r for r in case_rows if r.role == role and r.status == "ok"), None)
            if base is None:
                continue
            for row in case_rows:
                for kind in ("fwd", "fwdbwd"):
                    setattr(row, f"{prefix}_{kind}", speedup(getattr(base, f"{kind}_ms"), getattr(row, f"{kind}_ms")))
    return rows


def speedup(baseline_ms, ms):
    """How many times faster ``ms`` is than ``baseline_ms`` (None when either is missing)."""
    if baseline_ms is None or ms is None or ms <= 0:
        return None
    return baseline_ms / ms


def measure(case, opts):
    """Every variant of ``case``, one row each."""
    return [measure_variant(case, v, opts) for v in case.variants]
