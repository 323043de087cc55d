"""pytest-benchmark: the suite's cases at small size, for regression tracking.

    pytest benchmarks/ --benchmark-only [--benchmark-autosave | --benchmark-compare]

Not part of ``make test`` (which collects ``tests/`` only). Compiled baselines are left out:
their compile time would dominate a small case. A variant that cannot run here is skipped
with its reason.
"""
import pytest
import torch

from benchmarks import attention, blocks, models, msfn
from benchmarks.case import COMPILED

SMALL = [("attention", attention.make_case(attention.level_spec(op, level, 64, compile=False)))
         for op in attention.OPS for level in (1, 4)]
SMALL += [("msfn", msfn.make_case(msfn.level_spec(part, 1, 32, compile=False))) for part in msfn.PARTS]
SMALL += [("blocks", blocks.make_case(blocks.level_spec(part, 1, 32, compile=False))) for part in blocks.PARTS]
SMALL += [("models", models.make_case(models.spec(name, mode, 32, compile=False)))
          for name in models.MODELS for mode in models.MODES]
PARAMS = [pytest.param(case, variant, id=f"{case.name} {case.shape} {variant.backend}")
          for _, case in SMALL for variant in case.variants if variant.role != COMPILED]


@pytest.mark.parametrize("case, variant", PARAMS)
@pytest.mark.parametrize("mode", ["inference", "train"])
def test_case(benchmark, case, variant, mode):
    if mode == "inference" and not case.time_forward or mode == "train" and not case.time_backward:
        pytest.skip(f"{case.name} is not timed in {mode} mode")
    try:
        step = case.step(variant, torch.device("cpu"), mode)
        step()
    except Exception as exc:  # a backend that cannot run on CPU: the skip says why
        pytest.skip(f"{variant.backend} cannot run: {type(exc).__name__}: {str(exc).splitlines()[0][:150]}")
    benchmark.group = f"{case.name} {case.shape} {mode}"
    if case.group == "models":  # seconds per call on CPU even at 32²: a few rounds, not pytest-benchmark's many
        benchmark.pedantic(step, rounds=3, iterations=1, warmup_rounds=1)
    else:
        benchmark(step)
