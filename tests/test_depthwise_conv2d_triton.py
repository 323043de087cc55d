"""The `triton` backend of depthwise_conv2d (DESIGN.md §5) on CPU tensors, in Triton's interpreter
(TRITON_INTERPRET=1, set by conftest.py), against the float64 reference: forward and every
gradient for every kernel size and dilations 1 to 3; fp16; the GPU block sizes; several channel
blocks; determinism; torch.library and torch.compile; the errors of a backend that cannot run.
The compiled kernels are tested on a GPU by test_depthwise_conv2d_gpu.py. Sizes are small: the
interpreter runs each program in numpy."""
import importlib

import pytest
import torch

import sparse_attn
from block_ops_cases import (DEPTHWISE_CASES, DEPTHWISE_NAMES, assert_depthwise_close, depthwise_fn,
                             depthwise_inputs)
from helpers import assert_deterministic, forward_and_grads, opcheck_every_custom_op
from sparse_attn import backends

TRITON_CPU = backends.why_unavailable("triton", "cpu")
pytestmark = pytest.mark.skipif(TRITON_CPU is not None, reason=f"triton on CPU tensors: {TRITON_CPU}")
triton_kernels = pytest.importorskip("sparse_attn.kernels.depthwise_conv2d", reason="Triton is not installed")
_case_id = lambda c: "B{}C{}_{}x{}_k{}d{}".format(*c)  # noqa: E731


def test_the_kernels_take_the_ops_kernel_sizes():
    op_module = importlib.import_module("sparse_attn.ops.depthwise_conv2d")  # the package exports the function
    assert triton_kernels.KERNEL_SIZES == op_module.KERNEL_SIZES


# The interpreter's tiles are as large as the image up to 32 x 64: the native tests' cases cover
# every kernel size and dilation, images narrower than the window's reach and, at 70 x 133, 3 x 3
# ragged tiles.
@pytest.mark.parametrize("case", DEPTHWISE_CASES, ids=_case_id)
def test_matches_reference(case):
    assert_depthwise_close("triton", case, torch.float32, bias=True)


@pytest.mark.parametrize("case", [(2, 3, 5, 9, 3, 1), (1, 4, 7, 37, 7, 2)], ids=_case_id)
def test_matches_reference_without_bias(case):
    assert_depthwise_close("triton", case, torch.float32, bias=False)


@pytest.mark.parametrize("case", [(2, 3, 5, 9, 3, 1), (1, 4, 7, 37, 7, 2)], ids=_case_id)
def test_float16_within_the_float16_reference_error(case):
    assert_depthwise_close("triton", case, torch.float16, bias=True)


def test_the_gpu_block_sizes_in_the_interpreter(monkeypatch):
    """One channel of a 16 x 64 tile per program: 2 x 2 ragged tiles, two images, windows that
    cross the tiles' edges (K = 5, dilation 2: a reach of 4)."""
    monkeypatch.setattr(triton_kernels, "interpreter_blocks", lambda *_: triton_kernels.GPU_BLOCKS)
    assert_depthwise_close("triton", (2, 1, 19, 70, 5, 2), torch.float32, bias=True)


def test_several_channel_blocks_with_ragged_ends(monkeypatch):
    blocks = triton_kernels.interpreter_blocks
    monkeypatch.setattr(triton_kernels, "interpreter_blocks", lambda *shape: {**blocks(*shape), "CHANNELS": 4})
    assert_depthwise_close("triton", (2, 7, 6, 5, 3, 2), torch.float32, bias=True)


def test_gradients_are_deterministic():
    # 32 x 64 tiles: the parameter gradients add the partials of 2 images x 2 x 2 tiles
    inputs = depthwise_inputs((2, 2, 33, 65), 3, torch.float32)
    assert_deterministic(depthwise_fn("triton", 1), inputs, torch.randn(2, 2, 33, 65), DEPTHWISE_NAMES)


@pytest.mark.parametrize("bias", [True, False])
def test_opcheck(bias):
    # K = 1: opcheck runs the kernels many times, and each tap costs the interpreter
    checked = opcheck_every_custom_op(depthwise_fn("triton", 2), depthwise_inputs((2, 4, 5, 7), 1, torch.float32, bias))
    assert checked == ["sparse_attn.depthwise_conv2d_triton_backward.default",
                       "sparse_attn.depthwise_conv2d_triton_forward.default"], checked


def test_compiled_op_does_not_recompile_for_new_image_sizes():
    """fullgraph under aot_eager (the interpreted kernels are opaque custom ops)."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    fn = depthwise_fn("triton", 2)
    compiled = torch.compile(fn, backend=counter, fullgraph=True, dynamic=True)
    for height, width in ((9, 13), (12, 7), (5, 20)):
        inputs = depthwise_inputs((2, 3, height, width), 3, torch.float32)
        grad = torch.randn(2, 3, height, width)
        want, got = forward_and_grads(fn, inputs, grad), forward_and_grads(compiled, inputs, grad)
        assert torch.equal(got[0], want[0])
        for name, a, b in zip(DEPTHWISE_NAMES, got[1:], want[1:]):
            assert torch.equal(a, b), name
    assert counter.frame_count == 1, f"compiled {counter.frame_count} times for 3 image sizes"


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=str)
def test_unsupported_dtypes_say_why(dtype):
    x, weight, bias = depthwise_inputs((1, 6, 5, 5), 3, dtype)
    with pytest.raises(backends.BackendUnavailable, match="float32, float16"):
        sparse_attn.depthwise_conv2d(x, weight, bias, backend="triton")
