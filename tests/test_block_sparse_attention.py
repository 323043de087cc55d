"""block_sparse_attention (DESIGN.md §4), reference and native CPU: against the dense masked
attention (full N × N scores, the non-selected regions at −∞), forward and the gradients of q, k,
v; t = R is dense attention; gradcheck, opcheck, torch.compile, determinism, what backward saves,
and the errors on bad input."""
import pytest
import torch
import torch.nn.functional as F

import sparse_attn
from benchmarks.memory import saved_bytes
from block_sparse_attention_cases import (CASES, NAMES, assert_matches_dense, case_id, dense_masked_attention, inputs,
                                          op_fn, random_key_blocks)
from helpers import assert_deterministic, compiled_once, forward_and_grads, opcheck_every_custom_op, why_not

BACKENDS = ["reference", "native"]
_SMALL = inputs(CASES[0])
NATIVE_CPU = why_not(lambda: sparse_attn.block_sparse_attention(*_SMALL[0], _SMALL[1], 4, backend="native"))
requires_native = pytest.mark.skipif(NATIVE_CPU is not None, reason=f"native backend: {NATIVE_CPU}")
_backends = [pytest.param(b, marks=requires_native) if b == "native" else b for b in BACKENDS]


# ---------------------------------------------------------------------------------------------
# Against the dense masked attention
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("backend", _backends)
def test_matches_dense_masked_attention(backend, case, dtype):
    assert_matches_dense(backend, case, dtype)


@pytest.mark.parametrize("backend", _backends)
def test_explicit_scale_and_non_contiguous_inputs(backend):
    case = (2, 2, 6, 8, 12, (4, 4), 3)
    assert_matches_dense(backend, case, torch.float64, scale=0.7)
    # (B, heads, d, H, W) views of other layouts: the width axis strided, heads and channels swapped
    assert_matches_dense(backend, case, torch.float64, transform=lambda t: t.transpose(-1, -2).contiguous().transpose(-1, -2))
    assert_matches_dense(backend, case, torch.float64, transform=lambda t: t.transpose(1, 2).contiguous().transpose(1, 2))


