"""The `triton` backend of layer_norm2d (DESIGN.md §5): on CPU tensors in Triton's interpreter
(TRITON_INTERPRET=1, set by conftest.py) against the float64 reference, forward and every
gradient; fp16; the GPU block sizes; determinism; torch.library and torch.compile; the errors of
a backend that cannot run. Where a GPU is present (tests marked `gpu`), the compiled kernels
against the reference and the native CUDA kernels. Sizes are small: the interpreter runs each
program in numpy."""
import os

import pytest
import torch

import sparse_attn
from block_ops_cases import (LAYER_NORM_NAMES, LAYER_NORM_SHAPES, assert_layer_norm_close, layer_norm_fn,
                             layer_norm_inputs)
from helpers import forward_and_grads
from sparse_attn import backends
from test_layer_norm2d import opcheck_forward_and_backward

TRITON_CPU = backends.why_unavailable("triton", "cpu")
requires_triton_cpu = pytest.mark.skipif(TRITON_CPU is not None, reason=f"triton on CPU tensors: {TRITON_CPU}")
triton_kernels = pytest.importorskip("sparse_attn.kernels.layer_norm2d", reason="Triton is not installed")
_shape_id = lambda s: "x".join(map(str, s))  # noqa: E731
_triton = layer_norm_fn("triton")


@requires_triton_cpu
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", LAYER_NORM_SHAPES, ids=_shape_id)
def test_matches_reference(shape, bias):
    assert_layer_norm_close("triton", shape, torch.float32, bias)


@requires_triton_cpu
@pytest.mark.parametrize("bias", [True, False])
def test_float16_within_the_float16_reference_error(bias):
    assert_layer_norm_close("triton", (2, 48, 5, 9), torch.float16, bias)


@requires_triton_cpu
def test_the_gpu_block_sizes_in_the_interpreter(monkeypatch):
    """32 channels x 128 pixels per program: ragged channel and pixel blocks, several programs
    per image and two images."""
    monkeypatch.setattr(triton_kernels, "interpreter_blocks", lambda *_: triton_kernels.GPU_BLOCKS)
    assert_layer_norm_close("triton", (2, 70, 11, 13), torch.float32, True)
    assert_layer_norm_close("triton", (1, 5, 3, 50), torch.float32, False)


@requires_triton_cpu
def test_gradients_are_deterministic(monkeypatch):
    monkeypatch.setattr(triton_kernels, "interpreter_blocks", lambda *_: {**triton_kernels.GPU_BLOCKS, "BLOCK_P": 16})
    inputs = layer_norm_inputs((2, 6, 9, 11), torch.float32)
    grad = torch.randn(2, 6, 9, 11)
    first, second = forward_and_grads(_triton, inputs, grad), forward_and_grads(_triton, inputs, grad)
    assert torch.equal(first[0], second[0])
    for name, a, b in zip(LAYER_NORM_NAMES, first[1:], second[1:]):
        assert torch.equal(a, b), f"{name} differs between runs"


@requires_triton_cpu
@pytest.mark.parametrize("bias", [True, False])
def test_opcheck(bias):
    inputs = [t.requires_grad_() if t is not None else None for t in layer_norm_inputs((2, 5, 3, 4), torch.float32, bias)]
    ops = torch.ops.sparse_attn
    opcheck_forward_and_backward(ops.layer_norm2d_triton_forward, ops.layer_norm2d_triton_backward, inputs)


@requires_triton_cpu
def test_compiled_op_does_not_recompile_for_new_image_sizes():
    """fullgraph under aot_eager (the interpreted kernels are opaque custom ops)."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(_triton, backend=counter, fullgraph=True, dynamic=True)
    first_frames = None
    for height, width in ((9, 13), (12, 7), (5, 20)):
        inputs = layer_norm_inputs((2, 6, height, width), torch.float32)
        grad = torch.randn(2, 6, height, width)
        want, got = forward_and_grads(_triton, inputs, grad), forward_and_grads(compiled, inputs, grad)
        assert torch.equal(got[0], want[0])
        for name, a, b in zip(LAYER_NORM_NAMES, got[1:], want[1:]):
            assert torch.equal(a, b), name
        first_frames = first_frames or counter.frame_count  # (one restart to specialise eps)
    assert first_frames <= 2 and counter.frame_count == first_frames, f"compiled {counter.frame_count} times"


@requires_triton_cpu
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=str)
def test_unsupported_dtypes_say_why(dtype):
    inputs = layer_norm_inputs((1, 6, 5, 5), dtype)
    with pytest.raises(backends.BackendUnavailable, match="float32, float16"):
        sparse_attn.layer_norm2d(*inputs, backend="triton")


# ---------------------------------------------------------------------------------------------
# GPU: the compiled kernels (skipped without a CUDA device, and under TRITON_INTERPRET=1)
# ---------------------------------------------------------------------------------------------
def require_gpu(backend, dtype=torch.float32):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device (none here)")
    x, weight, bias = layer_norm_inputs((1, 2, 4, 4), dtype, device="cuda")
    reason = backends.explain(sparse_attn.layer_norm2d, x, weight, bias).reasons[backend]
    if reason is not None:
        pytest.skip(f"{backend}: {reason}")
    if backend == "triton" and os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("TRITON_INTERPRET=1: the compiled Triton kernels are not what would run")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", LAYER_NORM_SHAPES + [(2, 48, 130, 70)], ids=_shape_id)
def test_gpu_matches_reference(shape, bias, dtype):
    require_gpu("triton", dtype)
    assert_layer_norm_close("triton", shape, dtype, bias, device="cuda")


@pytest.mark.gpu
def test_gpu_matches_native_cuda():
    require_gpu("triton")
    require_gpu("native")
    inputs = layer_norm_inputs((2, 48, 130, 70), torch.float32, device="cuda")
    grad = torch.randn(2, 48, 130, 70, device="cuda")
    native = forward_and_grads(layer_norm_fn("native"), inputs, grad)
    mine = forward_and_grads(_triton, inputs, grad)
    for name, a, b in zip(("out",) + LAYER_NORM_NAMES, mine, native):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * b.abs().max().item(), msg=name)
