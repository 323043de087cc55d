"""Exact full-image inference in row bands (issue 16): ``forward_streaming`` equals ``forward``
on every network and backend, in float64 and float32, at sizes that are not multiples of the band
or of 8, with bands down to the halo; its memory does not grow with the image beyond the maps it
keeps; budgets and band heights it cannot honour are refused clearly."""
import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import sparse_attn
from sparse_attn import streaming
from sparse_attn.models import ALformer, DRSformer, DSGformer, Restormer

from model_cases import BACKENDS, runs, skip_unless_runs

SMALL = dict(dim=8, num_blocks=(1, 1, 1, 1), heads=(1, 2, 4, 8))
NETWORKS = {
    "drsformer": functools.partial(DRSformer, **SMALL),
    "drsformer_nomefc": functools.partial(DRSformer, **SMALL, mefc=False),
    "restormer": functools.partial(Restormer, **SMALL, num_refinement_blocks=1),
    "restormer_dual_pixel": functools.partial(Restormer, **SMALL, num_refinement_blocks=1, dual_pixel_task=True,
                                              inp_channels=6),
    "dsgformer": functools.partial(DSGformer, **SMALL, num_refinement_blocks=1),
}
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5}


def build(name, dtype):
    torch.manual_seed(0)
    return NETWORKS[name]().to(dtype).eval()


def compare(net, x, backend, band_rows):
    with torch.no_grad(), sparse_attn.use_backend(backend):
        expected = net(x)
        got = [net.forward_streaming(x, band_rows=rows) for rows in band_rows]
    for rows, out in zip(band_rows, got):
        assert out.shape == expected.shape
        error = (out - expected).abs().max().item()
        assert error <= TOLERANCE[x.dtype], f"band_rows={rows}: max abs error {error:.3g}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(NETWORKS))
def test_equals_forward(name, backend):
    """B = 2, 27x21 (padded to 32x24 inside): bands of the least height the network allows
    (its largest halo) and of a height that divides no level's map. Triton's interpreter (float32,
    slow) gets 13x10 and the least bands only."""
    dtype = torch.float64 if runs(backend, torch.float64) else torch.float32
    skip_unless_runs(backend, dtype)
    net = build(name, dtype)
    least, alignment = streaming.band_requirements(net)
    x = torch.rand(2, net.inp_channels, *((13, 10) if backend == "triton" else (27, 21)), dtype=dtype)
    rows = [least] if backend == "triton" else [least, 11 if alignment == 1 else 3 * alignment]
    compare(net, x, backend, rows)


@pytest.mark.parametrize("name", ["drsformer", "restormer", "dsgformer"])
def test_equals_forward_float32(name):
    """float32 on the default backend, a taller image (more bands per level): max abs <= 1e-5."""
    net = build(name, torch.float32)
    least, _ = streaming.band_requirements(net)
    x = torch.rand(1, 3, 45, 30)
    compare(net, x, "auto", [least, 16])


