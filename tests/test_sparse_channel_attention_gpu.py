"""The GPU backends of sparse_channel_attention (`triton` and the `native` CUDA kernels) against
the float64 reference in fp32, fp16 and bf16, each within twice the reference's own error in that
dtype; determinism; torch.library checks and torch.compile. Skipped where there is no CUDA device."""
import os

import pytest
import torch

import sparse_attn
from attention_cases import assert_close_to_float64_reference, make_inputs, run, with_ties_and_zero_channels
from sparse_attn import backends
from sparse_attn.nn import drsformer_topk

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none here)")
GPU_BACKENDS = ("triton", "native")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def require(backend, dtype=torch.float32):
    q = torch.zeros(1, 1, 4, 8, device="cuda", dtype=dtype)
    reason = backends.explain(sparse_attn.sparse_channel_attention, q, q, q, q.new_ones(1), q.new_ones(1),
                              (4,)).reasons[backend]
    if reason is not None:
        pytest.skip(f"{backend}: {reason}")
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
    assert_close_to_float64_reference(backend, inputs, drsformer_topk(shape[2]), "softmax", dtype)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("activation", ["relu2", ("softmax", "relu2", "relu2")])
def test_matches_reference_relu2_and_mixed_branches(backend, dtype, activation):
    require(backend, dtype)
    inputs = make_inputs(2, 2, 12, 500, branches=3, device="cuda")
    assert_close_to_float64_reference(backend, inputs, (8, 8, 3), activation, dtype)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("layout", ["transposed", "chunked"])
def test_non_contiguous_inputs(backend, layout):
    require(backend, torch.float32)
    inputs = make_inputs(2, 2, 16, 300, layout=layout, device="cuda")
    assert not inputs[0].is_contiguous()
    assert_close_to_float64_reference(backend, inputs, drsformer_topk(16), "softmax", torch.float32)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("activation", ["softmax", "relu2"])
def test_ties_and_zero_channels(backend, activation):
    require(backend, torch.float32)
    inputs = with_ties_and_zero_channels(make_inputs(2, 1, 10, 200, device="cuda"))
    assert_close_to_float64_reference(backend, inputs, (5, 6, 7, 8), activation, torch.float32)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_forward_and_backward_are_bitwise_deterministic(backend, dtype):
    require(backend, dtype)
    inputs = make_inputs(2, 2, 48, 3 * 8192 + 5, dtype=dtype, device="cuda")
    topk = drsformer_topk(48)
    first = run(backend, inputs, topk)
    again = run(backend, inputs, topk, grad_out=first[2])
    for x, y in zip((first[0], *first[1]), (again[0], *again[1])):
        assert torch.equal(x, y)


def _op_args(dtype):
    q, k, v, temperature, weights = make_inputs(2, 2, 16, 77, dtype=dtype, branches=2, device="cuda")
    return (q, k, v, temperature.reshape(2), weights, [3, 16], [0, 1])


@pytest.mark.parametrize("op, backend", [("sparse_channel_attention_forward", "native"),
                                         ("sparse_channel_attention_triton_forward", "triton")])
def test_opcheck(op, backend):
    require(backend, torch.float32)
    torch.library.opcheck(getattr(torch.ops.sparse_attn, op).default, _op_args(torch.float32))


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_torch_compile_fullgraph(backend):
    require(backend, torch.float32)
    torch._dynamo.reset()
    q, k, v, temperature, weights, topk, activation = _op_args(torch.float32)

    def f(q, k, v):
        return sparse_attn.sparse_channel_attention(q, k, v, temperature, weights, topk, "softmax", backend=backend)

    compiled = torch.compile(f, fullgraph=True)
    out = compiled(q, k, v)
    torch.testing.assert_close(out, f(q, k, v), rtol=1e-5, atol=1e-6)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    expected = torch.autograd.grad(f(q, k, v).square().sum(), (q, k, v))
    for x, y in zip(grads, expected):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)
