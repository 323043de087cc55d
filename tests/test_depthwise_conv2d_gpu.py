"""The GPU backends of depthwise_conv2d (the `triton` kernels compiled, and the `native` CUDA
kernels) against the float64 reference, each within the rule of helpers.py; triton against
native CUDA; determinism; gradcheck; torch.library checks and Inductor without recompiles.
Skipped where there is no CUDA device."""
import os

import pytest
import torch

import sparse_attn
from block_ops_cases import (DEPTHWISE_CASES, DEPTHWISE_NAMES, assert_depthwise_close, depthwise_fn,
                             depthwise_inputs)
from helpers import compiled_once, forward_and_grads, opcheck_every_custom_op, requires_cuda
from sparse_attn import backends

pytestmark = [requires_cuda, pytest.mark.gpu]
_case_id = lambda c: "B{}C{}_{}x{}_k{}d{}".format(*c)  # noqa: E731

# (B, C, H, W, K, dilation), next to the CPU cases. The CUDA kernels split the image into d x d
# phases and each phase's lattice into 32 x 32 tiles: DRSformer's qkv_dwconv at level 1
# (C = 3·48) over several ragged tiles, a dilated 7x7 expert at 64², a tall thin image, and
# dilations as large as the image (one pixel per phase) and larger (phases without pixels).
GPU_CASES = DEPTHWISE_CASES + [(2, 144, 67, 130, 3, 1), (1, 64, 64, 64, 7, 2), (1, 38, 200, 3, 5, 2),
                               (1, 3, 40, 50, 3, 17), (2, 2, 5, 9, 3, 10)]


def require(backend, dtype=torch.float32):
    x, weight, bias = depthwise_inputs((1, 2, 4, 4), 3, dtype, device="cuda")
    reason = backends.explain(sparse_attn.depthwise_conv2d, x, weight, bias).reasons[backend]
    if reason is not None:
        pytest.skip(f"{backend}: {reason}")
    if backend == "triton" and os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("TRITON_INTERPRET=1: the compiled Triton kernels are not what would run")


# ---------------------------------------------------------------------------------------------
# native (CUDA)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("case", GPU_CASES, ids=_case_id)
def test_native_cuda_matches_reference(case, bias, dtype):
    require("native", dtype)
    assert_depthwise_close("native", case, dtype, bias, device="cuda")


@pytest.mark.parametrize("kernel,dilation", [(1, 1), (3, 2), (7, 1)])
def test_native_cuda_gradchecks(kernel, dilation):
    require("native", torch.float64)
    inputs = [t.requires_grad_() for t in depthwise_inputs((2, 3, 6, 7), kernel, torch.float64, device="cuda")]
    assert torch.autograd.gradcheck(depthwise_fn("native", dilation), inputs, eps=1e-6, atol=1e-7)


# ---------------------------------------------------------------------------------------------
# triton (compiled kernels)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", GPU_CASES, ids=_case_id)
def test_triton_matches_reference(case, dtype):
    require("triton", dtype)
    assert_depthwise_close("triton", case, dtype, bias=True, device="cuda")


def test_triton_without_bias():
    require("triton")
    assert_depthwise_close("triton", (2, 6, 37, 70, 5, 2), torch.float32, bias=False, device="cuda")


@pytest.mark.parametrize("case", [(2, 144, 67, 130, 3, 1), (1, 64, 64, 64, 7, 2), (1, 6, 1, 7, 5, 1)], ids=_case_id)
def test_triton_matches_native_cuda(case):
    require("triton")
    require("native")
    *shape, kernel, dilation = case
    inputs = depthwise_inputs(shape, kernel, torch.float32, device="cuda")
    grad = torch.randn(shape, device="cuda")
    native = forward_and_grads(depthwise_fn("native", dilation), inputs, grad)
    mine = forward_and_grads(depthwise_fn("triton", dilation), inputs, grad)
    for name, a, b in zip(("out",) + DEPTHWISE_NAMES, mine, native):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * b.abs().max().item(), msg=name)


# ---------------------------------------------------------------------------------------------
# Both backends: determinism, torch.library and torch.compile
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["triton", "native"])
@pytest.mark.parametrize("kernel,dilation", [(3, 1), (7, 2)])
def test_is_deterministic(backend, kernel, dilation):
    require(backend)
    inputs = depthwise_inputs((2, 144, 67, 130), kernel, torch.float32, device="cuda")
    grad = torch.randn(2, 144, 67, 130, device="cuda")
    fn = depthwise_fn(backend, dilation)
    first, second = forward_and_grads(fn, inputs, grad), forward_and_grads(fn, inputs, grad)
    for name, a, b in zip(("out",) + DEPTHWISE_NAMES, first, second):
        assert torch.equal(a, b), f"{name} differs between runs"


@pytest.mark.parametrize("backend", ["triton", "native"])
@pytest.mark.parametrize("bias", [True, False])
def test_opcheck(backend, bias):
    require(backend)
    checked = opcheck_every_custom_op(depthwise_fn(backend, 2),
                                      depthwise_inputs((2, 6, 5, 7), 3, torch.float32, bias, device="cuda"))
    assert len(checked) == 2, checked  # the forward and the backward op


@pytest.mark.parametrize("backend", ["triton", "native"])
def test_inductor_without_recompiles(backend):
    require(backend)
    fn = depthwise_fn(backend, 2)
    with compiled_once(fn) as compiled:
        for height, width in ((9, 13), (12, 7), (50, 20)):
            inputs = depthwise_inputs((2, 6, height, width), 5, torch.float32, device="cuda")
            grad = torch.randn(2, 6, height, width, device="cuda")
            want, got = forward_and_grads(fn, inputs, grad), forward_and_grads(compiled, inputs, grad)
            torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)
            for name, a, b in zip(DEPTHWISE_NAMES, got[1:], want[1:]):
                torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, msg=name)


def test_auto_picks_a_gpu_backend():
    x, weight, bias = depthwise_inputs((1, 4, 9, 9), 3, torch.float32, device="cuda")
    explanation = backends.explain(sparse_attn.depthwise_conv2d, x, weight, bias, 2)
    assert explanation.chosen in ("triton", "native"), str(explanation)
