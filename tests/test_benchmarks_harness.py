"""The benchmark harness itself: rows, table, CSV, plots, memory counters and arithmetic.
(The benchmarks' figures are reports, checked by nobody's assert; the harness is tested here.)"""
import csv
import gc
import io
import json
import subprocess
import sys
import types
import weakref

import pytest
import torch

from benchmarks import attention, memory, memory_child, report, suite
from benchmarks.case import (COMPILED, EAGER, Case, Options, Row, Skipped, Variant, add_speedups, measure,
                             speedup)

QUICK = Options(repeat=1, budget_s=1.0, peak=False)


def _tiny_case(variants):
    def inputs(device, dtype):
        return [torch.randn(4, 8, device=device, dtype=dtype, requires_grad=True)]
    return Case(group="tiny", name="tiny op", shape="4x8", spec={}, pixels=32, inputs=inputs, variants=variants,
                truth=lambda device: torch.tanh)


def _failing_at_build(device, dtype):
    raise RuntimeError("no kernel for this op here\nsecond line")


def _failing_at_call(device, dtype):
    def fn(x):
        raise NotImplementedError("the backward is not written yet")
    return fn


def _skipped(device, dtype):
    raise Skipped("left out of a quick run")


def test_failing_backends_become_rows_not_crashes():
    rows = measure(_tiny_case([Variant("eager", lambda d, t: torch.tanh, EAGER),
                               Variant("broken", _failing_at_build),
                               Variant("half-done", _failing_at_call),
                               Variant("later", _skipped)]), QUICK)
    assert [r.status for r in rows] == ["ok", "unavailable", "unavailable", "skipped"]
    assert rows[1].note == "RuntimeError: no kernel for this op here"
    assert rows[2].note.startswith("NotImplementedError: the backward is not written yet")
    assert rows[1].fwd_ms is None and rows[1].speedup_eager_fwd is None
    table = report.render_table(add_speedups(rows), "title")
    assert "unavailable: RuntimeError: no kernel for this op here" in table
    assert "skipped: left out of a quick run" in table


def test_rows_are_reported_and_saved_before_a_section_that_dies(tmp_path, monkeypatch):
    # A group's section runs more steps (the models' profiles): a run killed there, for memory
    # say, must already have printed its targets and written its rows.
    def dying_section(rows, opts, sweep):
        raise MemoryError("killed while profiling")

    tiny = types.SimpleNamespace(
        default_specs=lambda sweep: [{}],
        make_case=lambda spec: _tiny_case([Variant("eager", lambda d, t: torch.tanh, EAGER)]),
        targets=lambda rows: [report.Target("0", "tiny op", 1.0, ">=", 0.5)], section=dying_section)
    monkeypatch.setattr(suite, "group_module", lambda group: tiny)
    stream = io.StringIO()
    with pytest.raises(MemoryError):
        suite.run(["tiny"], QUICK, results_dir=tmp_path, stream=stream)
    assert "PASS  tiny op" in stream.getvalue()
    with open(tmp_path / "tiny.csv") as f:
        assert [row["backend"] for row in csv.DictReader(f)] == ["eager"]


def test_a_measured_row_has_times_saved_bytes_and_errors():
    (row,) = measure(_tiny_case([Variant("eager", lambda d, t: torch.tanh, EAGER)]), QUICK)
    assert row.status == "ok" and row.note == ""
    assert row.fwd_ms > 0 and row.fwdbwd_ms > 0
    assert row.saved_bytes == 4 * 8 * 4  # tanh saves its result
    assert row.fwd_error < 1e-6 and row.grad_error < 1e-6


def test_a_case_measured_only_for_its_peak_reports_a_failed_peak_as_unavailable(monkeypatch):
    def child_failed(*args, **kwargs):
        raise RuntimeError("ValueError: group: expected one of ...")  # as peak_bytes reports a child's error
    monkeypatch.setattr(memory, "peak_bytes", child_failed)
    case = _tiny_case([Variant("broken later", _failing_at_call)])
    case.time_forward = case.time_backward = False
    case.peak_mode = "inference"
    (row,) = measure(case, Options(repeat=1, peak=None))
    assert row.status == "unavailable" and row.note.startswith("peak: RuntimeError: ValueError: group:")


