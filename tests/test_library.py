"""The op plug (sparse_attn/ops/_library.py): one table per op, dispatch that routes around every
backend limit with a reason, `explain`, and the encodings shared by Python, Triton and C++."""
import importlib
import types

import pytest
import torch

import sparse_attn
from sparse_attn import backends, encodings
from sparse_attn.ops import _library

NATIVE = backends.why_unavailable("native", "cpu")
TRITON_CPU = backends.why_unavailable("triton", "cpu")
requires_native = pytest.mark.skipif(NATIVE is not None, reason=f"native backend: {NATIVE}")
requires_triton_cpu = pytest.mark.skipif(TRITON_CPU is not None, reason=f"triton on CPU tensors: {TRITON_CPU}")


def attention_args(d=8, n=12, dtype=torch.float32):
    q, k, v = torch.randn(3, 1, 2, d, n, dtype=dtype)
    return q, k, v, torch.ones(2, dtype=dtype), torch.ones(1, dtype=dtype), (d // 2,)


def test_every_op_is_plugged_once():
    assert _library.plugged() == ["block_sparse_attention", "depthwise_conv2d", "gated_dwconv", "layer_norm2d",
                                  "mixed_scale_dwconv", "patch_attention", "sparse_channel_attention"]
    for name in _library.plugged():
        assert _library.lookup(getattr(sparse_attn, name)) is _library.lookup(name)
        with pytest.raises(RuntimeError, match="plugged twice"):
            _library.plug(_library.lookup(name).table)
    with pytest.raises(ValueError, match="op: expected one of"):
        _library.lookup("flash_attention")


# ---------------------------------------------------------------------------------------------
# Encodings: one source in Python, C++ reports its copies
# ---------------------------------------------------------------------------------------------
@requires_native
def test_activation_codes_agree_with_the_cpp_kernels():
    cpp = torch.ops.sparse_attn.encoding("activation_codes", 0)
    assert cpp == [encodings.ACTIVATION_CODES["softmax"], encodings.ACTIVATION_CODES["relu2"]]


@requires_native
@pytest.mark.parametrize("hidden", [1, 3, 127, 1021])
def test_msfn_gradient_layout_agrees_with_the_cpp_kernels(hidden):
    ours = encodings.msfn_grad_offsets(hidden)
    cpp = torch.ops.sparse_attn.encoding("mixed_scale_dwconv_grad_layout", hidden)
    assert cpp == [ours[name] for name in encodings.MSFN_GRAD_LAYOUT]
    # Entries follow each other without gaps or overlaps: each is its parameter's size.
    c = 2 * hidden
    sizes = [c * 9, c * 25, hidden * 18, hidden * 50, c, c, hidden, hidden]
    assert [b - a for a, b in zip(cpp, cpp[1:])] == sizes


@requires_native
@pytest.mark.parametrize("hidden", [1, 3, 5, 127])
def test_msfn_channel_mapping_of_the_cpp_kernels_is_the_contract(hidden):
    """C++'s source_of(o, slot) against DESIGN.md §2 itself: x1 = cat(y3[:h], y5[:h]),
    x2 = cat(y3[h:], y5[h:]), output g reads x1[2g], x1[2g+1] and output h+g reads x2's."""
    y3 = [(0, c) for c in range(2 * hidden)]  # (kind: 0 = 3x3, 1 = 5x5; channel)
    y5 = [(1, c) for c in range(2 * hidden)]
    x1, x2 = y3[:hidden] + y5[:hidden], y3[hidden:] + y5[hidden:]
    expected = [x[2 * g + slot] for x in (x1, x2) for g in range(hidden) for slot in (0, 1)]
    table = torch.ops.sparse_attn.encoding("mixed_scale_dwconv_sources", hidden)
    assert list(zip(table[0::2], table[1::2])) == expected


@requires_native
def test_unknown_encoding_is_an_error():
    with pytest.raises(RuntimeError, match="unknown name"):
        torch.ops.sparse_attn.encoding("tile_size", 0)


# ---------------------------------------------------------------------------------------------
# Limits: `auto` routes around them, an explicit request names them
# ---------------------------------------------------------------------------------------------
def cuda_like(shape):
    """Stands in for a CUDA tensor in a limits check (which reads only device and shape)."""
    return types.SimpleNamespace(device=torch.device("cuda"), shape=shape)


@requires_native
def test_msfn_cuda_grid_limits_are_checked_before_dispatch():
    tile_h, tile_w, bound = importlib.import_module("sparse_attn.ops.mixed_scale_dwconv")._CUDA_GRID
    assert (tile_h, tile_w, bound) == (16, 32, 65536)
    limits = _library.lookup("mixed_scale_dwconv").table.native.limits
    assert limits(cuda_like((1, 254, 512, 512))) is None
    assert limits(cuda_like((2, 32766, 8, 8))) is None
    assert "B * 2h below 65536, got 2 * 32768" in limits(cuda_like((2, 32768, 8, 8)))
    assert limits(cuda_like((1, 2, 65535 * 16, 1))) is None
    assert "H below 1048576" in limits(cuda_like((1, 2, 65536 * 16, 1)))
    assert "H * W below 2^31" in limits(cuda_like((1, 2, 65536, 32768)))
    assert limits(types.SimpleNamespace(device=torch.device("cpu"), shape=(2, 32768, 8, 8))) is None


@requires_native
def test_gated_dwconv_cuda_grid_limits_are_checked_before_dispatch():
    tile_h, tile_w, bound = importlib.import_module("sparse_attn.ops.gated_dwconv")._CUDA_GRID
    assert (tile_h, tile_w, bound) == (16, 32, 2**31)
    limits = _library.lookup("gated_dwconv").table.native.limits
    assert limits(cuda_like((1, 254, 512, 512))) is None
    tiles_per_plane = (2048 // 16) * (2048 // 32)  # 8192
    groups_at_limit = 2**31 // tiles_per_plane      # 262144 tile planes reach the grid bound
    assert limits(cuda_like((1, 2 * (groups_at_limit - 1), 2048, 2048))) is None
    assert "fewer than 2147483648 tiles of 16 x 32" in limits(cuda_like((1, 2 * groups_at_limit, 2048, 2048)))
    assert "H * W below 2^31" in limits(cuda_like((1, 2, 65536, 32768)))
    assert limits(types.SimpleNamespace(device=torch.device("cpu"), shape=(1, 2 * groups_at_limit, 2048, 2048))) is None


@requires_native
def test_depthwise_conv2d_cuda_grid_limits_are_checked_before_dispatch():
    tile_h, tile_w, bound = importlib.import_module("sparse_attn.ops.depthwise_conv2d")._CUDA_GRID
    assert (tile_h, tile_w, bound) == (32, 32, 2**31)
    limits = _library.lookup("depthwise_conv2d").table.native.limits
    assert limits(cuda_like((1, 144, 512, 512)), None, None, 1) is None
    # 2048², dilation 2: 2 x 2 phases of 1024² lattice pixels, 32 x 32 tiles each: 4096 blocks per plane
    planes_at_limit = 2**31 // 4096
    assert limits(cuda_like((1, planes_at_limit - 1, 2048, 2048)), None, None, 2) is None
    assert ("fewer than 2147483648 blocks" in limits(cuda_like((1, planes_at_limit, 2048, 2048)), None, None, 2))
    # a dilation beyond the image: only the phases that hold pixels count (5 x 9 of them, one tile each)
    assert limits(cuda_like((2**31 // 45 - 1, 1, 5, 9)), None, None, 10) is None
    assert "fewer than 2147483648 blocks" in limits(cuda_like((2**31 // 45 + 1, 1, 5, 9)), None, None, 10)
    assert "H * W below 2^31" in limits(cuda_like((1, 2, 65536, 32768)), None, None, 1)
    assert limits(types.SimpleNamespace(device=torch.device("cpu"), shape=(1, planes_at_limit, 2048, 2048)),
                  None, None, 2) is None


@requires_triton_cpu
def test_auto_routes_around_a_limit_and_explicit_requests_name_it(monkeypatch):
    """Triton's attention kernels take d <= 128. With triton first in CPU's order (as it is on
    CUDA), auto takes it for d = 8 and passes it over, saying why, for d = 130."""
    monkeypatch.setattr(backends, "AUTO_ORDER_OTHER", ("triton", "native", "reference"))
    op = sparse_attn.sparse_channel_attention
    assert backends.explain(op, *attention_args(d=8)).chosen == "triton"
    wide = attention_args(d=130, n=4)
    explanation = backends.explain(op, *wide)
    assert explanation.chosen == ("native" if NATIVE is None else "reference")
    assert "at most 128 channels per head, got d = 130" in explanation.reasons["triton"]
    assert "at most 128 channels" in str(explanation)
    with pytest.raises(backends.BackendUnavailable, match="triton.*at most 128 channels per head"):
        op(*wide, backend="triton")


def test_explain_names_every_backend_and_the_reason():
    op = sparse_attn.mixed_scale_dwconv
    x = torch.randn(1, 4, 5, 5, dtype=torch.bfloat16)
    params = [torch.randn(s, dtype=torch.bfloat16) for s in ((4, 1, 3, 3), (4, 1, 5, 5), (2, 2, 3, 3), (2, 2, 5, 5))]
    explanation = backends.explain(op, x, *params)
    assert explanation.chosen == "reference"
    assert set(explanation.reasons) == set(backends.BACKENDS)
    if NATIVE is None:
        assert "float32, float64" in explanation.reasons["native"] and "bfloat16" in explanation.reasons["native"]
    text = str(explanation)
    assert text.startswith("mixed_scale_dwconv on cpu tensors: auto picks 'reference'")
    assert "native:" in text and "triton:" in text
    with pytest.raises(TypeError, match="w3: expected x's dtype"):  # the contract runs first
        backends.explain(op, x, params[0].float(), *params[1:])


@requires_native
def test_triton_is_never_automatic_on_cpu():
    explanation = backends.explain(sparse_attn.sparse_channel_attention, *attention_args())
    assert explanation.chosen == "native"
    if TRITON_CPU is None:
        assert explanation.reasons["triton"] is None
        assert "auto does not try it on cpu tensors" in str(explanation)


def test_use_backend_falls_back_only_for_ops_without_such_kernels():
    """`use_backend("triton")` moves a model; an op with no Triton kernels at all runs on its
    usual order, but an explicit backend="triton" raises."""
    table = _library.OpTable(
        name="test_only_scale", arguments=lambda x: (x,), reference=lambda x: 2 * x,
        fake_forward=None, fake_backward=None, setup_context=None, backward=None)
    op = _library.plug(table)
    try:
        x = torch.ones(3)
        with sparse_attn.use_backend("triton"):
            assert torch.equal(op("auto", x), 2 * x)
        with pytest.raises(backends.BackendUnavailable, match="test_only_scale has no triton kernels"):
            op("triton", x)
    finally:
        del _library._OPS["test_only_scale"]


# ---------------------------------------------------------------------------------------------
# torch.compile: the attention op on Triton's interpreter is an opaque op, as MSFN's is
# ---------------------------------------------------------------------------------------------
@requires_triton_cpu
def test_attention_on_interpreted_triton_compiles_without_recompiling():
    torch._dynamo.reset()
    frames = []

    def count(gm, example_inputs):
        frames.append(gm)
        return gm.forward

    def attention(q, k, v, temperature, weights):
        return sparse_attn.sparse_channel_attention(q, k, v, temperature, weights, (3, 4), backend="triton")

    compiled = torch.compile(attention, backend=count, fullgraph=True, dynamic=True)
    for n in (20, 33):
        q, k, v, temperature, _, _ = attention_args(d=8, n=n)
        weights = torch.tensor([0.6, 0.4])
        q.requires_grad_(True)
        out = compiled(q, k, v, temperature, weights)
        expected = sparse_attn.sparse_channel_attention(q, k, v, temperature, weights, (3, 4), backend="reference")
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
        out.sum().backward()
        assert q.grad is not None and torch.isfinite(q.grad).all()
    assert len(frames) == 1, f"recompiled for a new N ({len(frames)} graphs)"
