"""The `triton` backend of mixed_scale_dwconv (DESIGN.md §2) on CPU tensors, in Triton's
interpreter (TRITON_INTERPRET=1, set by conftest.py), against the float64 reference: forward and
every gradient; deterministic weight gradients; torch.library and torch.compile; the errors of a
backend that cannot run. (The compiled kernels on a GPU: test_mixed_scale_dwconv_gpu.py.) Sizes
are small: the interpreter runs each program in numpy."""
import pytest
import torch

import sparse_attn
from helpers import compiled_once, forward_and_grads, opcheck_every_custom_op
from mixed_scale_dwconv_cases import NAMES, SHAPES, assert_close_to_reference, make_inputs, on, why_unavailable
from sparse_attn import backends
from sparse_attn.reference import mixed_scale_dwconv as reference

TRITON_CPU = why_unavailable("triton")
requires_triton_cpu = pytest.mark.skipif(TRITON_CPU is not None, reason=str(TRITON_CPU))
triton_kernels = pytest.importorskip("sparse_attn.kernels.mixed_scale_dwconv", reason="Triton is not installed")

# The interpreter's frames are as large as the image up to 32 x 64 pixels (28 x 60 tiles), of up to
# 16 channels: next to the shapes of the native tests (a 37 x 133 image would take the
# interpreter long), an image of 2 x 2 ragged tiles, an even h (no output group reads both y3
# and y5) and several batches, tiles and channel blocks at once (h = 19: ragged blocks in both
# halves).
TRITON_SHAPES = [s for s in SHAPES if s[2] * s[3] <= 100] + [(1, 6, 30, 70), (1, 8, 6, 5), (2, 38, 30, 7)]


_triton = on("triton")


# ---------------------------------------------------------------------------------------------
# Interpreter against the reference
# ---------------------------------------------------------------------------------------------
@requires_triton_cpu
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", TRITON_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_reference(shape, bias):
    assert_close_to_reference("triton", shape, torch.float32, bias)


@requires_triton_cpu
@pytest.mark.parametrize("shape", [(2, 6, 5, 9), (1, 22, 13, 3)], ids=lambda s: "x".join(map(str, s)))
def test_float16_within_the_float16_reference_error(shape):
    assert_close_to_reference("triton", shape, torch.float16, bias=True)


@requires_triton_cpu
def test_float16_computes_in_float32():
    """fp16 inputs are widened on load and every sum is fp32: the result is the fp32 kernels'
    on the same values, rounded once (bit for bit)."""
    half = make_inputs((1, 6, 7, 9), torch.float16)
    single = [t.float() for t in half]
    grad = torch.randn(1, 6, 7, 9).half()
    results = forward_and_grads(_triton, half, grad)
    results32 = forward_and_grads(_triton, single, grad.float())
    for name, a, b in zip(("out",) + NAMES, results, results32):
        assert torch.equal(a, b.half()), name


@requires_triton_cpu
def test_the_gpu_configuration_in_the_interpreter(monkeypatch):
    """The block sizes a GPU runs (one channel of a 32 x 64 frame per item, one tap at a time),
    here in the interpreter on an image of 2 x 2 tiles."""
    monkeypatch.setattr(triton_kernels, "interpreter_blocks", lambda *_: {**triton_kernels.GPU_BLOCKS, "programs": 3})
    assert_close_to_reference("triton", (1, 2, 31, 61), torch.float32, bias=True)


@requires_triton_cpu
def test_several_channel_blocks_with_ragged_ends(monkeypatch):
    """4 channels per item: h = 19 makes blocks of 4, 4 and 1 output groups in each launch of the
    forward and 4 x 4 + 3 input channels in each half of the backward, over 2 batches x 2 tiles."""
    blocks = triton_kernels.interpreter_blocks
    monkeypatch.setattr(triton_kernels, "interpreter_blocks", lambda *shape: {**blocks(*shape), "CHANNELS": 4})
    assert_close_to_reference("triton", (2, 38, 30, 7), torch.float32, bias=True)


