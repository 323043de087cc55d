"""``make gpu-check``: the first look at a CUDA machine, in one command and at most 8 minutes.

Builds ``sparse_attn._C`` (with its CUDA kernels where nvcc is present), runs every GPU test file
(the tests marked ``gpu``, and every test of a ``test_*_gpu.py`` file) one pytest per file, and
the GPU benchmark rows of every op (the issues' target shapes) and every network (the quick sweep),
then prints one short report: pass/fail per test file, the speed-up table, the largest errors
against the float64 reference. Every step runs under a timeout taken from one overall budget, so
a hung kernel costs its step, not the check. Logs, JUnit files and the benchmarks' CSV rows and
plots go to ``--log-dir``.

Exit status: 0 when every step passed, 1 when one failed or timed out, 2 when there is no CUDA
device here (said in one line; nothing is built or run).
"""
import argparse
import csv
import glob
import math
import os
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass, field

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUDGET_S = 480            # the whole check: build, tests, benchmarks
# How the budget is split is a first guess (nothing has run on a GPU yet); each step's seconds
# are in the report, to set these from.
BUILD_CAP_S = 150          # nvcc, for this device's architecture only; seconds when already built
COLLECT_CAP_S = 45         # pytest --collect-only -m gpu (8 s on 2 CPU cores)
BENCHMARK_RESERVE_S = 180  # kept for the benchmarks while the tests run
# so that the tests keep at least 100 s when the build and the collection take all of theirs.
REPORT_SLACK_S = 5
# (label, arguments of `python -m benchmarks`, share of the benchmarks' time)
BENCHMARKS = (
    ("attention", ["--only", "attention", "--targets"], 1),
    ("msfn", ["--only", "msfn", "--targets"], 1),
    ("models", ["--only", "models"], 2),
)
# Fewer, shorter samples than `make bench`: medians of at least 3 timed runs still.
BENCHMARK_SAMPLING = ["--repeat", "5", "--budget-s", "2"]
clock = time.monotonic  # the one clock of the budget (a test replaces it)


# ---------------------------------------------------------------------------------------------
# Steps under a deadline
# ---------------------------------------------------------------------------------------------
@dataclass
class Step:
    """One command's outcome: status "ok", "failed" (with rc), "timeout" or "not run"."""
    label: str
    status: str
    seconds: float = 0.0
    rc: int = None
    log: str = ""
    detail: str = ""

    def line(self):
        detail = f": {self.detail}" if self.detail else ""
        shown = {"ok": "ok", "failed": f"FAILED (exit {self.rc})", "timeout": "TIMEOUT",
                 "not run": "NOT RUN"}[self.status]
        return f"{self.label}: {shown} ({self.seconds:.0f} s){detail}"


def run_step(label, command, timeout_s, log_path, env=None):
    """Run ``command`` in the repository root, output to ``log_path``, killed with its whole
    process group after ``timeout_s`` seconds."""
    if timeout_s < 1:
        return Step(label, "not run", detail="no time left in the budget")
    started = clock()
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env,
                                   start_new_session=True)
        try:
            rc = process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)  # the group: pytest's and the benchmarks' children too
            process.wait()
            return Step(label, "timeout", clock() - started, log=log_path,
                        detail=f"killed after {timeout_s:.0f} s")
    return Step(label, "ok" if rc == 0 else "failed", clock() - started, rc, log_path)


def last_line(path):
    """The last non-empty line of a log (the error a failed build ends with)."""
    try:
        with open(path, errors="replace") as f:
            lines = [line.strip() for line in f if line.strip()]
    except OSError:
        return ""
    return lines[-1][:160] if lines else ""


# ---------------------------------------------------------------------------------------------
# GPU test files and their JUnit results
# ---------------------------------------------------------------------------------------------
def gpu_test_files(collected_node_ids, root=None):
    """{test file: pytest arguments that select its GPU tests}: the files of the collected
    ``-m gpu`` node ids (their marked tests), and every ``tests/test_*_gpu.py`` (all of it)."""
    root = ROOT if root is None else root
    files = {}
    for node in collected_node_ids:
        if "::" in node:
            files[node.split("::", 1)[0]] = ["-m", "gpu"]
    for path in sorted(glob.glob(os.path.join(root, "tests", "test_*_gpu.py"))):
        files[os.path.relpath(path, root)] = []
    return dict(sorted(files.items()))


