"""The GPU backends of mixed_scale_dwconv (the `triton` kernels compiled, and the `native` CUDA
kernels) against the float64 reference, each within the rule of helpers.py; triton against
native CUDA; determinism; gradcheck; torch.library checks and Inductor without recompiles.
Skipped where there is no CUDA device."""
import os

import pytest
import torch

from helpers import compiled_once, forward_and_grads, opcheck_every_custom_op, requires_cuda
from mixed_scale_dwconv_cases import NAMES, SHAPES, assert_close_to_reference, make_inputs, on, why_unavailable

pytestmark = [requires_cuda, pytest.mark.gpu]

# Next to the CPU shapes: DRSformer's level 1 (2h = 254) over several tiles, level 2's width,
# and a tall thin image.
GPU_SHAPES = SHAPES + [(2, 254, 67, 130), (1, 510, 64, 64), (1, 38, 200, 3)]


def require(backend, dtype=torch.float32):
    reason = why_unavailable(backend, dtype, device="cuda")
    if reason is not None:
        pytest.skip(reason)
    if backend == "triton" and os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("TRITON_INTERPRET=1: the compiled Triton kernels are not what would run")


# ---------------------------------------------------------------------------------------------
# native (CUDA)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_native_cuda_matches_reference(shape, bias, dtype):
    require("native", dtype)
    assert_close_to_reference("native", shape, dtype, bias, device="cuda")


def test_native_cuda_is_deterministic_and_gradchecks():
    require("native")
    inputs = make_inputs((2, 10, 40, 140), torch.float32, device="cuda")
    grad = torch.randn(2, 10, 40, 140, device="cuda")
    first, second = forward_and_grads(on("native"), inputs, grad), forward_and_grads(on("native"), inputs, grad)
    for name, a, b in zip(("out",) + NAMES, first, second):
        assert torch.equal(a, b), f"{name} differs between runs"
    small = [t.requires_grad_() for t in make_inputs((2, 6, 4, 5), torch.float64, device="cuda")]
    assert torch.autograd.gradcheck(on("native"), small, eps=1e-6, atol=1e-7)


# ---------------------------------------------------------------------------------------------
# triton (compiled kernels)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_triton_matches_reference(shape, bias, dtype):
    require("triton", dtype)
    assert_close_to_reference("triton", shape, dtype, bias, device="cuda")


@pytest.mark.parametrize("shape", [(2, 254, 67, 130), (1, 6, 1, 7)], ids=lambda s: "x".join(map(str, s)))
def test_triton_matches_native_cuda(shape):
    require("triton")
    require("native")
    inputs = make_inputs(shape, torch.float32, device="cuda")
    grad = torch.randn(shape, device="cuda")
    native, mine = forward_and_grads(on("native"), inputs, grad), forward_and_grads(on("triton"), inputs, grad)
    for name, a, b in zip(("out",) + NAMES, mine, native):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * b.abs().max().item(), msg=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_triton_is_deterministic(dtype):
    require("triton", dtype)
    inputs = make_inputs((2, 254, 67, 130), dtype, device="cuda")
    grad = torch.randn(2, 254, 67, 130, device="cuda").to(dtype)
    first, second = forward_and_grads(on("triton"), inputs, grad), forward_and_grads(on("triton"), inputs, grad)
    for name, a, b in zip(("out",) + NAMES, first, second):
        assert torch.equal(a, b), f"{name} differs between runs"


# ---------------------------------------------------------------------------------------------
# torch.library and torch.compile, both backends
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["triton", "native"])
def test_opcheck(backend):
    require(backend)
    checked = opcheck_every_custom_op(on(backend), make_inputs((2, 6, 5, 7), torch.float32, device="cuda"))
    assert len(checked) == 2, checked  # the forward and the backward op


@pytest.mark.parametrize("backend", ["triton", "native"])
def test_inductor_without_recompiles(backend):
    require(backend)
    with compiled_once(on(backend)) as compiled:
        for height, width in ((9, 13), (12, 7), (50, 20)):
            inputs = make_inputs((2, 6, height, width), torch.float32, device="cuda")
            grad = torch.randn(2, 6, height, width, device="cuda")
            want, got = forward_and_grads(on(backend), inputs, grad), forward_and_grads(compiled, inputs, grad)
            torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)
            for name, a, b in zip(NAMES, got[1:], want[1:]):
                torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, msg=name)
