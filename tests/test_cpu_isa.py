"""The CPU kernels' instruction-set clones (csrc/cpu/isa.h): the AVX2 clone gives the very bits of
the AVX-512 one (outputs and input gradients; the depthwise kernels' weight gradients are summed
in another order there, csrc/cpu/window_correlation.h, and agree to rounding), and the portable
clone (which rounds a*b+c twice where the others fuse it) agrees to rounding. Each clone runs in a
subprocess whose SPARSE_ATTN_CPU_ISA caps the choice (the kernels decide once per process); this
file is also that subprocess's script."""
import os
import subprocess
import sys

import pytest
import torch

import sparse_attn
from sparse_attn import backends

NATIVE_CPU = backends.why_unavailable("native", "cpu")
pytestmark = pytest.mark.skipif(NATIVE_CPU is not None, reason=f"native backend: {NATIVE_CPU}")


def _cpu_flags():
    try:
        with open("/proc/cpuinfo") as f:
            return set(next(line for line in f if line.startswith("flags")).split(":")[1].split())
    except (OSError, StopIteration):
        return set()


def _outputs_and_grads():
    """Every CPU kernel with an ISA clone on odd sizes, float32 and float64: {name: [out, grads...]}."""
    g = torch.Generator().manual_seed(1)

    def randn(*shape, dtype):
        return torch.randn(*shape, generator=g, dtype=dtype).requires_grad_()

    def record(name, out, inputs):
        results[name] = [t.detach() for t in [out, *torch.autograd.grad(out, inputs, out.detach() + 1)]]

    results = {}
    for dtype in (torch.float32, torch.float64):
        x, w, b = randn(2, 6, 37, 41, dtype=dtype), randn(6, dtype=dtype), randn(6, dtype=dtype)
        record(f"layer_norm2d {dtype}", sparse_attn.layer_norm2d(x, w, b, backend="native"), (x, w, b))
        # 13 columns: narrower than one block of running sums on every clone (cpu/window_correlation.h)
        for act, width in (("gelu", 41), ("relu2", 41), ("identity", 41), ("prelu", 41), ("gelu", 13)):
            x, w = randn(2, 8, 37, width, dtype=dtype), randn(8, 1, 3, 3, dtype=dtype)
            slope = randn(1, dtype=dtype) if act == "prelu" else None
            out = sparse_attn.gated_dwconv(x, w, None, act, slope, backend="native")
            record(f"gated_dwconv {act} w{width} {dtype}", out, (x, w) + ((slope,) if slope is not None else ()))
        x = randn(2, 8, 37, 41, dtype=dtype)
        ws = [randn(8, 1, 3, 3, dtype=dtype), randn(8, 1, 5, 5, dtype=dtype), randn(4, 2, 3, 3, dtype=dtype),
              randn(4, 2, 5, 5, dtype=dtype)]
        record(f"mixed_scale_dwconv {dtype}", sparse_attn.mixed_scale_dwconv(x, *ws, backend="native"), [x, *ws])
        # 75 columns: the AVX-512 float forward's unmasked blocks too (K = 7, dilation 3 reaches 9);
        # 16 and 5: rows that fill one AVX-512 block of running sums, and fewer than an AVX2 one
        for k, dilation, width in ((3, 1, 41), (7, 2, 41), (5, 3, 41), (3, 1, 75), (7, 3, 75), (3, 1, 16),
                                   (5, 1, 5)):
            x, w, b = randn(2, 5, 37, width, dtype=dtype), randn(5, 1, k, k, dtype=dtype), randn(5, dtype=dtype)
            record(f"depthwise_conv2d {k}x{k} d{dilation} w{width} {dtype}",
                   sparse_attn.depthwise_conv2d(x, w, b, dilation, backend="native"), (x, w, b))
    return results


def _run_capped(isa, tmp_path):
    path = tmp_path / f"{isa}.pt"
    env = {**os.environ, "SPARSE_ATTN_CPU_ISA": isa}
    subprocess.run([sys.executable, __file__, str(path)], env=env, check=True, timeout=300)
    return torch.load(path)


@pytest.fixture(scope="module")
def widest():
    return _outputs_and_grads()


@pytest.mark.skipif(not {"avx512f", "avx512vl", "avx512bw", "avx512dq"} <= _cpu_flags(),
                    reason="this CPU has no AVX-512: the widest clone is the AVX2 one")
def test_avx2_clone_gives_the_avx512_clones_bits(widest, tmp_path):
    capped = _run_capped("avx2", tmp_path)
    for name, tensors in widest.items():
        for i, (a, b) in enumerate(zip(tensors, capped[name])):
            if i >= 2 and not name.startswith("layer_norm2d"):  # a weight's gradient: another order of sums
                _assert_agree_to_rounding(a, b, f"{name}, tensor {i}")
            else:
                assert torch.equal(a, b), f"{name}, tensor {i}: the AVX2 clone differs"


def _assert_agree_to_rounding(a, b, what):
    scale, eps = a.abs().max().item(), torch.finfo(a.dtype).eps
    assert (a - b).abs().max().item() <= 64 * eps * scale, f"{what}: the clones disagree beyond rounding"


@pytest.mark.skipif("avx2" not in _cpu_flags(), reason="this CPU has no AVX2: every call runs the portable clone")
def test_portable_clone_agrees_to_rounding(widest, tmp_path):
    capped = _run_capped("portable", tmp_path)
    differs = False
    for name, tensors in widest.items():
        for a, b in zip(tensors, capped[name]):
            _assert_agree_to_rounding(a, b, name)
            differs |= not torch.equal(a, b)
    assert differs, "no result changed: SPARSE_ATTN_CPU_ISA=portable did not reach the kernels"


if __name__ == "__main__":
    torch.save(_outputs_and_grads(), sys.argv[1])