def node_ids(collect_output):
    """The node ids in the output of ``pytest --collect-only -q``."""
    return [line.strip() for line in collect_output.splitlines() if "::" in line and not line.startswith(" ")]


@dataclass
class FileResult:
    """The tests of one file: counts, the failed tests' names, the skip reasons."""
    path: str
    passed: int = 0
    failed: int = 0
    skipped: int = 0
    failures: list = field(default_factory=list)
    skip_reasons: list = field(default_factory=list)
    step: Step = None

    @property
    def verdict(self):
        if self.step is not None and self.step.status in ("timeout", "not run"):
            return self.step.status.upper()
        if self.failed:
            return "FAIL"
        if self.step is not None and self.step.status == "failed" and self.step.rc not in (1, 5):
            return "ERROR"  # pytest itself failed (a crash, a collection error outside the tests)
        if self.passed == 0:
            return "SKIP"   # nothing ran: not a pass
        return "PASS"

    def line(self, width):
        counts = [f"{self.passed} passed"] + [f"{n} {what}" for n, what in ((self.failed, "failed"),
                                                                          (self.skipped, "skipped")) if n]
        seconds = f" ({self.step.seconds:.0f} s)" if self.step is not None else ""
        text = f"  {self.verdict:7} {self.path:{width}}  {', '.join(counts)}{seconds}"
        if self.failures:
            text += "\n" + "\n".join(f"          failed: {name}" for name in self.failures[:5])
            if len(self.failures) > 5:
                text += f"\n          ... and {len(self.failures) - 5} more"
        if self.skip_reasons and self.verdict in ("SKIP", "PASS"):
            text += "\n" + "\n".join(f"          skipped: {reason}" for reason in self.skip_reasons[:3])
        if self.step is not None and self.step.status in ("timeout", "not run"):
            text += f"\n          {self.step.detail}"
        return text


def parse_junit(path, test_file):
    """A FileResult from pytest's ``--junitxml`` file (errors count as failures)."""
    result = FileResult(test_file)
    try:
        tree = ElementTree.parse(path)
    except (OSError, ElementTree.ParseError):
        return result
    for case in tree.iter("testcase"):
        name = case.get("name", "?")
        if case.find("failure") is not None or case.find("error") is not None:
            result.failed += 1
            result.failures.append(name)
        elif case.find("skipped") is not None:
            result.skipped += 1
            reason = case.find("skipped").get("message", "").strip()
            if reason and reason not in result.skip_reasons:
                result.skip_reasons.append(reason[:140])
        else:
            result.passed += 1
    return result


# ---------------------------------------------------------------------------------------------
# Benchmark rows (the CSV files `python -m benchmarks` writes)
# ---------------------------------------------------------------------------------------------
def read_rows(results_dir):
    rows = []
    for path in sorted(glob.glob(os.path.join(results_dir, "*.csv"))):
        with open(path, newline="") as f:
            rows += list(csv.DictReader(f))
    return rows


def _number(row, key):
    try:
        value = float(row.get(key) or "nan")
    except ValueError:
        return None
    return None if math.isnan(value) else value


def _ms(value):
    return "—" if value is None else (f"{value:.3f}" if value < 10 else f"{value:.1f}")


def _speedup(value):
    return "—" if value is None else f"{value:.2f}x"


def _error(value):
    return "—" if value is None else f"{value:.0e}"


