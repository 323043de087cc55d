"""The `triton` backend of gated_dwconv (DESIGN.md §5): on CPU tensors in Triton's interpreter
(TRITON_INTERPRET=1, set by conftest.py) against the float64 reference, forward and every
gradient, every activation; fp16; the GPU block sizes; determinism; torch.library and
torch.compile; the errors of a backend that cannot run. Where a GPU is present (tests marked
`gpu`), the compiled kernels against the reference and the native CUDA kernels. Sizes are small:
the interpreter runs each program in numpy."""
import os

import pytest
import torch

import sparse_attn
from block_ops_cases import GATED_NAMES, GATED_SHAPES, assert_gated_close, gated_fn, gated_inputs
from helpers import forward_and_grads
from sparse_attn import backends
from sparse_attn.reference.gated_dwconv import ACTIVATIONS
from test_gated_dwconv import opcheck_forward_and_backward

TRITON_CPU = backends.why_unavailable("triton", "cpu")
requires_triton_cpu = pytest.mark.skipif(TRITON_CPU is not None, reason=f"triton on CPU tensors: {TRITON_CPU}")
triton_kernels = pytest.importorskip("sparse_attn.kernels.gated_dwconv", reason="Triton is not installed")
_shape_id = lambda s: "x".join(map(str, s))  # noqa: E731

# The interpreter's tiles are as large as the image up to 32 x 64: next to the small shapes of the
# native tests, an image of 2 x 2 ragged tiles.
TRITON_SHAPES = [s for s in GATED_SHAPES if s[2] * s[3] <= 100] + [(1, 6, 40, 70)]


@requires_triton_cpu
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", TRITON_SHAPES, ids=_shape_id)
def test_matches_reference(shape, bias):
    assert_gated_close("triton", shape, torch.float32, bias, "gelu")


@requires_triton_cpu
@pytest.mark.parametrize("activation", [a for a in ACTIVATIONS if a != "gelu"])
def test_matches_reference_for_every_activation(activation):
    assert_gated_close("triton", (2, 6, 5, 9), torch.float32, True, activation)


@requires_triton_cpu
def test_float16_within_the_float16_reference_error():
    assert_gated_close("triton", (2, 6, 5, 9), torch.float16, True, "gelu")


@requires_triton_cpu
def test_the_gpu_block_sizes_in_the_interpreter(monkeypatch):
    """One channel of a 16 x 64 tile per program: 2 x 2 ragged tiles, two images, odd h."""
    monkeypatch.setattr(triton_kernels, "interpreter_blocks", lambda *_: triton_kernels.GPU_BLOCKS)
    assert_gated_close("triton", (2, 6, 19, 70), torch.float32, True, "prelu")


@requires_triton_cpu
def test_several_channel_blocks_with_ragged_ends(monkeypatch):
    blocks = triton_kernels.interpreter_blocks
    monkeypatch.setattr(triton_kernels, "interpreter_blocks", lambda *shape: {**blocks(*shape), "CHANNELS": 4})
    assert_gated_close("triton", (2, 14, 6, 5), torch.float32, True, "gelu")


@requires_triton_cpu
def test_gradients_are_deterministic():
    inputs = gated_inputs((2, 6, 40, 70), torch.float32, True, "prelu")
    grad = torch.randn(2, 3, 40, 70)
    fn = gated_fn("triton", "prelu")
    first, second = forward_and_grads(fn, inputs, grad), forward_and_grads(fn, inputs, grad)
    assert torch.equal(first[0], second[0])
    for name, a, b in zip(GATED_NAMES, first[1:], second[1:]):
        assert torch.equal(a, b), f"{name} differs between runs"


@requires_triton_cpu
@pytest.mark.parametrize("activation", ["gelu", "prelu"])
def test_opcheck(activation):
    inputs = [t.requires_grad_() if t is not None else None
              for t in gated_inputs((2, 4, 3, 4), torch.float32, True, activation)]
    ops = torch.ops.sparse_attn
    opcheck_forward_and_backward(ops.gated_dwconv_triton_forward, ops.gated_dwconv_triton_backward, inputs,
                                 ACTIVATIONS.index(activation))


@requires_triton_cpu
def test_compiled_op_does_not_recompile_for_new_image_sizes():
    """fullgraph under aot_eager (the interpreted kernels are opaque custom ops)."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    fn = gated_fn("triton", "gelu")
    compiled = torch.compile(fn, backend=counter, fullgraph=True, dynamic=True)
    for height, width in ((9, 13), (12, 7), (5, 20)):
        inputs = gated_inputs((2, 6, height, width), torch.float32)
        grad = torch.randn(2, 3, height, width)
        want, got = forward_and_grads(fn, inputs, grad), forward_and_grads(compiled, inputs, grad)
        assert torch.equal(got[0], want[0])
        for name, a, b in zip(GATED_NAMES, got[1:], want[1:]):
            assert (a is None and b is None) or torch.equal(a, b), name
    assert counter.frame_count == 1, f"compiled {counter.frame_count} times for 3 image sizes"


@requires_triton_cpu
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=str)
def test_unsupported_dtypes_say_why(dtype):
    x, weight, bias, _ = gated_inputs((1, 6, 5, 5), dtype)
    with pytest.raises(backends.BackendUnavailable, match="float32, float16"):
        sparse_attn.gated_dwconv(x, weight, bias, backend="triton")


# ---------------------------------------------------------------------------------------------
# GPU: the compiled kernels (skipped without a CUDA device, and under TRITON_INTERPRET=1)
# ---------------------------------------------------------------------------------------------
def require_gpu(backend, dtype=torch.float32):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device (none here)")
    x, weight, bias, _ = gated_inputs((1, 2, 4, 4), dtype, device="cuda")
    reason = backends.explain(sparse_attn.gated_dwconv, x, weight, bias).reasons[backend]
    if reason is not None:
        pytest.skip(f"{backend}: {reason}")
    if backend == "triton" and os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("TRITON_INTERPRET=1: the compiled Triton kernels are not what would run")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("shape", GATED_SHAPES + [(2, 254, 67, 130)], ids=_shape_id)
def test_gpu_matches_reference(shape, activation, dtype):
    require_gpu("triton", dtype)
    assert_gated_close("triton", shape, dtype, True, activation, device="cuda")


@pytest.mark.gpu
def test_gpu_matches_native_cuda():
    require_gpu("triton")
    require_gpu("native")
    inputs = gated_inputs((2, 254, 67, 130), torch.float32, True, "prelu", device="cuda")
    grad = torch.randn(2, 127, 67, 130, device="cuda")
    native = forward_and_grads(gated_fn("native", "prelu"), inputs, grad)
    mine = forward_and_grads(gated_fn("triton", "prelu"), inputs, grad)
    for name, a, b in zip(("out",) + GATED_NAMES, mine, native):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * b.abs().max().item(), msg=name)