@pytest.mark.parametrize("backend", _backends)
def test_every_region_selected_is_dense_attention(backend):
    """t = R, in any order per row: plain softmax attention over every pixel."""
    batch, heads, d, height, width = 2, 3, 8, 8, 12
    (q, k, v), key_blocks = inputs((batch, heads, d, height, width, (4, 4), 6))
    flat = lambda x: x.reshape(batch, heads, d, -1).transpose(-1, -2)  # noqa: E731
    dense = F.scaled_dot_product_attention(flat(q), flat(k), flat(v)).transpose(-1, -2).reshape(q.shape)
    out = sparse_attn.block_sparse_attention(q, k, v, key_blocks, 4, backend=backend)
    torch.testing.assert_close(out, dense, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", _backends)
def test_order_of_key_blocks_within_a_row_does_not_matter(backend):
    (q, k, v), key_blocks = inputs((1, 2, 4, 8, 8, (2, 2), 5))
    shuffled = key_blocks.flip(-1)
    torch.testing.assert_close(sparse_attn.block_sparse_attention(q, k, v, shuffled, 2, backend=backend),
                               sparse_attn.block_sparse_attention(q, k, v, key_blocks, 2, backend=backend),
                               rtol=1e-12, atol=1e-12)


def test_dense_masked_attention_is_the_definition():
    """The test's truth, pixel by pixel for one query of a small case."""
    (q, k, v), key_blocks = inputs((1, 1, 3, 4, 6, (2, 3), 2))
    out = dense_masked_attention(q, k, v, key_blocks, (2, 3))
    y, x = 3, 4  # region row 1, column 1: region 3
    keys = [(yy, xx) for yy in range(4) for xx in range(6) if (yy // 2) * 2 + xx // 3 in key_blocks[0, 0, 3].tolist()]
    scores = torch.stack([(q[0, 0, :, y, x] * k[0, 0, :, yy, xx]).sum() / 3 ** 0.5 for yy, xx in keys])
    want = sum(w * v[0, 0, :, yy, xx] for w, (yy, xx) in zip(torch.softmax(scores, 0), keys))
    torch.testing.assert_close(out[0, 0, :, y, x], want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", _backends)
def test_gradcheck(backend):
    (q, k, v), key_blocks = inputs((2, 2, 3, 4, 6, (2, 3), 2))
    leaves = [t.requires_grad_() for t in (q, k, v)]
    # The reference is checked in fast mode (random projections of the Jacobian): its full
    # Jacobian takes a minute on two loaded cores; the native kernels get the full check.
    assert torch.autograd.gradcheck(op_fn(backend, key_blocks, (2, 3)), leaves, eps=1e-6, atol=1e-7,
                                    fast_mode=backend == "reference")


@pytest.mark.parametrize("backend", _backends)
def test_low_precision_through_the_reference_in_that_precision(backend):
    if backend == "native":
        pytest.skip("the native CPU kernels take float32 and float64 only")
    assert_matches_dense(backend, CASES[1], torch.bfloat16)


# ---------------------------------------------------------------------------------------------
# Native specifics: torch.library, compile, determinism, what backward saves
# ---------------------------------------------------------------------------------------------
@requires_native
def test_opcheck():
    (q, k, v), key_blocks = inputs((2, 2, 3, 4, 6, (2, 3), 2))
    checked = opcheck_every_custom_op(op_fn("native", key_blocks, (2, 3)), [q, k, v])
    assert checked == ["sparse_attn.block_sparse_attention_backward.default",
                       "sparse_attn.block_sparse_attention_forward.default"]


@requires_native
def test_compiled_forward_and_backward_do_not_recompile_for_new_sizes():
    """H, W and t are runtime arguments of the op: new sizes reuse the one compiled graph."""
    backend = "native"

    def fn(q, k, v, key_blocks):
        return sparse_attn.block_sparse_attention(q, k, v, key_blocks, (4, 4), backend=backend)

    # aot_eager: Dynamo's full graph, the fake implementations and the autograd formula, without
    # inductor's code generation (minutes on two cores, and none of it is the op's)
    with compiled_once(fn, backend="aot_eager") as compiled:
        # (the first call's sizes all differ: Dynamo would otherwise tie equal ones together)
        for height, width, t in ((8, 12, 3), (12, 16, 2), (16, 8, 5)):
            (q, k, v), key_blocks = inputs((2, 2, 4, height, width, (4, 4), t), torch.float32)
            grad = torch.randn(q.shape)
            run = lambda q, k, v: compiled(q, k, v, key_blocks)  # noqa: E731
            want = forward_and_grads(op_fn(backend, key_blocks, (4, 4)), [q, k, v], grad)
            got = forward_and_grads(run, [q, k, v], grad)
            for name, a, b in zip(NAMES, got, want):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=name)


@requires_native
def test_native_is_deterministic_and_independent_of_threads():
    """Many query regions read every key region: dK and dV gather their contributions in one order."""
    (q, k, v), key_blocks = inputs((2, 2, 16, 32, 32, (8, 8), 8), torch.float32)
    assert_deterministic(op_fn("native", key_blocks, 8), [q, k, v], torch.randn(q.shape), NAMES[1:])


@requires_native
def test_native_saves_inputs_output_lse_and_indices_only():
    """q, k, v, out, one log-sum-exp per pixel and key_blocks; never the t·p² scores per pixel."""
    (q, k, v), key_blocks = inputs((1, 2, 8, 16, 16, (4, 4), 4), torch.float32)
    for t in (q, k, v):
        t.requires_grad_()
    saved, _ = saved_bytes(lambda: sparse_attn.block_sparse_attention(q, k, v, key_blocks, 4, backend="native"))
    assert saved == 4 * q.numel() * 4 + q.numel() // 8 * 4 + key_blocks.numel() * 8


@requires_native
def test_auto_runs_native_on_cpu_and_reference_for_other_dtypes():
    (q, k, v), key_blocks = inputs(CASES[1], torch.bfloat16)
    torch.testing.assert_close(sparse_attn.block_sparse_attention(q, k, v, key_blocks, 4),
                               sparse_attn.block_sparse_attention(q, k, v, key_blocks, 4, backend="reference"))
    with pytest.raises(sparse_attn.backends.BackendUnavailable, match="float32, float64"):
        sparse_attn.block_sparse_attention(q, k, v, key_blocks, 4, backend="native")
    (q, k, v), key_blocks = inputs(CASES[1], torch.float32)
    assert sparse_attn.backends.explain(sparse_attn.block_sparse_attention, q, k, v, key_blocks, 4).chosen == "native"


# ---------------------------------------------------------------------------------------------
# Input checks
# ---------------------------------------------------------------------------------------------
def test_input_errors_name_the_argument():
    (q, k, v), key_blocks = inputs((1, 2, 4, 8, 12, (4, 4), 2), torch.float32)
    call = sparse_attn.block_sparse_attention
    with pytest.raises(TypeError, match="k: expected a tensor"):
        call(q, k.numpy(), v, key_blocks, 4)
    with pytest.raises(ValueError, match=r"q: expected shape \(B, heads, d, H, W\)"):
        call(q[0], k[0], v[0], key_blocks, 4)
    with pytest.raises(ValueError, match="q: every dimension must be non-empty"):
        call(q[:, :, :0], k[:, :, :0], v[:, :, :0], key_blocks, 4)
    with pytest.raises(ValueError, match="v: expected the shape of q"):
        call(q, k, v[:, :1], key_blocks, 4)
    with pytest.raises(TypeError, match="q: expected a floating-point tensor"):
        call(q.long(), k.long(), v.long(), key_blocks, 4)
    with pytest.raises(TypeError, match="k: expected q's dtype"):
        call(q, k.double(), v, key_blocks, 4)
    with pytest.raises(ValueError, match="v: expected q's device"):
        call(q, k, v.to("meta"), key_blocks, 4)
    with pytest.raises(ValueError, match="key_blocks: expected q's device"):
        call(q, k, v, key_blocks.to("meta"), 4)
    with pytest.raises(ValueError, match=r"q: H x W = 8 x 12 must be multiples of the region 3 x 4"):
        call(q, k, v, key_blocks, (3, 4))
    for region in (0, (4,), (4, 4.0), True, "4"):
        with pytest.raises(ValueError, match="region: expected a positive int"):
            call(q, k, v, key_blocks, region)
    with pytest.raises(TypeError, match="key_blocks: expected an integer tensor"):
        call(q, k, v, key_blocks.float(), 4)
    with pytest.raises(ValueError, match=r"key_blocks: expected shape \(B, heads, R, t\) = \(1, 2, 6, t\)"):
        call(q, k, v, key_blocks[:, :, :5], 4)
    with pytest.raises(ValueError, match="key_blocks: expected 1 <= t <= R = 6"):
        call(q, k, v, torch.zeros(1, 2, 6, 7, dtype=torch.long), 4)
    for bad in (-1, 6):
        wrong = key_blocks.clone()
        wrong[0, 1, 3, 0] = bad
        with pytest.raises(ValueError, match=f"key_blocks: indices must lie in 0..R-1 = 0..5 .*got {bad}"):
            call(q, k, v, wrong, 4)
    repeated = key_blocks.clone()
    repeated[0, 1, 2, 1] = repeated[0, 1, 2, 0]
    with pytest.raises(ValueError, match=r"key_blocks: .* distinct; row \[0, 1, 2\] repeats"):
        call(q, k, v, repeated, 4)
    for name, position in (("q", 0), ("k", 1), ("v", 2)):
        for value in (float("nan"), float("inf")):
            args = [q.clone(), k, v]
            args[position] = args[position].clone()
            args[position][0, 0, 0, 1, 2] = value
            with pytest.raises(ValueError, match=f"{name}: contains non-finite values"):
                call(*args, key_blocks, 4)
    for scale in (float("nan"), float("inf"), "0.5", True):
        with pytest.raises(ValueError, match="scale: expected a finite number"):
            call(q, k, v, key_blocks, 4, scale)
    with pytest.raises(ValueError, match="backend"):
        call(q, k, v, key_blocks, 4, backend="cuda")


def test_integer_dtypes_of_key_blocks_are_accepted():
    (q, k, v), key_blocks = inputs((1, 2, 4, 8, 12, (4, 4), 2))
    want = sparse_attn.block_sparse_attention(q, k, v, key_blocks, 4, backend="reference")
    for dtype in (torch.int32, torch.int16, torch.uint8):
        torch.testing.assert_close(sparse_attn.block_sparse_attention(q, k, v, key_blocks.to(dtype), 4), want,
                                   rtol=1e-12, atol=1e-12)


def test_random_key_blocks_are_distinct_and_in_range():
    """The cases' own generator (every test relies on it)."""
    key_blocks = random_key_blocks(2, 3, 7, 5)
    assert key_blocks.shape == (2, 3, 7, 5) and key_blocks.min() >= 0 and key_blocks.max() < 7
    assert (key_blocks.sort(-1).values.diff(dim=-1) > 0).all()