def speedup_table(rows):
    """Our backends' measured rows: times, speed-ups over the official code (eager and compiled),
    errors; then one line per backend that did not run, with its reason."""
    header = ("op / model", "shape", "backend", "fwd ms", "f+b ms", "vs eager fwd|f+b", "vs compiled fwd|f+b",
              "err fwd|grad")
    body = []
    for row in rows:
        if row.get("role") != "backend" or row.get("status") != "ok":
            continue
        n = lambda key: _number(row, key)  # noqa: E731
        body.append((row["name"], row["shape"], row["backend"], _ms(n("fwd_ms")), _ms(n("fwdbwd_ms")),
                     f"{_speedup(n('speedup_eager_fwd'))}|{_speedup(n('speedup_eager_fwdbwd'))}",
                     f"{_speedup(n('speedup_compiled_fwd'))}|{_speedup(n('speedup_compiled_fwdbwd'))}",
                     f"{_error(n('fwd_error'))}|{_error(n('grad_error'))}"))
    lines = []
    if body:
        widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]
        for line in [header, *body]:
            lines.append("  " + "  ".join(cell.ljust(w) if i < 3 else cell.rjust(w)
                                          for i, (cell, w) in enumerate(zip(line, widths))).rstrip())
    else:
        lines.append("  no row of ours was measured")
    not_run = {}
    for row in rows:
        if row.get("status") not in ("ok", "skipped"):
            not_run.setdefault((row.get("group", ""), row.get("backend", ""), row.get("status", "")),
                               row.get("note", ""))
    for (group, backend, status), note in not_run.items():
        lines.append(f"  {group} {backend}: {status}: {note[:140]}")
    return "\n".join(lines)


def error_summary(rows):
    """Per group and backend (the official code and the reference included, as the yardstick):
    the largest error against the float64 reference over the rows, forward | gradients."""
    worst = {}
    for row in rows:
        fwd, grad = _number(row, "fwd_error"), _number(row, "grad_error")
        if row.get("status") != "ok" or (fwd is None and grad is None):
            continue
        key = (row.get("group", ""), row.get("backend", ""))
        old_fwd, old_grad = worst.get(key, (None, None))
        worst[key] = (max(filter(lambda v: v is not None, (old_fwd, fwd)), default=None),
                      max(filter(lambda v: v is not None, (old_grad, grad)), default=None))
    if not worst:
        return "  no error was measured"
    lines = []
    for group in dict.fromkeys(group for group, _ in worst):
        cells = [f"{backend} {_error(fwd)}|{_error(grad)}" for (g, backend), (fwd, grad) in worst.items() if g == group]
        lines.append(f"  {group}: " + "; ".join(cells))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------
def render_report(title, build, collect, files, benchmarks, rows, log_dir):
    """The whole report as text; its last line is the verdict."""
    lines = [title, build.line(), collect.line() if collect.status != "ok" else None]
    lines = [line for line in lines if line]
    lines.append(f"GPU tests ({len(files)} files; marker `gpu`, and all of test_*_gpu.py):")
    width = max((len(f.path) for f in files), default=0)
    lines += [f.line(width) for f in files] or ["  no GPU test was collected"]
    lines.append("benchmarks: " + "; ".join(step.line() for step in benchmarks))
    lines.append("speed-ups over the official code (GPU rows of ours; err: max |out - truth| / max |truth|, "
                 "truth in float64):")
    lines.append(speedup_table(rows))
    lines.append("largest errors against the float64 reference, fwd|grad:")
    lines.append(error_summary(rows))
    problems = []
    if build.status != "ok":
        problems.append("the build")
    if collect.status != "ok":
        problems.append("the test collection")
    bad_files = [f for f in files if f.verdict not in ("PASS", "SKIP")]
    if bad_files:
        problems.append(f"{len(bad_files)} test file{'s' if len(bad_files) > 1 else ''}")
    bad_benchmarks = [step.label for step in benchmarks if step.status != "ok"]
    if bad_benchmarks:
        problems.append("benchmarks " + ", ".join(bad_benchmarks))
    lines.append(f"logs, JUnit files, CSV rows and plots: {log_dir}")
    lines.append("gpu-check: PASS" if not problems else "gpu-check: FAIL (" + "; ".join(problems) + ")")
    return "\n".join(lines)


def passed(report):
    return report.rstrip().endswith("gpu-check: PASS")


# ---------------------------------------------------------------------------------------------
# The check
# ---------------------------------------------------------------------------------------------
def why_no_device():
    """One line saying why there is no CUDA device here, or None."""
    import torch

    if torch.version.cuda is None:
        return f"gpu-check: no CUDA device: this torch ({torch.__version__}) is built without CUDA; nothing was run"
    if not torch.cuda.is_available():
        return "gpu-check: no CUDA device here (torch.cuda.is_available() is False); nothing was run"
    return None