def test_table_csv_and_plot_for_a_tiny_attention_case(tmp_path):
    case = attention.make_case(attention.level_spec("topk", 4, 32, compile=False))
    rows = add_speedups(measure(case, QUICK))
    by_backend = {r.backend: r for r in rows}
    assert by_backend["official (eager)"].status == "ok"
    assert by_backend["official (compile)"].status == "skipped"
    assert by_backend["reference"].status == "ok"
    assert by_backend["reference"].fwd_error < 1e-5
    assert by_backend["reference"].floor_ms > 0
    env = report.environment("cpu")
    table = report.render_table(rows, "title")
    for backend in by_backend:
        assert backend in table
    csv_paths = report.append_csv(rows, env, tmp_path)
    report.append_csv(rows, env, tmp_path)  # appending keeps one header
    with open(csv_paths[0]) as f:
        written = list(csv.DictReader(f))
    assert len(written) == 2 * len(rows)
    assert {"date", "commit", "device", "torch", "triton"} <= set(written[0])
    assert written[0]["torch"] == torch.__version__ and written[0]["backend"] == "official (eager)"
    (png,) = report.plot(rows, env, "cpu", tmp_path)
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_official_formulas_agree_with_the_reference():
    for op in attention.OPS:
        case = attention.make_case(attention.level_spec(op, 4, 32, compile=False))
        case.variants = [case.variant("official (eager)")]
        (row,) = measure(case, Options(repeat=1, budget_s=0.1, peak=False))
        assert row.fwd_error < 1e-5 and row.grad_error < 1e-5, (op, row)


def test_saved_bytes_counts_each_storage_once():
    x = torch.randn(1000, requires_grad=True)
    w = torch.randn(500, requires_grad=True)

    def fn():
        y = x.exp()          # saves y: 4000 bytes
        z = y * x            # saves y again and x: 4000 more
        return z[:500] * w + x[:500] * w  # saves z (4000), w (2000), and a view of x (counted with x)

    nbytes, _ = memory.saved_bytes(fn)
    assert nbytes == 4000 + 4000 + 4000 + 2000


def test_saved_bytes_lets_the_graph_go():
    # tanh saves its output: a pack hook that kept the live output would keep the graph alive
    # after the caller drops it (a benchmark run grew by a gigabyte per network this way).
    x = torch.randn(1000, requires_grad=True)
    nbytes, out = memory.saved_bytes(lambda: torch.tanh(x))
    assert nbytes == 4000
    storage = weakref.ref(out.untyped_storage())
    del out
    gc.collect()
    assert storage() is None


def test_speedup_arithmetic():
    def row(backend, role, fwd, fwdbwd, status="ok"):
        return Row("g", "op", "s", backend, role, 1, status=status, fwd_ms=fwd, fwdbwd_ms=fwdbwd)
    rows = add_speedups([row("eager", EAGER, 10.0, 30.0), row("compiled", COMPILED, 4.0, None),
                         row("ours", "backend", 2.0, 6.0), row("gone", "backend", None, None, "unavailable")])
    eager, compiled, ours, gone = rows
    assert (ours.speedup_eager_fwd, ours.speedup_eager_fwdbwd) == (5.0, 5.0)
    assert (ours.speedup_compiled_fwd, ours.speedup_compiled_fwdbwd) == (2.0, None)
    assert eager.speedup_eager_fwd == 1.0 and compiled.speedup_eager_fwd == 2.5
    assert gone.speedup_eager_fwd is None
    assert speedup(None, 1.0) is None and speedup(3.0, 1.5) == 2.0
    assert Row("g", "op", "s", "b", "backend", 1, fwd_ms=3.0, floor_ms=2.0).floor_ratio == 1.5


