"""The `triton` backend of patch_attention (DESIGN.md §3): on CPU tensors in Triton's interpreter
(TRITON_INTERPRET=1, set by conftest.py) against the float64 reference, forward and every
gradient, dense and top-k (with ties), several query, key and channel tiles; fp16; determinism;
torch.library; what the kernels cannot run. Sizes are small: the interpreter runs each program
in numpy."""
import pytest
import torch

import sparse_attn
from helpers import assert_deterministic, opcheck_every_custom_op
from patch_attention_cases import SHAPES, assert_backend_close, make_inputs, n_keys, names, op_fn, shape_id, split
from sparse_attn import backends

TRITON_CPU = backends.why_unavailable("triton", "cpu")
requires_triton_cpu = pytest.mark.skipif(TRITON_CPU is not None, reason=f"triton on CPU tensors: {TRITON_CPU}")
launchers = pytest.importorskip("sparse_attn.kernels.patch_attention", reason="Triton is not installed")

# The pyramid of a 9×11 map (SHAPES[1]) spans four query tiles and, on its first level, two key
# tiles; this one has more channels than two channel blocks (C_BLOCK = 8), query and key tiles
# ragged at the edges, and levels that end inside a key tile.
CHANNEL_TILES_SHAPE = (1, 20, 18, (5, 7), [(5, 7), (9, 8)])
# The interpreter is slow (seconds per call on the pyramid): the fast tier runs every topk on a
# one-tile shape, and dense and topk = 5 across tiles; the slow tier every shape with every topk.
TRITON_SHAPES = [s if s is SHAPES[2] else pytest.param(s, marks=pytest.mark.slow)
                 for s in SHAPES + [CHANNEL_TILES_SHAPE]]


@requires_triton_cpu
@pytest.mark.parametrize("shape", TRITON_SHAPES, ids=shape_id)
def test_matches_reference(shape):
    for topk in [None, 1, min(5, n_keys(shape)), n_keys(shape)]:
        assert_backend_close("triton", shape, torch.float32, topk, zero_keys=shape[3][0] >= 4)


@requires_triton_cpu
@pytest.mark.parametrize("topk", [None, 5])
def test_matches_reference_across_tiles(topk):
    assert_backend_close("triton", SHAPES[1], torch.float32, topk, zero_keys=True)


@requires_triton_cpu
@pytest.mark.parametrize("topk", [pytest.param(1, marks=pytest.mark.slow), 5])
def test_ties_keep_the_lower_key_index(topk):
    """Exactly equal scores within and across levels: the kernels' sorted ranks keep the lower
    key index, and the backward replays that choice."""
    assert_backend_close("triton", SHAPES[1], torch.float32, topk, ties=True)


@requires_triton_cpu
def test_channel_blocks():
    assert_backend_close("triton", CHANNEL_TILES_SHAPE, torch.float32, None)


@requires_triton_cpu
def test_float16_within_the_float16_reference_error():
    assert_backend_close("triton", SHAPES[0], torch.float16, 3)


@requires_triton_cpu
@pytest.mark.parametrize("topk", [None, 7])
def test_deterministic(topk):
    inputs = [t.float() for t in make_inputs(SHAPES[3])]
    grad = torch.randn(2, 2, 2, 3)
    assert_deterministic(op_fn("triton", 10.0, topk), inputs, grad, names(inputs)[1:])


@requires_triton_cpu
def test_opcheck():
    shape = (2, 3, 2, (3, 5), [(3, 5), (2, 4)])
    checked = opcheck_every_custom_op(op_fn("triton", 2.0, 3), [t.float() for t in make_inputs(shape)])
    assert checked == ["sparse_attn.patch_attention_triton_backward.default",
                       "sparse_attn.patch_attention_triton_forward.default"]


@requires_triton_cpu
def test_what_the_kernels_cannot_run_is_said():
    shape = (1, 2, 2, (9, 9), [(9, 9)])
    q, keys, values = split([t.float() for t in make_inputs(shape)])
    limit = launchers.MAX_TOPK
    with pytest.raises(backends.BackendUnavailable,
                       match=f"at most {limit} keys per query .topk., got topk = {limit + 1}"):
        sparse_attn.patch_attention(q, keys, values, topk=limit + 1, backend="triton")
    # keeping all M keys is the dense softmax, which has no such limit
    dense = sparse_attn.patch_attention(q, keys, values, backend="reference")
    torch.testing.assert_close(sparse_attn.patch_attention(q, keys, values, topk=81, backend="triton"), dense)
    q, keys, values = split(make_inputs(shape))
    with pytest.raises(backends.BackendUnavailable, match="float32, float16"):
        sparse_attn.patch_attention(q, keys, values, backend="triton")
