"""The GPU backends of patch_attention (DESIGN.md §3; `triton` and the `native` CUDA kernels) against the
reference run on the GPU: the output and the gradients of q and of every key and value level, in
float64 (the floor only) and float32 (the rule of tests/helpers.py); dense and topk ∈ {1, 5, M}
(M up to the kernels' heap of 64 keys, else 64) with ties; odd sizes, tiny maps, levels of unequal
size, zero-norm key patches, more channels than a warp has lanes and than one launch takes;
determinism; the statistics against the CPU op; torch.library; gradcheck; the kernels' limits.
Skipped where there is no CUDA device."""
import os

import pytest
import torch

import sparse_attn
from helpers import assert_deterministic, opcheck_every_custom_op, requires_cuda, skip_unless_runs
from patch_attention_cases import (SHAPES, TIES_KEY_EPS, assert_backend_close, make_inputs, n_keys, names, op_fn,
                                   shape_id, split)
from sparse_attn import backends

pytestmark = [requires_cuda, pytest.mark.gpu]
GPU_BACKENDS = ("triton", "native")  # float64: native only (the triton cases skip, saying why)
CUDA_MAX_TOPK = 64  # the native kernels' per-query heap and Triton's rank slots

# Beyond SHAPES: Cq, Cv above 128 (several channels per lane, two channel groups per launch loop)
# and maps of several hundred pixels (many blocks of warps).
WIDE_SHAPE = (1, 133, 130, (5, 6), [(5, 6), (4, 5)])
LARGE_SHAPE = (2, 8, 6, (23, 29), [(23, 29), (20, 26), (17, 22)])
GPU_SHAPES = SHAPES + [WIDE_SHAPE, LARGE_SHAPE]


def topk_values(shape, dtype):
    """Dense, 1, 5, M (at most the heap). On LARGE_SHAPE in float32 only dense and 1: among ~1500
    keys per query the t-th and (t+1)-th scores come within float32's rounding for some query with
    a fair chance (gaps ~0.04 against errors ~1e-6, over 1334 queries), and the kernel and the
    float32 reference may then rightly keep different keys; float64 and the exact ties cover the
    rule."""
    m = n_keys(shape)
    if shape is LARGE_SHAPE and dtype == torch.float32:
        return [None, 1]
    return [None, 1, min(5, m), min(m, CUDA_MAX_TOPK)]


def cuda_inputs(shape, dtype=torch.float64, **kwargs):
    return [t.to("cuda", dtype) for t in make_inputs(shape, **kwargs)]


def require(backend, dtype=torch.float32):
    if backend == "triton" and os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("TRITON_INTERPRET=1: the compiled Triton kernels are not what would run")
    q, keys, values = split(cuda_inputs(SHAPES[0], dtype))
    skip_unless_runs(lambda: sparse_attn.patch_attention(q, keys, values, backend=backend))


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=shape_id)
def test_matches_reference(backend, shape, dtype):
    require(backend, dtype)
    for topk in topk_values(shape, dtype):
        assert_backend_close(backend, shape, dtype, topk, zero_keys=shape[3][0] >= 4, device="cuda")


# With ties the last level repeats the first (make_inputs): SHAPES[1] has M = 389 keys, SHAPES[3]
# M = 12 (topk = M). Dense float32 is left out as on the CPU (exact data make the float32
# reference's own error, the yardstick, unusually small).
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("shape, topk, dtype", [
    (SHAPES[1], None, torch.float64), (SHAPES[1], 1, torch.float64), (SHAPES[1], 5, torch.float64),
    (SHAPES[1], CUDA_MAX_TOPK, torch.float64), (SHAPES[3], 12, torch.float64),
    (SHAPES[1], 1, torch.float32), (SHAPES[1], 5, torch.float32), (SHAPES[1], CUDA_MAX_TOPK, torch.float32),
    (SHAPES[3], 12, torch.float32)], ids=str)
def test_with_ties(backend, shape, topk, dtype):
    require(backend, dtype)
    assert_backend_close(backend, shape, dtype, topk, ties=True, device="cuda")


