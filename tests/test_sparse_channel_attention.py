"""sparse_channel_attention on the reference and native CPU backends: native against the
float64 reference (DESIGN.md §1), the reference against the official DRSformer formula, autograd,
torch.library and compile, the modules against the official ones, backend selection and input
checks. (Triton: test_sparse_channel_attention_triton.py; CUDA: ..._gpu.py.)"""
import pytest
import torch

import sparse_attn
from benchmarks.official import DRSformerAttention, RestormerAttention, drsformer_attention
from helpers import compiled_once, forward_and_grads, opcheck_every_custom_op
from sparse_attn import backends
from sparse_attn.nn import ChannelAttention, TopKChannelAttention, drsformer_topk
from sparse_attn.reference import sparse_channel_attention as reference
from sparse_attn.reference.sparse_channel_attention import stable_descending_ranks
from sparse_channel_attention_cases import (NAMES, assert_matches_reference, attention, make_inputs,
                                            with_ties_and_zero_channels)

CPU_BACKENDS = [b for b in ("native",) if b in backends.available("cpu")]


# ---------------------------------------------------------------------------------------------
# Backends against the reference
# ---------------------------------------------------------------------------------------------
SHAPES = [  # (batch, heads, d, N): DRSformer's d = 48 and 96, a small odd d, N off every block
    (1, 1, 48, 1000),
    (2, 2, 48, 8192 + 777),  # more than one deterministic slab
    (1, 2, 96, 333),
    (3, 1, 7, 61),
]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_matches_reference_drsformer_branches(backend, shape, dtype):
    inputs = make_inputs(*shape)
    assert_matches_reference(backend, inputs, drsformer_topk(shape[2]), "softmax", dtype)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("activation", ["relu2", ("softmax", "relu2", "relu2")])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_matches_reference_relu2_and_mixed_branches(backend, activation, dtype):
    inputs = make_inputs(2, 2, 12, 500, branches=3)
    assert_matches_reference(backend, inputs, (8, 8, 3), activation, dtype)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("layout", ["transposed", "chunked"])
def test_non_contiguous_inputs(backend, layout):
    inputs = make_inputs(2, 2, 16, 300, layout=layout)
    assert not inputs[0].is_contiguous()
    assert_matches_reference(backend, inputs, drsformer_topk(16), "softmax", torch.float64)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_ties_and_zero_channel(backend, dtype):
    """Every backend must select the same entries in tied rows (lower index wins)."""
    inputs = with_ties_and_zero_channels(make_inputs(2, 1, 10, 200))
    assert_matches_reference(backend, inputs, (5, 6, 7, 8), "softmax", dtype)
    assert_matches_reference(backend, inputs, (5, 6, 7, 8), "relu2", dtype)


def test_tie_rule_is_a_stable_descending_sort():
    scores = torch.tensor([[1.0, 3.0, 3.0, 0.0, 3.0], [0.0, 0.0, 0.0, 0.0, 0.0]])
    assert stable_descending_ranks(scores).tolist() == [[3, 0, 1, 4, 2], [0, 1, 2, 3, 4]]
    # Two kept out of three tied maxima: the two with the lowest column index.
    v = torch.eye(5, dtype=torch.float64).reshape(1, 1, 5, 5)
    q = torch.zeros(1, 1, 5, 5, dtype=torch.float64)  # all scores 0: every row is one big tie
    out = reference(q, q, v, torch.ones(1, dtype=torch.float64), torch.ones(1, dtype=torch.float64), (2,), ("softmax",))
    assert out[0, 0, 0].tolist() == [0.5, 0.5, 0.0, 0.0, 0.0]
    for backend in CPU_BACKENDS:
        got = sparse_attn.sparse_channel_attention(q, q, v, torch.ones(1, dtype=torch.float64),
                                                   torch.ones(1, dtype=torch.float64), (2,), backend=backend)
        assert torch.equal(got, out), backend


@pytest.mark.parametrize("backend", ["reference"] + CPU_BACKENDS)
def test_gradcheck_float64(backend):
    inputs = make_inputs(2, 2, 5, 4, branches=3)

    def f(*args):
        return sparse_attn.sparse_channel_attention(*args, (2, 4, 5), ("softmax", "relu2", "softmax"), backend=backend)

    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-7)