def test_patch_largest_image_fits_affine_and_quadratic_peaks():
    """Patch attention's largest image within the budget: an affine peak for ours, a quadratic one
    for the official module (its N×M scores), each solved from the measured points."""
    from benchmarks import patch
    budget = 8 * 2**30
    affine = [(n, 2e6 + 100.0 * n) for n in (48**2, 64**2, 128**2)]
    assert patch.largest_side(affine, budget, 1) == int(((budget - 2e6) / 100.0) ** 0.5) // 8 * 8
    quadratic = [(n, 5e7 + 3.0 * n + 13.2 * n * n) for n in (48**2, 64**2, 128**2)]
    n = (-3.0 + (9.0 - 4 * 13.2 * (5e7 - budget)) ** 0.5) / (2 * 13.2)
    assert patch.largest_side(quadratic, budget, 2) == int(n ** 0.5) // 8 * 8
    assert patch.largest_side(affine[:1], budget, 1) is None

    def row(backend, side, peak):
        return Row("patch", patch.NAME, f"{side}x{side}", backend, "backend", side * side, peak_bytes=peak,
                   fwd_ms=1.0, fwdbwd_ms=2.0)
    rows = [row("native", s, p) for (n, p), s in zip(affine, (48, 64, 128))]
    section = patch.section(rows, Options(), "targets")
    assert f"native             about {patch.largest_side(affine, budget, 1)}x" in section
    assert "official" not in section  # no official rows measured: no line for it


def test_target_verdicts():
    assert report.Target("2", "x", 5.5, ">=", 5.0).verdict == "PASS"
    assert report.Target("2", "x", 0.31, "<=", 0.30, "%").verdict == "FAIL"
    missing = report.Target("2", "x", None, ">=", 5.0)
    assert missing.verdict == "N/A" and "not measured" in missing.line()
    assert "measured 31%" in report.Target("2", "x", 0.31, "<=", 0.30, "%").line()


def test_cpu_peak_of_a_known_allocation():
    # In a fresh process with the memory children's allocator settings, as the harness measures:
    # in this long-lived one glibc may serve the step from heap pages the warm-up left resident
    # (an earlier CI run measured 0 bytes here).
    nbytes = 64 * 2**20
    script = ("import torch; from benchmarks import memory; "
              f"print(memory.cpu_peak_bytes_here(lambda: torch.ones({nbytes // 4}).sum()))")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=memory.child_env(),
                          check=True)
    peak = int(done.stdout.split()[-1])
    # RSS moves by pages for reasons of its own (other buffers freed meanwhile): a few percent.
    assert 0.95 * nbytes <= peak < nbytes + 16 * 2**20


def test_peak_memory_subprocess(capsys):
    spec = attention.level_spec("topk", 4, 32, compile=False)
    peak = memory.peak_bytes(attention.make_case(spec), "reference", "inference", "cpu")
    assert 0 <= peak < 256 * 2**20
    # The child's answer when its case cannot run (in this process: a second child is slow).
    memory_child.main(["memory_child", json.dumps({"group": "attention", "spec": spec, "variant": "no such backend",
                                              "mode": "inference", "device": "cpu", "warmup": False})])
    answer = json.loads(capsys.readouterr().out)
    assert "has no variant 'no such backend'" in answer["error"]


def test_every_sweep_builds_its_cases_and_covers_the_targets():
    for sweep in suite.SWEEPS:
        for group in suite.GROUPS:
            cases = suite.cases([group], sweep)
            for case in cases:
                assert case.variants and case.shape
                assert suite.make_case(group, case.spec).shape == case.shape  # what the memory child does
    # Every target names a case that the "targets" sweep measures.
    shapes = {(c.name, c.shape) for c in suite.cases(list(suite.GROUPS), "targets")}
    assert ("top-k attention", "B1 heads1 d48 256x256") in shapes
    assert ("MSFN core", "B1 C254 256x256") in shapes and ("MixedScaleFFN", "B1 dim48 256x256") in shapes
    assert ("DRSformer train step", "B1 3x128x128") in shapes and ("DRSformer inference", "B1 3x512x512") in shapes
    assert ("LayerNorm (WithBias)", "B1 C48 256x256") in shapes and ("GDFN core (gelu)", "B1 C254 256x256") in shapes
    assert ("Restormer train step", "B1 3x128x128") in shapes and ("Restormer inference", "B1 3x512x512") in shapes
    assert ("DSGformer train step", "B1 3x128x128") in shapes
    assert ("DRSformer full image", "B1 3x1024x1024") in shapes
    assert ("block-sparse region attention", "B1 heads1 d16 128x128 t=R/4") in shapes


