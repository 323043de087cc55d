"""The sparse-attn benchmark suite (``make bench`` / ``python -m benchmarks --help``).

timing.py   medians after warm-up (torch.utils.benchmark on CPU, do_bench / CUDA events on GPU)
memory.py   bytes saved for backward, peak memory per step, the largest image within a budget
case.py     what a case is and how one is measured into table rows
official.py the official code (DRSformer's and Restormer's attention, MSFN, LayerNorm): the
            baselines here and in the tests
attention.py, msfn.py, models.py   the cases of each op and model (per sweep: quick, targets,
            full) and the issues' targets; their backends are sparse_attn.backends.BACKENDS
report.py   the table, the Targets section, CSV rows and plots
suite.py    one run, from cases to report
memory_child.py   the fresh process of a CPU peak measurement (rebuilds its case via suite)

Imports go one way: timing, memory <- case <- report <- the groups <- suite <- __main__,
memory_child.

``pytest benchmarks/ --benchmark-only`` (test_regression.py) runs the same cases at small size
with pytest-benchmark.
"""
