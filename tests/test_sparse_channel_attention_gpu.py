"""The GPU backends of sparse_channel_attention (`triton` and the `native` CUDA kernels) against
the float64 reference in fp32, fp16 and bf16, each within twice the reference's own error in that
dtype; determinism; torch.library checks and torch.compile. Skipped where there is no CUDA device."""
import os

import pytest
import torch

from helpers import compiled_once, forward_and_grads, opcheck_every_custom_op, requires_cuda
from sparse_attn.nn import drsformer_topk
from sparse_channel_attention_cases import (NAMES, assert_matches_reference, attention, make_inputs, why_unavailable,
                                            with_ties_and_zero_channels)

pytestmark = [requires_cuda, pytest.mark.gpu]
GPU_BACKENDS = ("triton", "native")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def require(backend, dtype=torch.float32):
    reason = why_unavailable(backend, dtype, device="cuda")
    if reason is not None:
        pytest.skip(reason)
    if backend == "triton" and os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("TRITON_INTERPRET=1: the compiled Triton kernels are not what would run")


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [
    (1, 1, 48, 128 * 128),  # DRSformer's first level at a 128² crop
    (2, 2, 48, 8192 + 777),
    (1, 2, 96, 4099),
    (3, 1, 7, 61),
    (1, 1, 128, 1000),      # the largest d of the Triton kernels
], ids=lambda s: "x".join(map(str, s)))
def test_matches_reference_drsformer_branches(backend, dtype, shape):
    require(backend, dtype)
    inputs = make_inputs(*shape, device="cuda")
    assert_matches_reference(backend, inputs, drsformer_topk(shape[2]), "softmax", dtype)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("activation", ["relu2", ("softmax", "relu2", "relu2")])
def test_matches_reference_relu2_and_mixed_branches(backend, dtype, activation):
    require(backend, dtype)
    inputs = make_inputs(2, 2, 12, 500, branches=3, device="cuda")
    assert_matches_reference(backend, inputs, (8, 8, 3), activation, dtype)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("layout", ["transposed", "chunked"])
def test_non_contiguous_inputs(backend, layout):
    require(backend, torch.float32)
    inputs = make_inputs(2, 2, 16, 300, layout=layout, device="cuda")
    assert not inputs[0].is_contiguous()
    assert_matches_reference(backend, inputs, drsformer_topk(16), "softmax", torch.float32)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("activation", ["softmax", "relu2"])
def test_ties_and_zero_channels(backend, activation):
    require(backend, torch.float32)
    inputs = with_ties_and_zero_channels(make_inputs(2, 1, 10, 200, device="cuda"))
    assert_matches_reference(backend, inputs, (5, 6, 7, 8), activation, torch.float32)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_forward_and_backward_are_bitwise_deterministic(backend, dtype):
    require(backend, dtype)
    inputs = make_inputs(2, 2, 48, 3 * 8192 + 5, dtype=dtype, device="cuda")
    call = attention(backend, drsformer_topk(48))
    grad = torch.randn(2, 2, 48, 3 * 8192 + 5, device="cuda", dtype=dtype)
    first, again = forward_and_grads(call, inputs, grad), forward_and_grads(call, inputs, grad)
    for name, x, y in zip(NAMES, first, again):
        assert torch.equal(x, y), name


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_opcheck(backend):
    require(backend, torch.float32)
    inputs = make_inputs(2, 2, 16, 77, dtype=torch.float32, branches=2, device="cuda")
    checked = opcheck_every_custom_op(attention(backend, (3, 16), ("softmax", "relu2")), inputs)
    assert len(checked) == 2, checked  # the forward and the backward op


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_torch_compile_fullgraph_without_recompiles(backend):
    require(backend, torch.float32)
    call = attention(backend, (3, 16), ("softmax", "relu2"))
    with compiled_once(call) as compiled:
        for n in (77, 100, 61):
            inputs = make_inputs(2, 2, 16, n, dtype=torch.float32, branches=2, device="cuda")
            grad = torch.randn(2, 2, 16, n, device="cuda")
            want, got = forward_and_grads(call, inputs, grad), forward_and_grads(compiled, inputs, grad)
            for name, x, y in zip(NAMES, got, want):
                torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6, msg=name)
