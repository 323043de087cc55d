"""Timing: the median time of a callable after warm-up, on CPU or CUDA.

CPU: ``torch.utils.benchmark.Timer`` (it runs the statement with the process's thread count and
handles the clock); each sample is a block of calls long enough to swamp the clock's
resolution. CUDA: ``triton.testing.do_bench`` (it flushes the L2 cache between calls), else
CUDA events around each call. Every time in the benchmarks goes through :func:`median_ms`.
"""
import math
import statistics
import time

import torch
import torch.utils.benchmark as torch_benchmark

MIN_BLOCK_S = 0.02  # a CPU sample shorter than this is dominated by timer overhead and noise
MIN_SAMPLES = 3     # the fewest samples a median is taken of, however long a call is


def median_ms(fn, device, repeat=5, budget_s=10.0):
    """Median milliseconds of one call of ``fn()`` after one warm-up call.

    repeat: the number of samples (on CPU; on CUDA do_bench decides); fewer when ``repeat``
    calls would exceed ``budget_s``, but never fewer than MIN_SAMPLES (or ``repeat`` if less),
    except that a call which alone takes longer than ``budget_s`` is timed once after warm-up.
    """
    device = torch.device(device)
    fn()  # warm-up: lazy initialisation, compilation, allocator growth
    _synchronize(device)
    start = time.perf_counter()
    fn()  # the first sample, and the estimate that sizes the rest
    _synchronize(device)
    first_s = time.perf_counter() - start
    if first_s > budget_s:
        samples = 1  # a call longer than the whole budget (a network's step on CPU): this one sample
    else:
        samples = min(repeat, max(MIN_SAMPLES, math.floor(budget_s / first_s)))
    if device.type == "cuda":
        return _cuda_median_ms(fn, samples)
    return _cpu_median_ms(fn, samples, first_s)


def _synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _cpu_median_ms(fn, samples, first_s):
    timer = torch_benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    number = max(1, math.ceil(MIN_BLOCK_S / max(first_s, 1e-9)))
    times = [first_s] if number == 1 else []
    times += [timer.timeit(number).median for _ in range(samples - len(times))]
    return statistics.median(times) * 1e3


def _cuda_median_ms(fn, samples):
    try:
        from triton.testing import do_bench
    except ImportError:
        do_bench = None
    if do_bench is not None:
        return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))
    times = []
    for _ in range(max(samples, 10)):
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(begin.elapsed_time(end))
    return statistics.median(times)


def copy_bandwidth_gbps(device, nbytes=1 << 28):
    """Achievable memory bandwidth of ``device`` in GB/s, measured by a device-to-device copy
    (it reads and writes ``nbytes`` each): the roof of the GPU roofline lines."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), device)
    return 2 * nbytes / (ms * 1e-3) / 1e9
