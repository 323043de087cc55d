"""patch_attention (DESIGN.md §3): the reference against a direct float64 formula, every CPU
backend against the reference (forward and every gradient), top-k and its tie rule, gradcheck,
opcheck, torch.compile, determinism, what backward saves, and input errors."""
import importlib

import pytest
import torch

import sparse_attn
from benchmarks.memory import saved_bytes
from helpers import assert_deterministic, compiled_once, forward_and_grads, opcheck_every_custom_op
from patch_attention_cases import (SHAPES, TIES_KEY_EPS, assert_backend_close, direct_patch_attention, make_inputs, n_keys, names,
                                   op_fn, shape_id, split)
from sparse_attn import backends
from sparse_attn.reference import patch_attention as reference_module_fn

# The module, not the function of the same name that sparse_attn.reference exports.
reference_module = importlib.import_module("sparse_attn.reference.patch_attention")

NATIVE_CPU = backends.why_unavailable("native", "cpu") or (
    None if backends.native_has_kernel("patch_attention_forward", "cpu")
    else "sparse_attn._C has no CPU patch_attention_forward (a build older than the op: run `make build`)")
requires_native = pytest.mark.skipif(NATIVE_CPU is not None, reason=f"native backend: {NATIVE_CPU}")
CPU_BACKENDS = ["reference", pytest.param("native", marks=requires_native)]


def _topk_values(keys):
    n = sum(k.shape[2] * k.shape[3] for k in keys)
    return [None, 1, min(5, n), n]


# ---------------------------------------------------------------------------------------------
# The reference against DESIGN.md §3 written out
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_reference_matches_the_direct_formula(shape, ties):
    inputs = make_inputs(shape, ties=ties, zero_keys=shape[3][0] >= 4)
    q, keys, values = split(inputs)
    key_eps = TIES_KEY_EPS if ties else 1e-4
    for topk in _topk_values(keys):
        want = direct_patch_attention(q, keys, values, 10.0, topk, key_eps)
        got = sparse_attn.patch_attention(q, keys, values, 10.0, topk, key_eps, backend="reference")
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12, msg=f"topk={topk}")


def test_reference_matches_the_official_core():
    """The official module's core (key patches as convolution kernels, transposed convolution
    with the value patches), as the benchmarks time it."""
    from benchmarks.patch import official_patch_attention

    q, keys, values = split(make_inputs(SHAPES[1], zero_keys=True))
    torch.testing.assert_close(sparse_attn.patch_attention(q, keys, values, backend="reference"),
                               official_patch_attention(q, keys, values), rtol=1e-12, atol=1e-12)


def test_reference_query_chunks_do_not_change_the_result(monkeypatch):
    shape = SHAPES[1]
    q, keys, values = split(make_inputs(shape))
    whole = reference_module_fn(q, keys, values, 10.0, 5)
    monkeypatch.setattr(reference_module, "SCORES_PER_CHUNK", 7 * n_keys(shape))  # 7 queries per chunk
    torch.testing.assert_close(reference_module_fn(q, keys, values, 10.0, 5), whole, rtol=0, atol=1e-14)


def test_topk_ties_keep_the_lower_key_index():
    """q = 0 makes every score 0: top-t keeps the first t keys, so the output is the fold of the
    mean of the first t value patches."""
    shape = SHAPES[0]
    q, keys, values = split(make_inputs(shape))
    q = torch.zeros_like(q)
    t = 3
    out = sparse_attn.patch_attention(q, keys, values, topk=t, backend="reference")
    patches = reference_module.unfold_patches(values[0])[:, :, :t].mean(dim=2, keepdim=True)
    want = torch.nn.functional.fold(patches.expand(-1, -1, q.shape[2] * q.shape[3]), q.shape[2:], 3, padding=1)
    torch.testing.assert_close(out, want, rtol=0, atol=1e-14)


# ---------------------------------------------------------------------------------------------
# Every CPU backend against the float64 reference: output and every gradient
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_backend_matches_reference(backend, shape, dtype):
    for topk in [None, 1, min(5, n_keys(shape)), n_keys(shape)]:
        assert_backend_close(backend, shape, dtype, topk, zero_keys=shape[3][0] >= 4)


