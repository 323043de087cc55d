"""Property-based tests (hypothesis) of the attention, MSFN and depthwise ops on every backend:
over shapes (odd sizes, N and images that fill no block, B > 1), dtypes, strides, branch counts
and topk (attention), biases (MSFN, depthwise), kernel sizes and dilations (depthwise), a backend
either agrees with the float64 reference, forward and every gradient, within the rule of
helpers.py, or refuses with BackendUnavailable saying why.

The dtypes drawn are those in which the rule measures the reference's own error (float32,
float16, bfloat16), so that a drawn case that is ill-conditioned (a gradient small by
cancellation, like the temperature's, which sums softmax's zero-sum rows) is judged against how
far the reference itself strays on it. In float64 the reference is the truth and the rule has only
its floor, calibrated on the fixed shapes of the unit tests, which cover float64.

Bounded and reproducible: a fixed number of examples per backend, derandomized, no example
database. The Triton interpreter runs programs in numpy, so its shapes are kept tiny."""
import re

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mixed_scale_dwconv_cases as msfn
import sparse_channel_attention_cases as attention
from block_ops_cases import DEPTHWISE_NAMES, depthwise_fn, depthwise_inputs
from helpers import assert_matches_float64_reference
from sparse_attn.backends import BACKENDS, BackendUnavailable
from sparse_attn.reference import depthwise_conv2d as reference_depthwise_conv2d

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
LOW_PRECISION = (torch.float16, torch.bfloat16)
# Examples per backend, and the largest sizes drawn (the interpreter's are tiny).
EXAMPLES = {"reference": 15, "native": 50, "triton": 10}
ATTENTION_MAX = {"reference": (24, 70), "native": (24, 70), "triton": (12, 24)}  # (d, N)
MSFN_MAX = {"reference": (6, 9), "native": (6, 9), "triton": (2, 5)}  # (h, H and W)


