"""Report: the terminal table, the Targets section, CSV rows and PNG plots."""
import csv
import dataclasses
import datetime
import io
import os
import platform
import subprocess

import torch

from .case import Row

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
COLUMNS = ("op / model", "shape", "backend", "fwd ms", "fwd+bwd ms", "peak MB", "saved MB",
           "vs eager fwd|f+b", "vs compiled fwd|f+b", "fwd/floor", "err fwd|grad", "note")


# ---------------------------------------------------------------------------------------------
# Targets: measured figures against the issues' goals (reports, not assertions)
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Target:
    issue: str
    what: str
    value: object        # the measured figure, None when it was not measured
    op: str              # ">=" or "<="
    threshold: float
    unit: str = "x"      # "x" a ratio, "%" a fraction shown as a percentage, "e" an error, "GiB" memory

    @property
    def verdict(self):
        if self.value is None:
            return "N/A"
        ok = self.value >= self.threshold if self.op == ">=" else self.value <= self.threshold
        return "PASS" if ok else "FAIL"

    def line(self):
        """The target named by what it measures (the issue that set it stays in ``issue``)."""
        shown = "not measured" if self.value is None else f"measured {_format_value(self.value, self.unit)}"
        return f"{self.verdict:4}  {self.what} {self.op} {_format_value(self.threshold, self.unit)} — {shown}"


def _format_value(value, unit):
    if unit == "%":
        return f"{100 * value:.0f}%"
    if unit == "e":
        return f"{value:.1e}"
    if unit == "GiB":
        return f"{value:.2f} GiB"
    return f"{value:.2f}x"


def find_row(rows, name, shape, backend):
    """The measured row of (name, shape, backend), or None."""
    return next((r for r in rows if r.name == name and r.shape == shape and r.backend == backend
                 and r.status == "ok"), None)


def ratio(numerator, denominator):
    if numerator is None or not denominator:
        return None
    return numerator / denominator


# ---------------------------------------------------------------------------------------------
# Table
# ---------------------------------------------------------------------------------------------
def _ms(value):
    return "—" if value is None else (f"{value:.3f}" if value < 10 else f"{value:.1f}")


def _mb(value):
    if value is None:
        return "—"
    return ">budget" if value == float("inf") else f"{value / 2**20:.1f}"


def _pair(a, b, fmt):
    return f"{fmt(a)}|{fmt(b)}"


def _speed(value):
    return "—" if value is None else f"{value:.2f}x"


def _err(value):
    return "—" if value is None else f"{value:.0e}"


def cells(row):
    """The table's cells for one row (MB = 2**20 bytes)."""
    floor = row.floor_ratio
    return (row.name, row.shape, row.backend, _ms(row.fwd_ms), _ms(row.fwdbwd_ms), _mb(row.peak_bytes),
            _mb(row.saved_bytes),
            _pair(row.speedup_eager_fwd, row.speedup_eager_fwdbwd, _speed),
            _pair(row.speedup_compiled_fwd, row.speedup_compiled_fwdbwd, _speed),
            "—" if floor is None else f"{floor:.2f}",
            _pair(row.fwd_error, row.grad_error, _err),
            _clip(row.note if row.status == "ok" else f"{row.status}: {row.note}"))


def _clip(text, width=90):
    """Notes are clipped in the table; the CSV keeps them whole."""
    return text if len(text) <= width else text[:width - 1] + "…"


def render_table(rows, title):
    """The table as text: with rich where it is installed, plain columns otherwise."""
    body = [cells(r) for r in rows]
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        return _plain_table(title, body)
    table = Table(title=title, show_lines=False)
    for i, name in enumerate(COLUMNS):
        table.add_column(name, justify="right" if 3 <= i <= 10 else "left",
                         overflow="fold", max_width=60 if name == "note" else None)
    for line in body:
        table.add_row(*line)
    console = Console(file=io.StringIO(), width=250, color_system=None)
    console.print(table)
    return console.file.getvalue()


