"""Memory: bytes saved for backward, peak memory of one step, and the largest image that fits.

- Saved bytes: ``torch.autograd.graph.saved_tensors_hooks`` sees every tensor autograd keeps for
  backward; each storage is counted once, whole (views of one buffer keep all of it alive), so
  the figure is device-independent and exact.
- Peak memory on CUDA: ``torch.cuda.max_memory_allocated`` around the step, in this process.
- Peak memory on CPU: there is no allocator statistic, so each case runs in a fresh subprocess
  (``python -m benchmarks.memory_child``, which rebuilds the case from its group and spec) that
  reads its own peak RSS around the step, minus its RSS just before. Linux lets the child reset
  its peak (``/proc/self/clear_refs``) after a warm-up step, and glibc is told to map every large
  buffer separately so that freed memory is returned and reused memory is seen; elsewhere the
  child falls back to ``ru_maxrss`` without the reset.
"""
import gc
import json
import os
import resource
import subprocess
import sys
import time

import torch

# glibc: serve every allocation of 64 KiB or more by its own mmap, so a freed tensor leaves the
# RSS at once and a later one cannot hide in it.
_CHILD_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
_CHILD_TIMEOUT_S = 1800


def child_env():
    """The environment of a memory-measuring child process: the allocator settings above, and
    the repository on PYTHONPATH so that ``benchmarks`` imports from any working directory."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return dict(os.environ, **_CHILD_ENV,
                PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))


def saved_bytes(fn):
    """Bytes autograd saves for backward while ``fn()`` runs (each storage once). Returns
    (bytes, fn's result); the result keeps the saved tensors alive until the caller drops it."""
    storages = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        # Keyed by address and device: a saved tensor stays alive in the graph, so no two live
        # storages share an address.
        storages[(storage.device, storage.data_ptr())] = storage.nbytes()
        # Detached: a saved output kept with its grad_fn would hold its own graph, a cycle
        # through C++ that no garbage collection frees (the step is not run backward here).
        return tensor.detach()

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        result = fn()
    return sum(storages.values()), result


# ---------------------------------------------------------------------------------------------
# Peak memory of one step
# ---------------------------------------------------------------------------------------------
def cuda_peak_bytes(step, device):
    """Peak bytes allocated on ``device`` by ``step()`` beyond what was allocated before it."""
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    step()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


def _proc_status_kib(pid, field):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak_rss():
    """Make the kernel's peak-RSS mark equal the current RSS; False where that is impossible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss_bytes():
    hwm = _proc_status_kib("self", "VmHWM")
    if hwm is not None:
        return hwm * 1024
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is bytes on macOS, KiB elsewhere
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def _current_rss_bytes():
    rss = _proc_status_kib("self", "VmRSS")
    return rss * 1024 if rss is not None else _peak_rss_bytes()


def cpu_peak_bytes_here(step, warmup=True):
    """In this process: peak RSS during ``step()`` minus the RSS just before it (after a
    warm-up step if ``warmup``). Where the peak cannot be reset, the process's peak so far
    (which the warm-up, doing the same work, makes about the step's) stands in."""
    if warmup:
        step()  # lazy initialisation and compilation are not the step's memory
        gc.collect()
    _reset_peak_rss()
    before = _current_rss_bytes()
    step()
    return _peak_rss_bytes() - before


def peak_bytes(case, variant, mode, device, warmup=True, limit_bytes=None):
    """Peak memory of one step of ``case`` (its variant named ``variant``) on ``device``.

    mode: "inference" (no-grad forward) or "train" (forward and backward).
    warmup: run one step before the measured one (compilation, lazy initialisation); worth
    leaving out only for eager steps that take minutes.
    limit_bytes: on CPU, stop the child as soon as its RSS passes this (the answer is then
    ``float("inf")``): the bisection of :func:`largest_square` must not run a case that cannot
    fit to the end.
    Raises RuntimeError with the child's error when the case cannot run.
    """
    device = torch.device(device)
    if device.type == "cuda":
        return peak_in_process(case, variant, mode, device, warmup)
    payload = {"group": case.group, "spec": case.spec, "variant": variant, "mode": mode, "device": str(device),
               "warmup": warmup}
    child = subprocess.Popen([sys.executable, "-m", "benchmarks.memory_child", json.dumps(payload)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env())
    deadline = time.monotonic() + _CHILD_TIMEOUT_S
    while child.poll() is None:
        rss_kib = _proc_status_kib(child.pid, "VmRSS")
        if limit_bytes is not None and rss_kib is not None and rss_kib * 1024 > limit_bytes:
            child.kill()
            child.communicate()
            return float("inf")
        if time.monotonic() > deadline:
            child.kill()
            child.communicate()
            raise RuntimeError(f"the memory subprocess ran past {_CHILD_TIMEOUT_S} s")
        time.sleep(0.05)
    out, err = child.communicate()
    answer = json.loads(out.strip().splitlines()[-1]) if out.strip() else {"error": err.strip()[-500:]}
    if "error" in answer:
        raise RuntimeError(answer["error"])
    return answer["peak_bytes"]


def peak_in_process(case, variant, mode, device, warmup=True):
    """Peak memory of one step of ``case`` in this process: the allocator's statistic on CUDA
    (``inf`` when the step runs out of memory), the RSS on CPU (meaningful in a fresh process)."""
    step = case.step(case.variant(variant), device, mode)
    if device.type == "cuda":
        try:
            if warmup:
                step()
            return cuda_peak_bytes(step, device)
        except torch.cuda.OutOfMemoryError:
            return float("inf")
    return cpu_peak_bytes_here(step, warmup)


def largest_square(case_at, variant, device, budget_bytes, warmup=False, low=64, high=8192, multiple=8):
    """The largest side s (a multiple of ``multiple``) such that the no-grad inference of the case
    ``case_at(s)`` peaks within ``budget_bytes``, by bisection over [low, high]. Returns
    (side, peak bytes at that side); side is None when even ``low`` does not fit."""
    # The child's RSS includes its own baseline (torch, the model), so it is stopped only when
    # it is well past the budget; whether a side fits is decided on the measured peak.
    limit = int(budget_bytes * 1.25) + 2**30

    def peak(side):
        return peak_bytes(case_at(side), variant, "inference", device, warmup, limit_bytes=limit)

    low_peak = peak(low)
    if low_peak > budget_bytes:
        return None, low_peak
    best = (low, low_peak)
    lo, hi = low // multiple, high // multiple
    while lo < hi:
        mid = (lo + hi + 1) // 2
        mid_peak = peak(mid * multiple)
        if mid_peak <= budget_bytes:
            lo, best = mid, (mid * multiple, mid_peak)
        else:
            hi = mid - 1
    return best