def test_reference_matches_official_drsformer_formula():
    """On tie-free inputs (where torch.topk's unspecified tie order cannot matter) the reference
    is the official DRSformer computation, forward and every gradient."""
    inputs = make_inputs(2, 2, 48, 400)
    topk = drsformer_topk(48)
    grad = torch.randn(2, 2, 48, 400, dtype=torch.float64)
    out, *grads = forward_and_grads(attention("reference", topk), inputs, grad)
    official, *official_grads = forward_and_grads(lambda *a: drsformer_attention(*a, topk), inputs, grad)
    torch.testing.assert_close(out, official, rtol=0, atol=1e-12)
    for name, x, y in zip(NAMES[1:], grads, official_grads):
        torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-12, msg=name)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_deterministic_across_runs_and_thread_counts(backend):
    inputs = make_inputs(1, 1, 48, 3 * 8192 + 5, dtype=torch.float32)
    call = attention(backend, drsformer_topk(48))
    grad = torch.randn(1, 1, 48, 3 * 8192 + 5)
    first = forward_and_grads(call, inputs, grad)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = forward_and_grads(call, inputs, grad)
    finally:
        torch.set_num_threads(threads)
    again = forward_and_grads(call, inputs, grad)
    for name, x, y, z in zip(NAMES, first, again, single):
        assert torch.equal(x, y) and torch.equal(x, z), name


# ---------------------------------------------------------------------------------------------
# torch.library and torch.compile
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_opcheck(backend):
    inputs = make_inputs(2, 2, 8, 37, dtype=torch.float32, branches=2)
    checked = opcheck_every_custom_op(attention(backend, (3, 8), ("softmax", "relu2")), inputs)
    assert len(checked) == 2, checked  # the forward and the backward op


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_torch_compile_op_forward_backward_no_recompile_for_new_size(backend):
    call = attention(backend, (3, 5, 7, 8))
    with compiled_once(call) as compiled:
        for n in (99, 84, 80):
            inputs = make_inputs(2, 2, 8, n, dtype=torch.float32)
            grad = torch.randn(2, 2, 8, n)
            want, got = forward_and_grads(call, inputs, grad), forward_and_grads(compiled, inputs, grad)
            torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)
            for name, x, y in zip(NAMES[1:], got[1:], want[1:]):
                torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_torch_compile_module(backend, request):
    """Inference: one compilation for every image size. Training: runs and matches eager (there
    torch 2.14's inductor specialises H and W in the convolutions' backward, not in our op)."""
    # torch 2.14's inductor fails on a convolution after the op under symbolic H, W ("cannot
    # determine truth value of Relational") when it may re-layout convolutions; the reference
    # backend fails the same way, so it is not the op's doing.
    layout = torch._inductor.config.patch(layout_optimization=False)
    layout.__enter__()
    request.addfinalizer(lambda: layout.__exit__(None, None, None))
    module = TopKChannelAttention(16, 2, bias=False, backend=backend)
    with compiled_once(module) as compiled, torch.no_grad():
        for h, w in [(9, 11), (12, 7), (5, 16)]:
            x = torch.randn(2, 16, h, w)
            torch.testing.assert_close(compiled(x), module(x), rtol=1e-5, atol=1e-6)
    x = torch.randn(2, 16, 6, 7, requires_grad=True)
    (grad_compiled,) = torch.autograd.grad(compiled(x).square().sum(), x)
    (grad_eager,) = torch.autograd.grad(module(x).square().sum(), x)
    torch.testing.assert_close(grad_compiled, grad_eager, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Modules: official state_dicts load and give the official outputs
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["reference"] + CPU_BACKENDS)
@pytest.mark.parametrize("ours, official", [(TopKChannelAttention, DRSformerAttention),
                                            (ChannelAttention, RestormerAttention)])