# ---------------------------------------------------------------------------------------------
# Summary: one line per case, what a person reads at a glance (the full table: --wide, the CSV)
# ---------------------------------------------------------------------------------------------
SUMMARY_COLUMNS = ("case", "ours", "ours ms fwd / f+b", "official ms fwd / f+b", "speed-up fwd / f+b",
                   "memory ours / official")


def summary_cells(case_rows):
    """The summary's cells for the rows of one case: our fastest backend against the official
    code in eager mode (memory: peak where both have it, else bytes saved for backward)."""
    official = next((r for r in case_rows if r.role == "eager" and r.status == "ok"), None)
    ours = [r for r in case_rows if r.role == "backend" and r.status == "ok"]
    first = case_rows[0]
    if not ours:
        reasons = sorted({r.status for r in case_rows if r.role == "backend"})
        return (f"{first.name} {first.shape}", "—", ", ".join(reasons) or "—", "", "", "")
    best = min(ours, key=lambda r: (r.fwdbwd_ms is None, r.fwdbwd_ms or r.fwd_ms or float("inf")))
    memory = "—"
    if official is not None:
        for field, label in (("peak_bytes", "peak"), ("saved_bytes", "saved")):
            a, b = getattr(best, field), getattr(official, field)
            if a not in (None, float("inf")) and b not in (None, float("inf")):
                memory = f"{_mb(a)} / {_mb(b)} MB {label}"
                break

    def pair(a, b, fmt):
        return "—" if a is None and b is None else f"{fmt(a)} / {fmt(b)}"
    return (f"{first.name} {first.shape}", best.backend, pair(best.fwd_ms, best.fwdbwd_ms, _ms),
            pair(*(None, None) if official is None else (official.fwd_ms, official.fwdbwd_ms), _ms),
            pair(best.speedup_eager_fwd, best.speedup_eager_fwdbwd, _speed), memory)


def render_summary(rows, title):
    """Per group, one line per case (see :func:`summary_cells`), about 110 columns wide."""
    from rich.console import Console
    from rich.table import Table
    console = Console(file=io.StringIO(), width=130, color_system=None)
    console.print(title)
    for group in dict.fromkeys(r.group for r in rows):
        cases = {}
        for row in rows:
            if row.group == group:
                cases.setdefault((row.name, row.shape), []).append(row)
        table = Table(title=group, title_justify="left", show_lines=False)
        for i, name in enumerate(SUMMARY_COLUMNS):
            table.add_column(name, justify="right" if i >= 2 else "left", overflow="fold")
        for case_rows in cases.values():
            table.add_row(*summary_cells(case_rows))
        console.print(table)
    console.print("ours: the fastest backend of the case; official: the official code in eager mode; speed-up: "
                  "official time / ours. Every backend and column: --wide, and the CSV rows.")
    return console.file.getvalue()


def _plain_table(title, body):
    widths = [max(len(COLUMNS[i]), *(len(line[i]) for line in body)) if body else len(COLUMNS[i])
              for i in range(len(COLUMNS) - 1)]

    def fmt(line):
        parts = [line[i].ljust(widths[i]) if i < 3 else line[i].rjust(widths[i]) for i in range(len(widths))]
        return "  ".join(parts) + ("  " + line[-1] if line[-1] else "")
    rule = "-" * (sum(widths) + 2 * len(widths) + len(COLUMNS[-1]))
    return "\n".join([title, rule, fmt(COLUMNS), rule, *(fmt(line) for line in body), rule])


LEGEND = """\
fwd: no-grad forward; fwd+bwd: forward and the gradients of every input and parameter. Medians after warm-up.
peak MB: peak memory of one step beyond what was allocated before it (CPU: the peak RSS of a fresh process;
  CUDA: max_memory_allocated); measured where a target needs it, everywhere with --full.
saved MB: bytes autograd keeps for backward, each storage once (saved_tensors_hooks).
vs eager / vs compiled: times faster than the official code of the same case in eager mode / under torch.compile.
fwd/floor (attention): CPU: forward time over the time of q·kᵀ and P·v alone as torch.matmul (the two-GEMM floor);
  CUDA: over the roofline time (read q, k, v and write out at the measured copy bandwidth).
err: max |out - truth| / max |truth| against the float64 reference, forward | input gradients."""


