"""tools/gpu_check.py (`make gpu-check`) on CPU: the no-device line, the selection of GPU test
files, the timeout of a step, and the report from a real pytest JUnit file and benchmark CSV rows.
(The check itself has never run on a GPU.)"""
import os
import subprocess
import sys
import textwrap
import time

from benchmarks.case import Row
from benchmarks.report import append_csv
from tools import gpu_check

ENV = {"date": "2026-12-01T00:00:00+00:00", "commit": "abc1234", "device": "NVIDIA H200", "torch": "2.14.1",
       "triton": "3.8.0"}


def test_without_a_device_it_says_so_in_one_line_and_fails():
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([sys.executable, os.path.join(gpu_check.ROOT, "tools", "gpu_check.py")], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stdout.splitlines() == ["gpu-check: no CUDA device here (torch.cuda.is_available() is False); "
                                        "nothing was run"]


def test_gpu_test_files_are_the_marked_tests_and_the_gpu_files(tmp_path):
    (tmp_path / "tests").mkdir()
    for name in ("test_op_gpu.py", "test_op.py", "test_other_gpu.py"):
        (tmp_path / "tests" / name).write_text("")
    collected = textwrap.dedent("""\
        tests/test_op.py::test_gpu_matches[float32]
        tests/test_op.py::test_gpu_matches[float16]
        tests/test_op_triton.py::test_gpu_opcheck

        3/120 tests collected (117 deselected) in 4.20s
        """)
    assert gpu_check.gpu_test_files(gpu_check.node_ids(collected), root=str(tmp_path)) == {
        "tests/test_op.py": ["-m", "gpu"], "tests/test_op_gpu.py": [], "tests/test_op_triton.py": ["-m", "gpu"],
        "tests/test_other_gpu.py": []}


def test_a_step_past_its_timeout_is_killed_with_its_children(tmp_path):
    pid_file = tmp_path / "child.pid"
    spawn = ("import subprocess, sys, time; "
             "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
             f"open({str(pid_file)!r}, 'w').write(str(child.pid)); time.sleep(60)")
    started = time.monotonic()
    step = gpu_check.run_step("sleeper", [sys.executable, "-c", spawn], 3, str(tmp_path / "log"))
    assert step.status == "timeout" and time.monotonic() - started < 30
    child = int(pid_file.read_text())
    for _ in range(50):  # the child is killed with the group (and reaped by init)
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        raise AssertionError("the step's child outlived the timeout")
    assert step.line() == f"sleeper: TIMEOUT ({step.seconds:.0f} s): killed after 3 s"
    assert gpu_check.run_step("late", ["true"], 0.5, str(tmp_path / "log")).line() == \
        "late: NOT RUN (0 s): no time left in the budget"


FAKE_TESTS = textwrap.dedent('''\
    import pytest

    def test_passes():
        pass

    @pytest.mark.parametrize("dtype", ["float32", "float16"])
    def test_fails(dtype):
        assert dtype == "float32"

    def test_skips():
        pytest.skip("native CUDA kernels are not built")
    ''')


def _junit(tmp_path, name, source):
    path = tmp_path / f"{name}.py"
    path.write_text(source)
    xml = tmp_path / f"{name}.xml"
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--rootdir={tmp_path}",
                    str(path), f"--junitxml={xml}"], capture_output=True, cwd=tmp_path, timeout=120)
    return str(xml)