def test_module_loads_official_state_dict(backend, ours, official):
    dim, heads = 96, 2
    reference_module = official(dim, heads, bias=True).double()
    with torch.no_grad():  # move every parameter off its initial value
        for p in reference_module.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    module = ours(dim, heads, bias=True, backend=backend).double()
    module.load_state_dict(reference_module.state_dict(), strict=True)
    x = torch.randn(2, dim, 13, 11, dtype=torch.float64)
    torch.testing.assert_close(module(x), reference_module(x), rtol=0, atol=1e-12)


def test_module_honours_use_backend():
    module = TopKChannelAttention(8, 1, bias=False)
    x = torch.randn(1, 8, 4, 4, dtype=torch.float16)  # float16 on CPU: only `reference` runs it
    module.half()
    with sparse_attn.use_backend("reference"):
        assert module(x).dtype == torch.float16
    if "native" in CPU_BACKENDS:
        with sparse_attn.use_backend("native"), pytest.raises(backends.BackendUnavailable, match="float16"):
            module(x)
    explicit = TopKChannelAttention(8, 1, bias=False, backend="reference").half()
    with sparse_attn.use_backend("native"):  # an explicit backend= wins over the context
        assert explicit(x).shape == x.shape


# ---------------------------------------------------------------------------------------------
# Backend selection and input checking
# ---------------------------------------------------------------------------------------------
def test_backend_selection():
    assert {"reference"} <= set(backends.available())
    x = torch.randn(1, 1, 4, 4)
    args = (x, x, x, torch.ones(1), torch.ones(1), (4,))
    op = sparse_attn.sparse_channel_attention
    expected = "native" if CPU_BACKENDS else "reference"
    assert backends.explain(op, *args).chosen == expected
    with sparse_attn.use_backend("reference"):
        assert backends.explain(op, *args).chosen == "reference"
    assert backends.explain(op, *args).chosen == expected
    with pytest.raises(ValueError, match="backend"):
        op(*args, backend="cudnn")
    with pytest.raises(ValueError, match="backend"):
        with sparse_attn.use_backend("fast"):
            pass


def _good():
    q, k, v, t, w = make_inputs(1, 2, 8, 10, dtype=torch.float32)
    return dict(q=q, k=k, v=v, temperature=t, weights=w, topk=(4, 5, 6, 8))


@pytest.mark.parametrize("change, error, match", [
    (dict(q=torch.randn(2, 8, 10)), ValueError, "q: expected shape"),
    (dict(k=torch.randn(1, 2, 8, 11)), ValueError, "k: expected the shape"),
    (dict(v=torch.randn(1, 2, 8, 10, dtype=torch.float64)), TypeError, "v: expected q's dtype"),
    (dict(q=torch.ones(1, 2, 8, 10, dtype=torch.int64)), TypeError, "q: expected a floating"),
    (dict(temperature=torch.ones(3)), ValueError, "temperature: expected 2 values"),
    (dict(topk=(4, 5, 6, 9)), ValueError, r"topk\[3\] = 9 is outside 1..d"),
    (dict(topk=(0, 5, 6, 8)), ValueError, r"topk\[0\] = 0"),
    (dict(topk=(4, 5, 6)), ValueError, "weights: expected 3 values"),
    (dict(topk=(4.0, 5, 6, 8)), TypeError, r"topk\[0\]: expected an integer"),
    (dict(weights=torch.ones(4, device="meta")), ValueError, "weights: expected q's device"),
    (dict(activation="gelu"), ValueError, r"activation\[0\]"),
    (dict(activation=("softmax", "relu2")), ValueError, "activation: expected one name or 4"),
    (dict(q=torch.randn(1, 2, 8, 0)), ValueError, "non-empty"),
])
def test_input_errors_name_the_argument(change, error, match):
    args = {**_good(), **change}
    if args["q"].shape != (1, 2, 8, 10) and "k" not in change and "v" not in change:
        args["k"] = args["v"] = args["q"]
    with pytest.raises(error, match=match):
        sparse_attn.sparse_channel_attention(**args)


def test_module_rejects_bad_configuration_and_input():
    with pytest.raises(ValueError, match="num_heads"):
        TopKChannelAttention(10, 4, bias=False)
    with pytest.raises(ValueError, match="x: expected"):
        TopKChannelAttention(8, 2, bias=False)(torch.randn(1, 6, 4, 4))
