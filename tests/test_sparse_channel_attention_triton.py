"""The `triton` backend of sparse_channel_attention on CPU tensors, in Triton's interpreter
(TRITON_INTERPRET=1, set by conftest.py), against the float64 reference: forward and every
gradient. Sizes are small because the interpreter runs each program in numpy."""
import pytest
import torch

import sparse_attn
from helpers import compiled_once, forward_and_grads, opcheck_every_custom_op
from sparse_attn import backends
from sparse_attn.nn import drsformer_topk
from sparse_channel_attention_cases import (NAMES, assert_matches_reference, attention, make_inputs, why_unavailable,
                                            with_ties_and_zero_channels)

TRITON_CPU = why_unavailable("triton")
pytestmark = pytest.mark.skipif(TRITON_CPU is not None, reason=str(TRITON_CPU))


@pytest.mark.parametrize("shape", [
    (2, 2, 48, 100),  # DRSformer's d; N is a multiple of no block; several splits and row blocks
    (1, 1, 96, 70),   # d padded to 128
    (3, 1, 7, 61),    # small odd d padded to 16
], ids=lambda s: "x".join(map(str, s)))
def test_matches_reference_drsformer_branches(shape):
    assert_matches_reference("triton", make_inputs(*shape), drsformer_topk(shape[2]), "softmax", torch.float32)


@pytest.mark.parametrize("activation", ["relu2", ("softmax", "relu2", "relu2")])
def test_matches_reference_relu2_and_mixed_branches(activation):
    inputs = make_inputs(2, 2, 12, 50, branches=3)
    assert_matches_reference("triton", inputs, (8, 8, 3), activation, torch.float32)


@pytest.mark.parametrize("layout", ["transposed", "chunked"])
def test_non_contiguous_inputs(layout):
    inputs = make_inputs(2, 2, 16, 40, layout=layout)
    assert not inputs[0].is_contiguous()
    assert_matches_reference("triton", inputs, drsformer_topk(16), "softmax", torch.float32)


@pytest.mark.parametrize("activation", ["softmax", ("relu2", "softmax", "relu2", "softmax")])
def test_ties_and_zero_channels(activation):
    inputs = with_ties_and_zero_channels(make_inputs(2, 1, 10, 45))
    assert_matches_reference("triton", inputs, (5, 6, 7, 8), activation, torch.float32)


def test_tie_rule_keeps_the_lower_column_index():
    """All scores 0: every row is one tie, so keeping 2 must keep columns 0 and 1, exactly."""
    v = torch.eye(5).reshape(1, 1, 5, 5)
    q = torch.zeros(1, 1, 5, 5)
    out = sparse_attn.sparse_channel_attention(q, q, v, torch.ones(1), torch.ones(1), (2,), backend="triton")
    assert out[0, 0].tolist() == [[0.5, 0.5, 0.0, 0.0, 0.0]] * 5


def test_float16_within_the_float16_reference_error():
    inputs = make_inputs(1, 2, 16, 40, branches=2)
    assert_matches_reference("triton", inputs, (8, 12), ("softmax", "relu2"), torch.float16)


def test_backward_is_deterministic():
    inputs = make_inputs(1, 1, 20, 150, dtype=torch.float32)
    call, grad = attention("triton", drsformer_topk(20)), torch.randn(1, 1, 20, 150)
    first, again = forward_and_grads(call, inputs, grad), forward_and_grads(call, inputs, grad)
    for name, x, y in zip(NAMES, first, again):
        assert torch.equal(x, y), name


def test_opcheck():
    inputs = make_inputs(2, 2, 8, 37, dtype=torch.float32, branches=2)
    checked = opcheck_every_custom_op(attention("triton", (3, 8), ("softmax", "relu2")), inputs)
    assert len(checked) == 2, checked  # the forward and the backward op


def test_compile_without_recompiles():
    """fullgraph under aot_eager, which runs the op's fake and autograd registrations with
    symbolic sizes (in the interpreter the op is an opaque custom op): one compilation for
    every N, forward and gradients equal to eager."""
    call = attention("triton", (3, 4), ("softmax", "relu2"))
    with compiled_once(call, backend="aot_eager") as compiled:
        for n in (20, 33, 7):
            inputs = make_inputs(2, 1, 8, n, dtype=torch.float32, branches=2)
            grad = torch.randn(2, 1, 8, n)
            want, got = forward_and_grads(call, inputs, grad), forward_and_grads(compiled, inputs, grad)
            for name, x, y in zip(NAMES, got, want):
                assert torch.equal(x, y), name


def test_unsupported_inputs_say_why():
    q = torch.randn(1, 1, 130, 8)
    with pytest.raises(backends.BackendUnavailable, match="at most 128 channels"):
        sparse_attn.sparse_channel_attention(q, q, q, torch.ones(1), torch.ones(1), (3,), backend="triton")
    for dtype in (torch.float64, torch.bfloat16):
        q = torch.randn(1, 1, 8, 8, dtype=dtype)
        with pytest.raises(backends.BackendUnavailable, match=str(dtype).replace("torch.", "")):
            sparse_attn.sparse_channel_attention(q, q, q, torch.ones(1, dtype=dtype), torch.ones(1, dtype=dtype),
                                                 (3,), backend="triton")