def _rows():
    def row(name, backend, role, **figures):
        return Row(group="attention", name=name, shape="B1 heads1 d48 256x256", backend=backend, role=role,
                   pixels=65536, **figures)
    return [row("top-k attention", "official (eager)", "eager", fwd_ms=2.0, fwdbwd_ms=6.0, fwd_error=3e-7,
                grad_error=4e-7, speedup_eager_fwd=1.0, speedup_eager_fwdbwd=1.0),
            row("top-k attention", "native", "backend", fwd_ms=0.5, fwdbwd_ms=1.5, fwd_error=2e-7, grad_error=9e-7,
                speedup_eager_fwd=4.0, speedup_eager_fwdbwd=4.0, speedup_compiled_fwd=2.5),
            row("top-k attention", "triton", "backend", fwd_ms=0.25, fwdbwd_ms=12.5, fwd_error=1e-6,
                grad_error=2e-6, speedup_eager_fwd=8.0, speedup_eager_fwdbwd=0.48),
            row("dense attention (MDTA)", "triton", "backend", fwd_ms=0.2, fwdbwd_ms=0.9, fwd_error=5e-6,
                grad_error=1e-7),
            row("dense attention (MDTA)", "native", "backend", status="unavailable",
                note="backend 'native' cannot run here: sparse_attn._C was built without nvcc")]


def test_the_report(tmp_path):
    failing = gpu_check.parse_junit(_junit(tmp_path, "test_mixed", FAKE_TESTS), "tests/test_mixed.py")
    failing.step = gpu_check.Step("tests/test_mixed.py", "failed", 12.4, rc=1)
    assert (failing.passed, failing.failed, failing.skipped) == (2, 1, 1)
    skipping = gpu_check.parse_junit(_junit(tmp_path, "test_skips", "import pytest\n\n\ndef test_one():\n"
                                                                   "    pytest.skip('needs sm_90')\n"),
                                     "tests/test_skips.py")
    skipping.step = gpu_check.Step("tests/test_skips.py", "ok", 1.0, rc=0)
    late = gpu_check.FileResult("tests/test_late_gpu.py", step=gpu_check.Step(
        "tests/test_late_gpu.py", "timeout", 61.0, detail="killed after 61 s"))
    append_csv(_rows(), ENV, str(tmp_path / "results"))
    rows = gpu_check.read_rows(str(tmp_path / "results"))

    report = gpu_check.render_report(
        "gpu-check · NVIDIA H200", gpu_check.Step("build", "ok", 95.2, rc=0), gpu_check.Step("collect", "ok", 8, rc=0),
        [failing, skipping, late],
        [gpu_check.Step("attention", "ok", 40, rc=0), gpu_check.Step("models", "timeout", 120, detail="killed after 120 s")],
        rows, "build/gpu-check")
    assert report == textwrap.dedent("""\
        gpu-check · NVIDIA H200
        build: ok (95 s)
        GPU tests (3 files; marker `gpu`, and all of test_*_gpu.py):
          FAIL    tests/test_mixed.py     2 passed, 1 failed, 1 skipped (12 s)
                  failed: test_fails[float16]
          SKIP    tests/test_skips.py     0 passed, 1 skipped (1 s)
                  skipped: needs sm_90
          TIMEOUT tests/test_late_gpu.py  0 passed (61 s)
                  killed after 61 s
        benchmarks: attention: ok (40 s); models: TIMEOUT (120 s): killed after 120 s
        speed-ups over the official code (GPU rows of ours; err: max |out - truth| / max |truth|, truth in float64):
          op / model              shape                  backend  fwd ms  f+b ms  vs eager fwd|f+b  vs compiled fwd|f+b  err fwd|grad
          top-k attention         B1 heads1 d48 256x256  native    0.500   1.500       4.00x|4.00x              2.50x|—   2e-07|9e-07
          top-k attention         B1 heads1 d48 256x256  triton    0.250    12.5       8.00x|0.48x                  —|—   1e-06|2e-06
          dense attention (MDTA)  B1 heads1 d48 256x256  triton    0.200   0.900               —|—                  —|—   5e-06|1e-07
          attention native: unavailable: backend 'native' cannot run here: sparse_attn._C was built without nvcc
        largest errors against the float64 reference, fwd|grad:
          attention: official (eager) 3e-07|4e-07; native 2e-07|9e-07; triton 5e-06|2e-06
        logs, JUnit files, CSV rows and plots: build/gpu-check
        gpu-check: FAIL (2 test files; benchmarks models)""")
    assert not gpu_check.passed(report)

    passing = gpu_check.parse_junit(_junit(tmp_path, "test_ok", "def test_one():\n    pass\n"), "tests/test_ok.py")
    passing.step = gpu_check.Step("tests/test_ok.py", "ok", 2, rc=0)
    clean = gpu_check.render_report("t", gpu_check.Step("build", "ok", 1, rc=0), gpu_check.Step("collect", "ok", 1),
                                    [passing, skipping], [gpu_check.Step("attention", "ok", 1, rc=0)], rows, "logs")
    assert "  PASS    tests/test_ok.py     1 passed (2 s)" in clean.splitlines()
    assert gpu_check.passed(clean)
    broken = gpu_check.render_report("t", gpu_check.Step("build", "failed", 3, rc=1, detail="error: nvcc failed"),
                                     gpu_check.Step("collect", "ok", 1), [passing], [], [], "logs")
    assert broken.splitlines()[1] == "build: FAILED (exit 1) (3 s): error: nvcc failed"
    assert broken.splitlines()[-1] == "gpu-check: FAIL (the build)"


