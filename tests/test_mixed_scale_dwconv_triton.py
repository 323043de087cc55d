"""The `triton` backend of mixed_scale_dwconv (DESIGN.md §2): on CPU tensors in Triton's
interpreter (TRITON_INTERPRET=1, set by conftest.py) against the float64 reference, forward and
every gradient; deterministic weight gradients; torch.library and torch.compile; the errors of a
backend that cannot run. Where a GPU is present (tests marked `gpu`), the compiled kernels
against the reference and the native CUDA kernels. Sizes are small: the interpreter runs each
program in numpy."""
import os

import pytest
import torch

import sparse_attn
from mixed_scale_dwconv_cases import (NAMES, SHAPES, assert_close_to_reference, forward_and_grads, make_inputs,
                                     opcheck_forward_and_backward)
from sparse_attn import backends
from sparse_attn.reference import mixed_scale_dwconv as reference

TRITON_CPU = backends.why_unavailable("triton", "cpu")
requires_triton_cpu = pytest.mark.skipif(TRITON_CPU is not None, reason=f"triton on CPU tensors: {TRITON_CPU}")
triton_kernels = pytest.importorskip("sparse_attn.kernels.mixed_scale_dwconv", reason="Triton is not installed")

# The interpreter's frames are as large as the image up to 32 x 64 pixels (28 x 60 tiles), of up to
# 16 channels: next to the shapes of the native tests (a 37 x 133 image would take the
# interpreter long), an image of 2 x 2 ragged tiles, an even h (no output group reads both y3
# and y5) and several batches, tiles and channel blocks at once (h = 19: ragged blocks in both
# halves).
TRITON_SHAPES = [s for s in SHAPES if s[2] * s[3] <= 100] + [(1, 6, 30, 70), (1, 8, 6, 5), (2, 38, 30, 7)]


def _triton(*args):
    return sparse_attn.mixed_scale_dwconv(*args, backend="triton")


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
    out, grads = forward_and_grads(_triton, half, grad)
    out32, grads32 = forward_and_grads(_triton, single, grad.float())
    assert torch.equal(out, out32.half())
    for name, a, b in zip(NAMES, grads, grads32):
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
        assert torch.equal(run[0], first[0])
        for name, a, b in zip(NAMES, run[1], first[1]):
            assert torch.equal(a, b), f"{name} differs between runs"


# ---------------------------------------------------------------------------------------------
# torch.library and torch.compile
# ---------------------------------------------------------------------------------------------
@requires_triton_cpu
@pytest.mark.parametrize("bias", [True, False])
def test_opcheck(bias):
    inputs = [t.requires_grad_() if t is not None else None for t in make_inputs((2, 2, 3, 4), torch.float32, bias)]
    ops = torch.ops.sparse_attn
    opcheck_forward_and_backward(ops.mixed_scale_dwconv_triton_forward, ops.mixed_scale_dwconv_triton_backward, inputs)


@requires_triton_cpu
def test_compiled_op_forward_and_backward_do_not_recompile_for_new_image_sizes():
    """fullgraph under aot_eager, which runs the op's fake and autograd registrations with
    symbolic sizes: one compilation serves every H x W. (In the interpreter the ops are opaque
    custom ops; on a GPU they are triton_ops whose kernels Inductor sees: the GPU test below.)"""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(_triton, backend=counter, fullgraph=True, dynamic=True)
    for height, width in ((9, 13), (12, 7), (5, 20)):
        inputs = make_inputs((2, 6, height, width), torch.float32)
        grad = torch.randn(2, 6, height, width)
        want, got = forward_and_grads(_triton, inputs, grad), forward_and_grads(compiled, inputs, grad)
        assert torch.equal(got[0], want[0])
        for name, a, b in zip(NAMES, got[1], want[1]):
            assert torch.equal(a, b), name
    assert counter.frame_count == 1, f"compiled {counter.frame_count} times for 3 image sizes"


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


# ---------------------------------------------------------------------------------------------
# GPU: the compiled kernels (skipped without a CUDA device, and under TRITON_INTERPRET=1)
# ---------------------------------------------------------------------------------------------
def require_gpu(backend, dtype=torch.float32):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device (none here)")
    x, *params = make_inputs((1, 2, 4, 4), dtype, device="cuda")
    reason = backends.explain(sparse_attn.mixed_scale_dwconv, x, *params).reasons[backend]
    if reason is not None:
        pytest.skip(f"{backend}: {reason}")
    if backend == "triton" and os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("TRITON_INTERPRET=1: the compiled Triton kernels are not what would run")


GPU_SHAPES = SHAPES + [(2, 254, 67, 130), (1, 510, 64, 64), (1, 38, 200, 3)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_gpu_matches_reference(shape, bias, dtype):
    require_gpu("triton", dtype)
    assert_close_to_reference("triton", shape, dtype, bias, device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(2, 254, 67, 130), (1, 6, 1, 7)], ids=lambda s: "x".join(map(str, s)))
def test_gpu_matches_native_cuda(shape):
    require_gpu("triton")
    require_gpu("native")
    inputs = make_inputs(shape, torch.float32, device="cuda")
    grad = torch.randn(shape, device="cuda")
    native = forward_and_grads(lambda *a: sparse_attn.mixed_scale_dwconv(*a, backend="native"), inputs, grad)
    mine = forward_and_grads(_triton, inputs, grad)
    for name, a, b in zip(("out",) + NAMES, [mine[0], *mine[1]], [native[0], *native[1]]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * b.abs().max().item(), msg=name)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gpu_is_deterministic(dtype):
    require_gpu("triton", dtype)
    inputs = make_inputs((2, 254, 67, 130), dtype, device="cuda")
    grad = torch.randn(2, 254, 67, 130, device="cuda").to(dtype)
    first, second = forward_and_grads(_triton, inputs, grad), forward_and_grads(_triton, inputs, grad)
    assert torch.equal(first[0], second[0])
    for name, a, b in zip(NAMES, first[1], second[1]):
        assert torch.equal(a, b), f"{name} differs between runs"


@pytest.mark.gpu
def test_gpu_opcheck_and_inductor_without_recompiles():
    require_gpu("triton")
    inputs = [t.requires_grad_() for t in make_inputs((2, 6, 5, 7), torch.float32, device="cuda")]
    torch.library.opcheck(torch.ops.sparse_attn.mixed_scale_dwconv_triton_forward.default, tuple(inputs))
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(_triton, backend=counter, fullgraph=True, dynamic=True)
    for height, width in ((9, 13), (12, 7), (50, 20)):
        inputs = make_inputs((2, 6, height, width), torch.float32, device="cuda")
        grad = torch.randn(2, 6, height, width, device="cuda")
        want, got = forward_and_grads(_triton, inputs, grad), forward_and_grads(compiled, inputs, grad)
        torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)
        for name, a, b in zip(NAMES, got[1], want[1]):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, msg=name)
    assert counter.frame_count == 1, f"compiled {counter.frame_count} times for 3 image sizes"