# Several query and key tiles of the kernels (16 × 16 on CPU), ragged at the edges, and levels
# whose tiles end at different places; the second with channel counts that fill the CPU tile
# products' 16-wide register blocks and leave a ragged block after them.
MULTI_TILE_SHAPES = [(2, 3, 4, (19, 35), [(19, 35), (17, 31), (9, 16)]),
                     (1, 17, 33, (21, 18), [(21, 18), (18, 16)])]


@pytest.mark.parametrize("backend", [pytest.param("native", marks=requires_native)])
@pytest.mark.parametrize("shape", MULTI_TILE_SHAPES, ids=shape_id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("topk", [None, 7])
def test_backend_matches_reference_across_tiles(backend, shape, dtype, topk):
    assert_backend_close(backend, shape, dtype, topk, zero_keys=True)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("topk, dtype", [(None, torch.float64), (1, torch.float64), (5, torch.float64),
                                         (389, torch.float64), (1, torch.float32), (5, torch.float32)])
def test_backend_with_ties(backend, topk, dtype):
    """Exactly equal scores (within and across levels): top-k keeps the lower key index, in
    float32 too (dense float32 is left to the other tests: exact data make the reference's own
    float32 error, the yardstick, unusually small)."""
    assert_backend_close(backend, SHAPES[1], dtype, topk, ties=True)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_gradcheck(backend):
    shape = (2, 2, 3, (3, 4), [(3, 4), (2, 3)])
    inputs = [t.requires_grad_() for t in make_inputs(shape, zero_keys=False)]
    for topk in (None, 4):
        assert torch.autograd.gradcheck(op_fn(backend, 1.5, topk), inputs, eps=1e-6, atol=1e-7)


# ---------------------------------------------------------------------------------------------
# Input errors
# ---------------------------------------------------------------------------------------------
def test_input_errors_name_the_argument():
    q, keys, values = split(make_inputs(SHAPES[1]))
    call = sparse_attn.patch_attention
    with pytest.raises(TypeError, match="q: expected a tensor"):
        call(None, keys, values)
    with pytest.raises(ValueError, match=r"q: expected shape \(B, Cq, H, W\)"):
        call(q[0], keys, values)
    with pytest.raises(TypeError, match="q: expected a floating-point tensor"):
        call(q.long(), keys, values)
    with pytest.raises(TypeError, match="keys: expected a list or tuple"):
        call(q, keys[0], values)
    with pytest.raises(ValueError, match="keys: expected at least one level"):
        call(q, [], values)
    with pytest.raises(ValueError, match="values: expected one map per level of keys"):
        call(q, keys, values[:-1])
    with pytest.raises(ValueError, match=r"keys\[2\]: expected q's 4 channels, got 5"):
        call(q, keys[:2] + [torch.zeros(2, 5, 7, 9, dtype=q.dtype)] + keys[3:], values)
    with pytest.raises(ValueError, match=r"values\[1\]: expected the 3 channels of values\[0\], got 4"):
        call(q, keys, values[:1] + [torch.zeros(2, 4, 8, 10, dtype=q.dtype)] + values[2:])
    with pytest.raises(ValueError, match=r"values\[1\]: expected the size of keys\[1\]"):
        call(q, keys, values[:1] + [torch.zeros(2, 3, 8, 9, dtype=q.dtype)] + values[2:])
    with pytest.raises(ValueError, match=r"keys\[0\]: expected q's batch size 2"):
        call(q, [keys[0][:1]] + keys[1:], values)
    with pytest.raises(TypeError, match=r"values\[4\]: expected q's dtype"):
        call(q, keys, values[:4] + [values[4].float()])
    with pytest.raises(ValueError, match=r"keys\[3\]: expected q's device"):
        call(q, keys[:3] + [keys[3].to("meta")] + keys[4:], values)
    with pytest.raises(ValueError, match=r"topk = 0 is outside 1..M"):
        call(q, keys, values, topk=0)
    with pytest.raises(ValueError, match=r"topk = 400 is outside 1..M = 1..\d+"):
        call(q, keys, values, topk=400)
    with pytest.raises(TypeError, match="topk: expected None or an integer"):
        call(q, keys, values, topk=2.0)
    with pytest.raises(ValueError, match="scale: expected a finite number"):
        call(q, keys, values, scale=float("nan"))
    with pytest.raises(ValueError, match="key_eps: expected a finite number > 0"):
        call(q, keys, values, key_eps=0.0)
    with pytest.raises(ValueError, match="key_eps: expected a finite number > 0"):
        call(q, keys, values, key_eps=float("inf"))
    with pytest.raises(ValueError, match="backend"):
        call(q, keys, values, backend="cuda")


# ---------------------------------------------------------------------------------------------
# The native op: torch.library, torch.compile, determinism, what backward saves, dispatch
# ---------------------------------------------------------------------------------------------
@requires_native
@pytest.mark.parametrize("topk", [None, 3])
def test_opcheck(topk):
    shape = (2, 3, 2, (3, 5), [(3, 5), (2, 4)])
    checked = opcheck_every_custom_op(op_fn("native", 2.0, topk), make_inputs(shape))
    assert checked == ["sparse_attn.patch_attention_backward.default", "sparse_attn.patch_attention_forward.default"]


@requires_native
def test_compiled_forward_and_backward_do_not_recompile_for_new_sizes():
    """Inductor, forward and backward: one compilation serves every image and pyramid size.
    (No size equals B, Cq or Cv: dynamo's duck sizing would tie them together. The float
    arguments are literals: a float that dynamo reads from a closure cell is traced as a
    symbolic input, and specialising it restarts the first compilation.)"""
    def fn(q, k0, k1, v0, v1):
        return sparse_attn.patch_attention(q, [k0, k1], [v0, v1], 10.0, 4, 1e-4, backend="native")
    with compiled_once(fn) as compiled:
        for size in ((7, 9), (6, 10), (11, 8)):
            shape = (2, 4, 3, size, [size, (size[0] - 1, size[1] - 1)])
            inputs = [t.float() for t in make_inputs(shape)]
            grad = torch.randn(2, 3, *size)
            want, got = forward_and_grads(fn, inputs, grad), forward_and_grads(compiled, inputs, grad)
            for name, a, b in zip(names(inputs), got, want):
                torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


@requires_native
@pytest.mark.parametrize("topk", [None, 7])
def test_native_is_deterministic_and_independent_of_threads(topk):
    shape = (2, 4, 6, (19, 37), [(19, 37), (17, 33)])
    inputs = [t.float() for t in make_inputs(shape)]
    grad = torch.randn(2, 6, 19, 37)
    assert_deterministic(op_fn("native", 10.0, topk), inputs, grad, names(inputs)[1:])


@requires_native
@pytest.mark.parametrize("topk", [None, 5])
def test_native_saves_inputs_and_per_query_and_per_key_statistics_only(topk):
    shape = (2, 4, 6, (12, 13), [(12, 13), (11, 12), (10, 10)])
    q, keys, values = split([t.float() for t in make_inputs(shape)])
    leaves = [t.requires_grad_() for t in (q, *keys, *values)]
    saved, _ = saved_bytes(lambda: op_fn("native", 10.0, topk)(*leaves))
    n_queries, n_keys_total = 12 * 13, n_keys(shape)
    inputs_bytes = sum(t.numel() for t in leaves) * 4
    statistics = 2 * n_keys_total * 4 + 2 * n_queries * (8 + 4 + 8)  # B = 2: inverse norms; lse (double), threshold, last
    assert saved <= inputs_bytes + statistics


@requires_native
def test_auto_runs_native_on_cpu_and_reference_for_other_dtypes():
    shape = SHAPES[0]
    q, keys, values = split(make_inputs(shape, dtype=torch.bfloat16))
    assert backends.explain(sparse_attn.patch_attention, q, keys, values).chosen == "reference"
    with pytest.raises(backends.BackendUnavailable, match="float32, float64"):
        sparse_attn.patch_attention(q, keys, values, backend="native")
    q, keys, values = split(make_inputs(shape, dtype=torch.float32))
    assert backends.explain(sparse_attn.patch_attention, q, keys, values).chosen == "native"


@requires_native
def test_native_noncontiguous_inputs():
    shape = SHAPES[1]
    inputs = make_inputs(shape)
    want = op_fn("reference", 10.0, 5)(*inputs)
    strided = [t.transpose(2, 3).contiguous().transpose(2, 3) for t in inputs]
    strided[0] = inputs[0].to(memory_format=torch.channels_last)
    torch.testing.assert_close(op_fn("native", 10.0, 5)(*strided), want, rtol=0, atol=1e-12)