# ---------------------------------------------------------------------------------------------
# Determinism
# ---------------------------------------------------------------------------------------------
@requires_triton_cpu
def test_gradients_are_deterministic_and_independent_of_the_grid(monkeypatch):
    """Bit for bit across runs with 3, 1 or 5 persistent programs sharing the items (partials
    are per tile, not per program) on an image of two tiles."""
    inputs = make_inputs((2, 6, 30, 9), torch.float32)
    grad = torch.randn(2, 6, 30, 9)
    first = forward_and_grads(_triton, inputs, grad)
    runs = []
    blocks = triton_kernels.interpreter_blocks
    for programs in (1, 5):
        monkeypatch.setattr(triton_kernels, "interpreter_blocks",
                            lambda *shape: {**blocks(*shape), "programs": programs})
        runs.append(forward_and_grads(_triton, inputs, grad))
    for run in runs:
        for name, a, b in zip(("out",) + NAMES, run, first):
            assert torch.equal(a, b), f"{name} differs between runs"


# ---------------------------------------------------------------------------------------------
# torch.library and torch.compile
# ---------------------------------------------------------------------------------------------
@requires_triton_cpu
@pytest.mark.parametrize("bias", [True, False])
def test_opcheck(bias):
    checked = opcheck_every_custom_op(_triton, make_inputs((2, 2, 3, 4), torch.float32, bias))
    assert len(checked) == 2, checked  # the forward and the backward op


@requires_triton_cpu
def test_compiled_op_forward_and_backward_do_not_recompile_for_new_image_sizes():
    """fullgraph under aot_eager, which runs the op's fake and autograd registrations with
    symbolic sizes: one compilation serves every H x W. (In the interpreter the ops are opaque
    custom ops; on a GPU they are triton_ops whose kernels Inductor sees: the GPU test below.)"""
    with compiled_once(_triton, backend="aot_eager") as compiled:
        for height, width in ((9, 13), (12, 7), (5, 20)):
            inputs = make_inputs((2, 6, height, width), torch.float32)
            grad = torch.randn(2, 6, height, width)
            want, got = forward_and_grads(_triton, inputs, grad), forward_and_grads(compiled, inputs, grad)
            for name, a, b in zip(("out",) + NAMES, got, want):
                assert torch.equal(a, b), name


# ---------------------------------------------------------------------------------------------
# Which inputs the backend takes
# ---------------------------------------------------------------------------------------------
@requires_triton_cpu
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=str)
def test_unsupported_dtypes_say_why(dtype):
    """The interpreter's bf16 rounding differs from torch's, and there are no fp64 kernels."""
    inputs = make_inputs((1, 6, 5, 5), dtype)
    with pytest.raises(backends.BackendUnavailable,
                       match=f"backend 'triton' cannot run here: its kernels take float32, float16 on cpu "
                             f"tensors .*, got {str(dtype).replace('torch.', '')}"):
        sparse_attn.mixed_scale_dwconv(*inputs, backend="triton")


@requires_triton_cpu
def test_use_backend_triton_runs_the_op_on_its_kernels(monkeypatch):
    """A model moved with use_backend("triton") runs its MSFN core on the Triton kernels; in a
    dtype they do not take, it says so (as the attention op does)."""
    launched = []
    launch = triton_kernels.launch
    monkeypatch.setattr(triton_kernels, "launch", lambda kernel, *args, **kw: launched.append(kernel) or launch(kernel, *args, **kw))
    inputs = make_inputs((1, 6, 5, 5), torch.float32)
    with sparse_attn.use_backend("triton"):
        out = sparse_attn.mixed_scale_dwconv(*inputs)
    assert launched and set(launched) == {triton_kernels.mixed_scale_dwconv_forward_kernel}
    torch.testing.assert_close(out, reference(*inputs), rtol=1e-5, atol=1e-5)
    with sparse_attn.use_backend("triton"), pytest.raises(backends.BackendUnavailable, match="float64"):
        sparse_attn.mixed_scale_dwconv(*make_inputs((1, 6, 5, 5), torch.float64))