def test_native_statistics_match_the_cpu_op():
    """The forward's saved statistics on CUDA and CPU: the same inverse norms and log-sum-exps,
    and with exactly tied scores the very same top-k threshold and last kept key."""
    require("native", torch.float64)
    if not backends.native_has_kernel("patch_attention_forward", "cpu"):
        pytest.skip("sparse_attn._C has no CPU patch_attention_forward")
    inputs = make_inputs(SHAPES[1], ties=True)
    q, keys, values = split(inputs)
    for topk in (0, 1, 5, CUDA_MAX_TOPK):
        cpu = torch.ops.sparse_attn.patch_attention_forward(q, keys, values, 10.0, topk, TIES_KEY_EPS)
        q_cuda, keys_cuda, values_cuda = split([t.cuda() for t in inputs])
        gpu = torch.ops.sparse_attn.patch_attention_forward(q_cuda, keys_cuda, values_cuda, 10.0, topk, TIES_KEY_EPS)
        for name, a, b in zip(("out", "key_inverse_norm", "lse", "threshold", "last_kept"), gpu, cpu):
            exact = name in ("threshold", "last_kept")
            torch.testing.assert_close(a.cpu(), b, rtol=0 if exact else 1e-13, atol=0 if exact else 1e-13,
                                       msg=f"{name}, topk={topk}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [SHAPES[1], WIDE_SHAPE], ids=shape_id)
def test_triton_half_precision(shape, dtype):
    require("triton", dtype)
    for topk in (None, 5):
        assert_backend_close("triton", shape, dtype, topk, device="cuda")


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("topk", [None, 7])
def test_deterministic(backend, topk):
    require(backend)
    inputs = cuda_inputs(LARGE_SHAPE, torch.float32)
    batch, _, cv, size, _ = LARGE_SHAPE
    grad = torch.randn(batch, cv, *size, device="cuda")
    assert_deterministic(op_fn(backend, 10.0, topk), inputs, grad, names(inputs)[1:])


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("topk", [None, 3])
def test_opcheck(backend, topk):
    require(backend)
    shape = (2, 3, 2, (3, 5), [(3, 5), (2, 4)])
    checked = opcheck_every_custom_op(op_fn(backend, 2.0, topk), cuda_inputs(shape, torch.float32))
    if backend == "native":
        assert checked == ["sparse_attn.patch_attention_backward.default",
                           "sparse_attn.patch_attention_forward.default"]


def test_native_gradcheck():
    require("native", torch.float64)
    shape = (2, 2, 3, (3, 4), [(3, 4), (2, 3)])
    inputs = [t.requires_grad_() for t in cuda_inputs(shape)]
    for topk in (None, 4):
        assert torch.autograd.gradcheck(op_fn("native", 1.5, topk), inputs, eps=1e-6, atol=1e-7)


def test_native_noncontiguous_inputs():
    require("native", torch.float64)
    inputs = cuda_inputs(SHAPES[1])
    want = op_fn("reference", 10.0, 5)(*inputs)
    strided = [t.transpose(2, 3).contiguous().transpose(2, 3) for t in inputs]
    strided[0] = inputs[0].to(memory_format=torch.channels_last)
    torch.testing.assert_close(op_fn("native", 10.0, 5)(*strided), want, rtol=0, atol=1e-12)


def test_native_limits_are_reported_not_crashed_on():
    require("native", torch.float64)
    q, keys, values = split(cuda_inputs(SHAPES[1]))
    with pytest.raises(backends.BackendUnavailable, match="at most 64 keys per query"):
        sparse_attn.patch_attention(q, keys, values, topk=CUDA_MAX_TOPK + 1, backend="native")
    over = backends.explain(sparse_attn.patch_attention, q, keys, values, topk=CUDA_MAX_TOPK + 1)
    assert over.chosen != "native" and "at most 64 keys per query" in over.reasons["native"]
    assert backends.explain(sparse_attn.patch_attention, q, keys, values, topk=CUDA_MAX_TOPK).reasons["native"] is None
    with pytest.raises(RuntimeError, match="topk of at most 64"):  # the C++ check, for direct calls
        torch.ops.sparse_attn.patch_attention_forward(q, keys, values, 10.0, CUDA_MAX_TOPK + 1, 1e-4)
    tiny = torch.randn(1, 2, 1, 1, device="cuda", dtype=torch.float64)
    with pytest.raises(backends.BackendUnavailable, match="at most 16 levels"):
        sparse_attn.patch_attention(tiny, [tiny] * 17, [tiny] * 17, backend="native")
