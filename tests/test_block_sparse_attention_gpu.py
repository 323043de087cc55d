"""The GPU backends of block_sparse_attention (`triton` and the `native` CUDA kernels) against the
dense masked attention in float64, forward and the gradients of q, k, v, in fp32, fp16 and bf16
(and float64 on `native`), each within the rule of tests/helpers.py; determinism; torch.library.
Skipped where there is no CUDA device."""
import os

import pytest
import torch

import sparse_attn
from block_sparse_attention_cases import CASES, NAMES, assert_matches_dense, case_id, inputs, op_fn
from helpers import assert_deterministic, opcheck_every_custom_op, requires_cuda, skip_unless_runs

pytestmark = [requires_cuda, pytest.mark.gpu]
GPU_BACKENDS = ("triton", "native")
# The module's case: 8 x 8 regions, d = 16, t = R/4, several heads, next to the small cases.
GPU_CASES = CASES + [(2, 4, 16, 64, 64, (8, 8), 16)]


def require(backend, dtype=torch.float32):
    if backend == "triton" and os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("TRITON_INTERPRET=1: the compiled Triton kernels are not what would run")
    (q, k, v), key_blocks = inputs(CASES[0], dtype, device="cuda")
    skip_unless_runs(lambda: sparse_attn.block_sparse_attention(q, k, v, key_blocks, 4, backend=backend))


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", (torch.float32, torch.float16, torch.bfloat16), ids=str)
@pytest.mark.parametrize("case", GPU_CASES, ids=case_id)
def test_matches_dense_masked_attention(backend, dtype, case):
    require(backend, dtype)
    assert_matches_dense(backend, case, dtype, device="cuda")


@pytest.mark.parametrize("case", GPU_CASES, ids=case_id)
def test_native_float64(case):
    require("native", torch.float64)
    assert_matches_dense("native", case, torch.float64, device="cuda")


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_deterministic(backend):
    require(backend)
    (q, k, v), key_blocks = inputs(GPU_CASES[-1], torch.float32, device="cuda")
    assert_deterministic(op_fn(backend, key_blocks, 8), [q, k, v], torch.randn(q.shape, device="cuda"), NAMES[1:])


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_opcheck(backend):
    require(backend)
    (q, k, v), key_blocks = inputs((1, 2, 4, 4, 6, (2, 3), 2), torch.float32, device="cuda")
    assert opcheck_every_custom_op(op_fn(backend, key_blocks, (2, 3)), [q, k, v])


def test_native_gradcheck():
    require("native", torch.float64)
    (q, k, v), key_blocks = inputs((2, 2, 3, 4, 6, (2, 3), 2), device="cuda")
    leaves = [t.requires_grad_() for t in (q, k, v)]
    assert torch.autograd.gradcheck(op_fn("native", key_blocks, (2, 3)), leaves, eps=1e-6, atol=1e-7)