# ---------------------------------------------------------------------------------------------
# Environment, CSV and plots
# ---------------------------------------------------------------------------------------------
def environment(device):
    """What a result row needs to be compared later: device, versions, commit, date."""
    try:
        import triton
        triton_version = triton.__version__
    except Exception:
        triton_version = "none"
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=os.path.dirname(RESULTS_DIR), timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    if torch.device(device).type == "cuda":
        device_name = torch.cuda.get_device_name(torch.device(device))
    else:
        device_name = f"{platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "commit": commit, "device": device_name, "torch": torch.__version__, "triton": triton_version}


ROW_FIELDS = [f.name for f in dataclasses.fields(Row)] + ["floor_ratio"]


def append_csv(rows, env, directory=RESULTS_DIR):
    """Append the rows to ``directory/<group>.csv`` (header written once). Returns the paths."""
    os.makedirs(directory, exist_ok=True)
    paths = []
    for group in dict.fromkeys(r.group for r in rows):
        path = os.path.join(directory, f"{group}.csv")
        new = not os.path.exists(path)
        with open(path, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(env) + ROW_FIELDS)
            if new:
                writer.writeheader()
            for row in rows:
                if row.group == group:
                    writer.writerow({**env, **{name: getattr(row, name) for name in ROW_FIELDS}})
        paths.append(path)
    return paths


def plot(rows, env, device_type, directory=RESULTS_DIR):
    """One PNG per group that has a measured row: speed-up against the eager official code, and
    memory, against the image size, one line per (op, backend). Returns the paths (none without
    matplotlib)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    os.makedirs(directory, exist_ok=True)
    paths = []
    for group in dict.fromkeys(r.group for r in rows if r.status == "ok"):  # nothing measured, no plot
        figure, (speed_axis, memory_axis) = plt.subplots(1, 2, figsize=(13, 5))
        lines = {}
        for row in rows:
            if row.group == group and row.status == "ok":
                lines.setdefault((row.name, row.backend), []).append(row)
        for (name, backend), series in lines.items():
            series.sort(key=lambda r: r.pixels)
            _line(speed_axis, series, lambda r: r.speedup_eager_fwdbwd or r.speedup_eager_fwd, f"{name}: {backend}")
            # One kind of memory per line: the peak where the whole series has one, else saved bytes.
            if all(r.peak_bytes not in (None, float("inf")) for r in series):
                _line(memory_axis, series, lambda r: r.peak_bytes, f"{name}: {backend} (peak)", scale=2**-20)
            else:
                _line(memory_axis, series, lambda r: r.saved_bytes, f"{name}: {backend} (saved)", scale=2**-20)
        speed_axis.set(xscale="log", xlabel="pixels (H·W)", ylabel="speed-up vs official eager (fwd+bwd, else fwd)",
                       title=f"{group}: speed-up")
        memory_axis.set(xscale="log", yscale="log", xlabel="pixels (H·W)",
                        ylabel="MB: peak, or saved for backward", title=f"{group}: memory")
        for axis in (speed_axis, memory_axis):
            if axis.lines:
                axis.legend(fontsize=7)
            axis.grid(True, alpha=0.3)
        figure.suptitle(f"{env['device']} · torch {env['torch']} · {env['commit']} · {env['date']}", fontsize=9)
        figure.tight_layout()
        path = os.path.join(directory, f"{group}_{device_type}.png")
        figure.savefig(path, dpi=110)
        plt.close(figure)
        paths.append(path)
    return paths


def _line(axis, series, value, label, scale=1.0):
    points = [(r.pixels, value(r) * scale) for r in series if value(r) is not None]
    if points:
        axis.plot(*zip(*points), marker="o", label=label)