def bounded(backend):
    return settings(max_examples=EXAMPLES[backend], deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def assert_refusal_says_why(exc, backend, dtype, *facts):
    """A refusal names the backend and a reason: the dtype it does not take, or a limit it names."""
    message = str(exc)
    assert re.search(rf"backend '{backend}' cannot run here: \S", message), message
    reasons = (str(dtype).replace("torch.", ""), "channels", "interpret", "built", *map(str, facts))
    assert any(reason in message for reason in reasons), message


# ---------------------------------------------------------------------------------------------
# sparse_channel_attention
# ---------------------------------------------------------------------------------------------
@st.composite
def attention_cases(draw, backend):
    max_d, max_n = ATTENTION_MAX[backend]
    dtype = draw(st.sampled_from(DTYPES))
    # 129 channels: past the Triton kernels' 128, which they must refuse.
    d = draw(st.one_of(st.integers(1, max_d), st.just(129))) if backend == "triton" else draw(st.integers(1, max_d))
    branches = draw(st.integers(1, 4))
    # In float16/bfloat16 two scores a rounding apart swap places at a topk boundary, which no
    # tolerance can absorb: there every branch keeps the whole row.
    topk = (d,) * branches if dtype in LOW_PRECISION else tuple(draw(st.integers(1, d)) for _ in range(branches))
    return dict(
        dtype=dtype, batch=draw(st.integers(1, 3)), heads=draw(st.integers(1, 2)), d=d,
        # N >= 2: at N = 1 the normalisation's gradient is 0 analytically (q̂ = ±1), and each
        # backend leaves its own rounding noise of terms the size of 1/|q|: nothing to compare.
        n=draw(st.integers(2, max_n if d <= max_d else 8)), branches=branches, topk=topk,
        activation=tuple(draw(st.sampled_from(["softmax", "relu2"])) for _ in range(branches)),
        layout=draw(st.sampled_from(["contiguous", "transposed", "chunked"])), seed=draw(st.integers(0, 2**16)))


def _attention_agrees_or_refuses(backend, case):
    torch.manual_seed(case["seed"])
    inputs = attention.make_inputs(case["batch"], case["heads"], case["d"], case["n"], branches=case["branches"],
                                   layout=case["layout"])
    try:
        attention.assert_matches_reference(backend, inputs, case["topk"], case["activation"], case["dtype"])
    except BackendUnavailable as exc:
        assert_refusal_says_why(exc, backend, case["dtype"], case["d"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_sparse_channel_attention_agrees_with_reference_or_refuses(backend):
    @bounded(backend)
    @given(attention_cases(backend))
    def check(case):
        _attention_agrees_or_refuses(backend, case)

    check()


# ---------------------------------------------------------------------------------------------
# mixed_scale_dwconv
# ---------------------------------------------------------------------------------------------
@st.composite
def msfn_cases(draw, backend):
    max_h, max_side = MSFN_MAX[backend]
    shape = (draw(st.integers(1, 2)), 2 * draw(st.integers(1, max_h)), draw(st.integers(1, max_side)),
             draw(st.integers(1, max_side)))
    return dict(shape=shape, dtype=draw(st.sampled_from(DTYPES)), bias=draw(st.booleans()),
                layout=draw(st.sampled_from(["contiguous", "channels_last", "transposed", "channel_slice"])))


def _msfn_inputs(shape, bias, layout):
    """make_inputs' values, x (and in "transposed" the 3x3 weights too) in another layout."""
    x, *params = msfn.make_inputs(shape, torch.float64, bias)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    elif layout == "transposed":
        x = x.transpose(2, 3).contiguous().transpose(2, 3)
        params[0] = params[0].transpose(2, 3).contiguous().transpose(2, 3)
        params[2] = params[2].transpose(2, 3).contiguous().transpose(2, 3)
    elif layout == "channel_slice":  # the channels of a wider map: strides with gaps
        wide = torch.zeros(shape[0], 2 * shape[1], *shape[2:], dtype=torch.float64)
        wide[:, 1::2] = x
        x = wide[:, 1::2]
    return [x, *params]


@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_scale_dwconv_agrees_with_reference_or_refuses(backend):
    @bounded(backend)
    @given(msfn_cases(backend))
    def check(case):
        inputs = _msfn_inputs(case["shape"], case["bias"], case["layout"])
        try:
            msfn.assert_matches_reference(backend, inputs, case["dtype"])
        except BackendUnavailable as exc:
            assert_refusal_says_why(exc, backend, case["dtype"])

    check()


# ---------------------------------------------------------------------------------------------
# depthwise_conv2d
# ---------------------------------------------------------------------------------------------
DEPTHWISE_MAX = {"reference": (5, 20), "native": (5, 20), "triton": (2, 9)}  # (C, H and W)


@st.composite
def depthwise_cases(draw, backend):
    max_c, max_side = DEPTHWISE_MAX[backend]
    shape = (draw(st.integers(1, 2)), draw(st.integers(1, max_c)), draw(st.integers(1, max_side)),
             draw(st.integers(1, max_side)))
    return dict(shape=shape, kernel=draw(st.sampled_from((1, 3, 5, 7))), dilation=draw(st.integers(1, 3)),
                dtype=draw(st.sampled_from(DTYPES)), bias=draw(st.booleans()),
                layout=draw(st.sampled_from(["contiguous", "channels_last", "transposed"])))


@pytest.mark.parametrize("backend", BACKENDS)
def test_depthwise_conv2d_agrees_with_reference_or_refuses(backend):
    @bounded(backend)
    @given(depthwise_cases(backend))
    def check(case):
        x, weight, bias = depthwise_inputs(case["shape"], case["kernel"], torch.float64, case["bias"])
        if case["layout"] == "channels_last":
            x = x.to(memory_format=torch.channels_last)
        elif case["layout"] == "transposed":
            x = x.transpose(2, 3).contiguous().transpose(2, 3)
            weight = weight.transpose(2, 3).contiguous().transpose(2, 3)
        dilation = case["dilation"]
        truth = lambda x, w, b: reference_depthwise_conv2d(x, w, b, dilation)  # noqa: E731
        try:
            assert_matches_float64_reference(depthwise_fn(backend, dilation), truth, [x, weight, bias],
                                             case["dtype"], ("out",) + DEPTHWISE_NAMES)
        except BackendUnavailable as exc:
            assert_refusal_says_why(exc, backend, case["dtype"])

    check()