def test_the_whole_check_fits_the_budget_even_when_every_step_takes_its_whole_timeout(tmp_path, monkeypatch):
    # main() with every command replaced: each one "takes" its whole timeout on a fake clock and
    # leaves what the real one would (the collected node ids, a JUnit file, benchmark CSV rows).
    now = [1000.0]
    commands = []

    def fake_step(label, command, timeout_s, log_path, env=None):
        if timeout_s < 1:
            return gpu_check.Step(label, "not run", detail="no time left in the budget")
        commands.append((label, command, timeout_s))
        now[0] += timeout_s
        with open(log_path, "w") as log:
            if label == "collect":
                log.write("tests/test_op_triton.py::test_gpu_matches[float32]\n\n1/9 tests collected\n")
        junit = [arg.split("=", 1)[1] for arg in command if arg.startswith("--junitxml=")]
        if junit:
            with open(junit[0], "w") as f:
                f.write('<testsuites><testsuite><testcase name="test_gpu_matches"/></testsuite></testsuites>')
        if "benchmarks" in command:
            append_csv(_rows()[:2], ENV, command[command.index("--results-dir") + 1])
        return gpu_check.Step(label, "ok", timeout_s, rc=0, log=log_path)

    monkeypatch.setattr(gpu_check, "clock", lambda: now[0])
    monkeypatch.setattr(gpu_check, "run_step", fake_step)
    monkeypatch.setattr(gpu_check, "why_no_device", lambda: None)
    monkeypatch.setattr(gpu_check, "_title", lambda: "gpu-check · fake device")
    monkeypatch.setattr(gpu_check, "_build_env", lambda: {})
    monkeypatch.setattr(gpu_check, "ROOT", str(tmp_path))  # no tests/test_*_gpu.py there
    assert gpu_check.main(["--log-dir", str(tmp_path / "logs")]) == 0
    assert now[0] - 1000.0 <= gpu_check.BUDGET_S
    tests_time = [timeout for label, _, timeout in commands if label.startswith("tests/")]
    assert sum(tests_time) >= 100, "the tests keep at least 100 s"
    labels = [label for label, _, _ in commands]
    assert labels == ["build", "collect", "tests/test_op_triton.py", "attention", "msfn", "models"]
    test_run = commands[2][1]
    assert test_run[test_run.index("tests/test_op_triton.py") + 1:][:2] == ["-m", "gpu"]
    for _, command, _ in commands[3:]:
        assert command[command.index("--device") + 1] == "cuda"
    for budget, most in ((9999, gpu_check.BUDGET_S), (200, 200)):  # at most 8 minutes, or less if asked
        started = now[0]
        gpu_check.main(["--log-dir", str(tmp_path / "logs"), "--budget-s", str(budget)])
        assert now[0] - started <= most
