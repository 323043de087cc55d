"""The `triton` backend of block_sparse_attention (DESIGN.md §4): on CPU tensors in Triton's
interpreter (TRITON_INTERPRET=1, set by conftest.py) against the dense masked attention, forward
and the gradients of q, k, v; fp16; determinism; torch.library; the errors of a backend that
cannot run. Sizes are small: the interpreter runs each program in numpy."""
import pytest
import torch

import sparse_attn
from block_sparse_attention_cases import CASES, NAMES, assert_matches_dense, case_id, inputs, op_fn
from helpers import assert_deterministic, opcheck_every_custom_op
from sparse_attn import backends

TRITON_CPU = backends.why_unavailable("triton", "cpu")
requires_triton_cpu = pytest.mark.skipif(TRITON_CPU is not None, reason=f"triton on CPU tensors: {TRITON_CPU}")
pytest.importorskip("sparse_attn.kernels.block_sparse_attention", reason="Triton is not installed")

# Every case of the native tests: both tile sides (16 and 64 pixels), padded regions (6 pixels),
# t = 1, t = R, odd R, several images and heads, odd d. The interpreter is slow: the fast tier
# runs t = 1, t = R with several heads, and 8 x 8 regions (BLOCK_P = 64) with d = 16.
_FAST = (CASES[0], CASES[2], CASES[4])
TRITON_CASES = [c if c in _FAST else pytest.param(c, marks=pytest.mark.slow) for c in CASES]


@requires_triton_cpu
@pytest.mark.parametrize("case", TRITON_CASES, ids=[case_id(c) for c in CASES])
def test_matches_dense_masked_attention(case):
    assert_matches_dense("triton", case, torch.float32)


@requires_triton_cpu
def test_float16_within_the_float16_reference_error():
    assert_matches_dense("triton", CASES[0], torch.float16)


@requires_triton_cpu
def test_deterministic():
    (q, k, v), key_blocks = inputs((1, 2, 4, 8, 8, (4, 4), 2), torch.float32)
    assert_deterministic(op_fn("triton", key_blocks, 4), [q, k, v], torch.randn(q.shape), NAMES[1:])


@requires_triton_cpu
def test_opcheck():
    (q, k, v), key_blocks = inputs((1, 2, 4, 4, 6, (2, 3), 2), torch.float32)
    checked = opcheck_every_custom_op(op_fn("triton", key_blocks, (2, 3)), [q, k, v])
    assert checked == ["sparse_attn.block_sparse_attention_triton_backward.default",
                       "sparse_attn.block_sparse_attention_triton_forward.default"]


@requires_triton_cpu
def test_what_the_kernels_cannot_run_is_said():
    (q, k, v), key_blocks = inputs((1, 1, 65, 8, 8, (4, 4), 2), torch.float32)
    with pytest.raises(backends.BackendUnavailable, match="at most 64 channels per head, got d = 65"):
        sparse_attn.block_sparse_attention(q, k, v, key_blocks, 4, backend="triton")
    (q, k, v), key_blocks = inputs((1, 1, 4, 8, 16, (8, 16), 1), torch.float32)
    with pytest.raises(backends.BackendUnavailable, match="regions of at most 64 pixels, got 8 x 16"):
        sparse_attn.block_sparse_attention(q, k, v, key_blocks, (8, 16), backend="triton")
    (q, k, v), key_blocks = inputs(CASES[0], torch.float64)
    with pytest.raises(backends.BackendUnavailable, match="float32, float16"):
        sparse_attn.block_sparse_attention(q, k, v, key_blocks, 4, backend="triton")
