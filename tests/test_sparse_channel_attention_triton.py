"""The `triton` backend of sparse_channel_attention on CPU tensors, in Triton's interpreter
(TRITON_INTERPRET=1, set by conftest.py), against the float64 reference: forward and every
gradient. Sizes are small because the interpreter runs each program in numpy."""
import pytest
import torch

import sparse_attn
from attention_cases import assert_close_to_float64_reference, make_inputs, run, with_ties_and_zero_channels
from sparse_attn import backends
from sparse_attn.nn import drsformer_topk

pytestmark = pytest.mark.skipif("triton" not in backends.available("cpu"),
                                reason=backends.why_unavailable("triton", "cpu") or "")


@pytest.mark.parametrize("shape", [
    (2, 2, 48, 100),  # DRSformer's d; N is a multiple of no block; several splits and row blocks
    (1, 1, 96, 70),   # d padded to 128
    (3, 1, 7, 61),    # small odd d padded to 16
], ids=lambda s: "x".join(map(str, s)))
def test_matches_reference_drsformer_branches(shape):
    assert_close_to_float64_reference("triton", make_inputs(*shape), drsformer_topk(shape[2]), "softmax",
                                      torch.float32)


@pytest.mark.parametrize("activation", ["relu2", ("softmax", "relu2", "relu2")])
def test_matches_reference_relu2_and_mixed_branches(activation):
    inputs = make_inputs(2, 2, 12, 50, branches=3)
    assert_close_to_float64_reference("triton", inputs, (8, 8, 3), activation, torch.float32)


@pytest.mark.parametrize("layout", ["transposed", "chunked"])
def test_non_contiguous_inputs(layout):
    inputs = make_inputs(2, 2, 16, 40, layout=layout)
    assert not inputs[0].is_contiguous()
    assert_close_to_float64_reference("triton", inputs, drsformer_topk(16), "softmax", torch.float32)


@pytest.mark.parametrize("activation", ["softmax", ("relu2", "softmax", "relu2", "softmax")])
def test_ties_and_zero_channels(activation):
    inputs = with_ties_and_zero_channels(make_inputs(2, 1, 10, 45))
    assert_close_to_float64_reference("triton", inputs, (5, 6, 7, 8), activation, torch.float32)


def test_tie_rule_keeps_the_lower_column_index():
    """All scores 0: every row is one tie, so keeping 2 must keep columns 0 and 1, exactly."""
    v = torch.eye(5).reshape(1, 1, 5, 5)
    q = torch.zeros(1, 1, 5, 5)
    out = sparse_attn.sparse_channel_attention(q, q, v, torch.ones(1), torch.ones(1), (2,), backend="triton")
    assert out[0, 0].tolist() == [[0.5, 0.5, 0.0, 0.0, 0.0]] * 5


def test_float16_within_the_float16_reference_error():
    inputs = make_inputs(1, 2, 16, 40, branches=2)
    assert_close_to_float64_reference("triton", inputs, (8, 12), ("softmax", "relu2"), torch.float16)


def test_backward_is_deterministic():
    inputs = make_inputs(1, 1, 20, 150, dtype=torch.float32)
    first = run("triton", inputs, drsformer_topk(20))
    again = run("triton", inputs, drsformer_topk(20), grad_out=first[2])
    for x, y in zip((first[0], *first[1]), (again[0], *again[1])):
        assert torch.equal(x, y)


def test_unsupported_inputs_say_why():
    q = torch.randn(1, 1, 130, 8)
    with pytest.raises(backends.BackendUnavailable, match="at most 128 channels"):
        sparse_attn.sparse_channel_attention(q, q, q, torch.ones(1), torch.ones(1), (3,), backend="triton")
    for dtype in (torch.float64, torch.bfloat16):
        q = torch.randn(1, 1, 8, 8, dtype=dtype)
        with pytest.raises(backends.BackendUnavailable, match=str(dtype).replace("torch.", "")):
            sparse_attn.sparse_channel_attention(q, q, q, torch.ones(1, dtype=dtype), torch.ones(1, dtype=dtype),
                                                 (3,), backend="triton")