def test_band_rows_down_to_the_halo():
    """The least band height is the largest halo of the network's walks; one row less is refused."""
    expected = {"drsformer": 6, "drsformer_nomefc": 4, "restormer": 1, "dsgformer": 8}
    for name, least in expected.items():
        net = build(name, torch.float32)
        assert streaming.band_requirements(net)[0] == least, name
        with pytest.raises(ValueError, match="band_rows"):
            net.forward_streaming(torch.rand(1, 3, 16, 16), band_rows=least - 1 if least > 1 else 0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
def test_low_precision_as_accurate_as_forward(dtype):
    """In half precision the two orders of summation round differently: streaming must be as
    close to the float64 result as forward is (within 2x and a few ulps)."""
    net = build("drsformer_nomefc", torch.float64)
    x = torch.rand(1, 3, 20, 20, dtype=torch.float64)
    with torch.no_grad(), sparse_attn.use_backend("reference"):
        exact = net(x)
        low = build("drsformer_nomefc", dtype)
        forward_error = (low(x.to(dtype)).double() - exact).abs().max().item()
        streaming_error = (low.forward_streaming(x.to(dtype), band_rows=4).double() - exact).abs().max().item()
    assert streaming_error <= 2 * forward_error + 4 * torch.finfo(dtype).eps


def test_dsgformer_bands_start_on_patch_rows():
    net = build("dsgformer", torch.float32)
    with pytest.raises(ValueError, match="multiple of 8"):
        net.forward_streaming(torch.rand(1, 3, 16, 16), band_rows=12)


def test_budget_picks_the_largest_band_that_fits():
    net = build("drsformer", torch.float32)
    shape = (1, 3, 200, 120)
    budget = streaming.predicted_peak_bytes(net, shape, torch.float32, 40)
    rows = streaming.choose_band_rows(net, shape, torch.float32, max_memory=budget)
    assert rows == 40
    assert streaming.predicted_peak_bytes(net, shape, torch.float32, rows + 1) > budget


def test_too_small_a_budget_is_refused_with_the_figures():
    net = build("drsformer", torch.float32)
    x = torch.rand(1, 3, 64, 64)
    kept_mib = 4 * streaming.kept_elements(net, 1, 64, 64) / 2**20
    with pytest.raises(streaming.MemoryBudgetError, match=f"keeps take {kept_mib:.1f} MiB"):
        net.forward_streaming(x, max_memory=int(kept_mib * 2**20 * 0.9))
    with pytest.raises(streaming.MemoryBudgetError, match="band_rows=64"):
        net.forward_streaming(x, band_rows=64, max_memory=streaming.predicted_peak_bytes(net, x.shape, x.dtype, 8))
    with pytest.raises(ValueError, match="max_memory"):
        net.forward_streaming(x, max_memory=-1)


def test_bad_inputs_are_refused():
    net = build("restormer", torch.float32)
    with pytest.raises(ValueError, match=r"x: expected \(B, 3, H, W\)"):
        net.forward_streaming(torch.rand(1, 4, 16, 16))
    with pytest.raises(ValueError, match="non-finite"):
        net.forward_streaming(torch.full((1, 3, 16, 16), float("nan")))
    with pytest.raises(TypeError, match="band_rows"):
        net.forward_streaming(torch.rand(1, 3, 16, 16), band_rows=8.0)
    with pytest.raises(TypeError, match="x: expected a floating-point"):
        net.forward_streaming(torch.ones(1, 3, 16, 16, dtype=torch.int64))


# ---------------------------------------------------------------------------------------------
# Peak memory, measured in fresh processes
# ---------------------------------------------------------------------------------------------
_MEMORY_CHILD = """
import json, sys, torch
from benchmarks.memory import cpu_peak_bytes_here
from sparse_attn.models import DRSformer
from sparse_attn import streaming
torch.set_num_threads(1)
height, width, how = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
torch.manual_seed(0)
net = DRSformer(dim=16, num_blocks=(1, 1, 1, 1), heads=(1, 2, 4, 8)).eval()
x = torch.rand(1, 3, height, width)
step = (lambda: net.forward_streaming(x, band_rows=16)) if how == "streaming" else (lambda: net(x))
with torch.no_grad():
    peak = cpu_peak_bytes_here(step)
print(json.dumps({"peak": peak, "predicted": streaming.predicted_peak_bytes(net, x.shape, x.dtype, 16),
                  "kept": 4 * streaming.kept_elements(net, 1, height, width)}))
"""


def _measure(height, width, how):
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0",
               PYTHONPATH=os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])))
    done = subprocess.run([sys.executable, "-c", _MEMORY_CHILD, str(height), str(width), how], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the peak RSS from /proc (Linux)")
def test_peak_memory_grows_only_with_the_kept_maps():
    """DRSformer (dim 16, MEFC) at 64 and 512 rows of 64 columns, bands of 16 rows: the streaming
    peak grows by no more than the whole maps it keeps (the band working set is the same at both
    sizes) and stays within the prediction that ``max_memory`` relies on; forward's grows by its
    full-resolution hidden maps, several times more, which is what a regression would show."""
    small, large = _measure(64, 64, "streaming"), _measure(512, 64, "streaming")
    forward_small, forward_large = _measure(64, 64, "forward"), _measure(512, 64, "forward")
    growth = large["peak"] - small["peak"]
    kept_growth = large["kept"] - small["kept"]
    assert growth <= 1.1 * kept_growth + 2 * 2**20, f"streaming grew {growth / 2**20:.1f} MiB, kept maps " \
                                                     f"{kept_growth / 2**20:.1f} MiB"
    assert large["peak"] <= large["predicted"], f"{large['peak'] / 2**20:.1f} MiB measured, " \
                                                f"{large['predicted'] / 2**20:.1f} MiB predicted"
    forward_growth = forward_large["peak"] - forward_small["peak"]
    assert forward_growth >= 4 * growth, f"forward grew {forward_growth / 2**20:.1f} MiB, streaming " \
                                         f"{growth / 2**20:.1f} MiB"


def test_empty_batch_as_forward():
    net = build("restormer", torch.float32)
    x = torch.rand(0, 3, 16, 12)
    with torch.no_grad():
        assert net.forward_streaming(x).shape == net(x).shape == (0, 3, 16, 12)


def test_progress_bar_counts_every_band(capsys):
    """progress=True: a bar on stderr that ends at the number of bands walked (band_steps, so a
    walk added to the schedule but not to the count fails); False, and None when stderr is not a
    terminal (as under pytest): nothing."""
    net = build("drsformer", torch.float32)
    x = torch.rand(1, 3, 13, 12)
    total = streaming.band_steps(net, 16, 8)
    # 16 padded rows in bands of 8: 2, 1, 1 and 1 bands at levels 1 to 4. Three walks per block
    # (one block per level), the two MEFCs' gate group and 4 expert layers at level 1, the
    # embedding, last up-sampling and output at level 1, three down-samplings and two merges.
    assert total == 3 * (2 + 1 + 1 + 1 + 1 + 1 + 2) + 2 * (1 + 4) * 2 + 3 * 2 + (1 + 1 + 1) + (1 + 1)
    with torch.no_grad():
        net.forward_streaming(x, band_rows=8, progress=True)
        assert f"{total}/{total}" in capsys.readouterr().err
        for quiet in (False, None):
            net.forward_streaming(x, band_rows=8, progress=quiet)
            assert capsys.readouterr().err == ""
    with pytest.raises(TypeError, match="progress"):
        net.forward_streaming(x, progress="yes")


def test_alformer_refuses_saying_why():
    """ALformer's squeeze-and-excitation gates have no band rule: a NotImplementedError that names
    them, from the method and from the module function alike; other modules are refused too."""
    net = ALformer(n_feat=8).eval()
    x = torch.rand(1, 3, 32, 32)
    with pytest.raises(NotImplementedError, match="squeeze-and-excitation gates"):
        net.forward_streaming(x)
    with pytest.raises(NotImplementedError, match="squeeze-and-excitation gates"):
        streaming.forward_streaming(net, x)
    with pytest.raises(NotImplementedError, match="not Conv2d"):
        streaming.forward_streaming(torch.nn.Conv2d(3, 3, 1), x)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["DRSformer", "Restormer"])
def test_default_networks_equal_forward(name):
    """The default configurations (dim 48, the official depths and heads), float32, 70x52 in bands
    of 16 rows: the full-width channel counts and every level's block count."""
    torch.manual_seed(0)
    net = getattr(sparse_attn.models, name)().eval()
    compare(net, torch.rand(1, 3, 70, 52), "auto", [16])