def test_case_filter_picks_by_name_and_shape():
    picked = suite.cases(["models"], "targets", match="restormer INFERENCE")
    assert [(c.name, c.shape) for c in picked] == [("Restormer inference", "B1 3x512x512")]
    assert picked[0].time_forward and picked[0].peak_mode == "inference"  # time and peak, as the target needs
    with pytest.raises(ValueError, match="no case .* matches 'no such case'"):
        suite.cases(["models"], "targets", match="no such case")


def test_streaming_benchmark_skips_a_forward_that_cannot_fit(monkeypatch):
    """A whole-image forward whose extrapolated peak exceeds 80% of the memory available is not
    run (on a shared machine it would take others' memory): the reason names both figures."""
    from benchmarks import streaming
    from sparse_attn.models import Restormer

    net = Restormer(dim=8, num_blocks=(1, 1, 1, 1), heads=(1, 2, 4, 8), num_refinement_blocks=1).eval()
    monkeypatch.setattr("sparse_attn.cli.restore.available_bytes", lambda device: 2**30)
    assert streaming.forward_cannot_fit(net, "reference", 64, "cpu") is None
    reason = streaming.forward_cannot_fit(net, "reference", 8192, "cpu")
    assert reason is not None and "GiB, 1.0 GiB is available: it cannot run here" in reason


def test_streaming_cold_runs_plot_from_their_csv(tmp_path):
    """The peak-against-pixels plot reads the cold-run CSV: measured lines, streaming's predicted
    line, and a forward that could not run named in the legend."""
    from benchmarks import streaming

    path = tmp_path / "cold.csv"
    rows = [dict(model="DRSformer", side=side, backend="native", how=how, band_rows=64 if how == "streaming" else "",
                 peak_bytes=peak, predicted_bytes=2 * peak if how == "streaming" else "", note="")
            for side, how, peak in ((256, "forward", 400 * 2**20), (512, "forward", 1600 * 2**20),
                                    (256, "streaming", 100 * 2**20), (512, "streaming", 300 * 2**20))]
    rows.append(dict(model="DRSformer", side=2048, backend="native", how="forward", peak_bytes="",
                     note="forward at 2048x2048 needs about 26.0 GiB, 3.4 GiB is available: it cannot run here"))
    for row in rows:
        streaming._append_csv(path, row)
    png = streaming.plot_cold(path, tmp_path / "cold.png")
    assert png.stat().st_size > 10_000
    assert list(csv.DictReader(path.open()))[-1]["how"] == "forward"


def test_profile_table_attributes_forward_and_backward_to_modules():
    from torch import nn

    from benchmarks import breakdown
    from sparse_attn.nn import GatedDconvFFN, LayerNorm2d

    class Block(nn.Module):  # a class of this test module: not a labelled one
        def __init__(self):
            super().__init__()
            self.norm, self.ffn = LayerNorm2d(8, "WithBias"), GatedDconvFFN(8, 2.0, bias=False)

        def forward(self, x):
            return self.ffn(self.norm(x)).tanh()

    torch.manual_seed(0)
    model = Block()
    x = torch.randn(1, 8, 16, 16)
    rows = breakdown.module_breakdown(model, lambda: model(x).sum().backward())
    by_label = {row.label: row for row in rows}
    assert set(by_label) == {"LayerNorm2d", "GatedDconvFFN", breakdown.OUTSIDE}
    assert by_label["GatedDconvFFN"].count == 1 and by_label["LayerNorm2d"].count == 1
    for label in ("LayerNorm2d", "GatedDconvFFN"):
        assert by_label[label].forward_ms > 0 and by_label[label].backward_ms > 0
    assert by_label[breakdown.OUTSIDE].count == 0  # tanh, sum and the engine's own work
    text = breakdown.render("title", rows, rows)
    assert "GatedDconvFFN" in text and "1.00x" in text