def _title():
    import torch

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    return (f"gpu-check · {torch.cuda.get_device_name(0)} · torch {torch.__version__} (CUDA {torch.version.cuda}) · "
            f"commit {commit}")


def _build_env():
    """Compile the CUDA kernels for this device's architecture only (half the nvcc time of the
    default two), unless TORCH_CUDA_ARCH_LIST is set."""
    import torch

    major, minor = torch.cuda.get_device_capability(0)
    return {**os.environ, "TORCH_CUDA_ARCH_LIST": os.environ.get("TORCH_CUDA_ARCH_LIST", f"{major}.{minor}")}


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python tools/gpu_check.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget-s", type=float, default=BUDGET_S,
                        help=f"seconds for the whole check (default and most {BUDGET_S})")
    parser.add_argument("--log-dir", default=os.path.join(ROOT, "build", "gpu-check"),
                        help="where logs, JUnit files, CSV rows and plots go (default build/gpu-check)")
    args = parser.parse_args(argv)
    args.budget_s = min(args.budget_s, BUDGET_S)
    return args


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    reason = why_no_device()
    if reason is not None:
        print(reason)
        return 2
    deadline = clock() + args.budget_s - REPORT_SLACK_S
    remaining = lambda: deadline - clock()  # noqa: E731
    os.makedirs(args.log_dir, exist_ok=True)
    log = lambda name: os.path.join(args.log_dir, name)  # noqa: E731
    python = sys.executable
    title = _title()
    print(f"gpu-check: build, GPU tests, GPU benchmarks within {args.budget_s:.0f} s; logs in {args.log_dir}",
          flush=True)

    build = run_step("build", [python, "setup.py", "build_ext", "--inplace"], min(BUILD_CAP_S, remaining()),
                     log("build.log"), _build_env())
    if build.status != "ok":
        build.detail = last_line(build.log) or build.detail
    print(build.line(), flush=True)

    tests_end = deadline - BENCHMARK_RESERVE_S
    collect = run_step("collect", [python, "-m", "pytest", "--collect-only", "-q", "-m", "gpu", "tests"],
                       min(COLLECT_CAP_S, tests_end - clock()), log("collect.log"))
    collected = ""
    if os.path.exists(log("collect.log")):
        with open(log("collect.log"), errors="replace") as f:
            collected = f.read()
    files = gpu_test_files(node_ids(collected))
    if collect.status == "failed" and collect.rc == 5:  # no test has the marker: not an error
        collect.status = "ok"
    results = []
    for index, (test_file, selection) in enumerate(files.items()):
        stem = os.path.splitext(os.path.basename(test_file))[0]
        junit = log(f"{stem}.xml")
        timeout = (tests_end - clock()) / (len(files) - index)
        step = run_step(test_file, [python, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", test_file,
                                    *selection, f"--junitxml={junit}"], timeout, log(f"{stem}.log"))
        result = parse_junit(junit, test_file) if step.status in ("ok", "failed") else FileResult(test_file)
        result.step = step
        results.append(result)
        print(f"  {result.verdict} {test_file} ({step.seconds:.0f} s)", flush=True)

    results_dir = log("results")
    for path in glob.glob(os.path.join(results_dir, "*")):
        os.remove(path)  # this run's rows only
    benchmark_steps = []
    shares_left = sum(share for _, _, share in BENCHMARKS)
    for label, arguments, share in BENCHMARKS:
        timeout = remaining() * share / shares_left
        shares_left -= share
        step = run_step(label, [python, "-m", "benchmarks", "--device", "cuda", *arguments, *BENCHMARK_SAMPLING,
                                "--results-dir", results_dir], timeout, log(f"benchmarks_{label}.log"))
        if step.status == "timeout":
            step.detail += " (its rows are lost: the benchmarks write them at the end)"
        benchmark_steps.append(step)
        print(f"  benchmarks {step.line()}", flush=True)

    report = render_report(title, build, collect, results, benchmark_steps, read_rows(results_dir), args.log_dir)
    print("\n" + report)
    return 0 if passed(report) else 1


if __name__ == "__main__":
    sys.exit(main())
