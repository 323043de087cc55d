"""sparse_attn.nn.pointwise: the networks' 1x1 convolutions as matrix products on CPU (off the
reference backend) against the convolution they replace in float64 (forward and every
gradient), gradcheck, what backward saves, where the products run and where the convolution
stays, the checkpoint format, compile, and bad input."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import sparse_attn
from benchmarks.memory import saved_bytes
from helpers import assert_matches_float64_reference, compiled_once
from sparse_attn.nn import pointwise
from sparse_attn.nn.pointwise import PointwiseConv2d, pointwise_conv2d, runs_as_products
from sparse_attn.nn.recompute import saved_as_recipe

SHAPES = [(1, 6, 9, 7, 10), (3, 5, 4, 6, 8), (1, 1, 1, 1, 1)]  # B, C_in, H, W, C_out
_shape_id = lambda s: "B{}_Cin{}_{}x{}_Cout{}".format(*s)  # noqa: E731


@pytest.fixture(autouse=True)
def products_on_any_cpu(monkeypatch):
    """The products run only on CPUs where they were measured faster (AVX-512, or Intel with
    AVX2); the tests check them on any CPU."""
    monkeypatch.setattr(pointwise, "PRODUCTS_ON_THIS_CPU", True)


def _inputs(shape, bias, dtype=torch.float64, seed=0):
    b, c_in, h, w, c_out = shape
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, c_in, h, w, generator=g, dtype=dtype)
    weight = torch.randn(c_out, c_in, 1, 1, generator=g, dtype=dtype)
    return x, weight, torch.randn(c_out, generator=g, dtype=dtype) if bias else None


class _Ops(TorchDispatchMode):
    """The aten ops a block dispatches."""

    def __init__(self):
        super().__init__()
        self.seen = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.seen.add(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def _ops_of(call):
    with _Ops() as ops:
        call()
    return ops.seen


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", SHAPES, ids=_shape_id)
def test_products_match_the_convolution(shape, bias, dtype):
    x, weight, b = _inputs(shape, bias)
    inputs = [x, weight] + ([b] if bias else [])
    products = lambda x, w, b=None: pointwise_conv2d(x, w, b, backend="native")  # noqa: E731
    assert runs_as_products(x, weight, "native")
    assert_matches_float64_reference(products, F.conv2d, inputs, dtype, ["out", "x", "weight", "bias"][:len(inputs) + 1])


@pytest.mark.parametrize("layout", ["channels_last", "row_slice", "transposed"])
def test_noncontiguous_inputs(layout):
    x, weight, bias = _inputs((2, 6, 10, 8, 5), True)
    x = {"channels_last": x.to(memory_format=torch.channels_last), "row_slice": x[..., 2:7, :],
         "transposed": x.transpose(2, 3)}[layout]
    x.requires_grad_()
    grad_out = torch.randn(F.conv2d(x, weight, bias).shape, dtype=x.dtype)
    want = torch.autograd.grad(F.conv2d(x, weight, bias), x, grad_out)[0]
    out = pointwise_conv2d(x, weight, bias, backend="native")
    got = torch.autograd.grad(out, x, grad_out)[0]
    torch.testing.assert_close(out, F.conv2d(x, weight, bias), rtol=0, atol=1e-12)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_gradcheck():
    inputs = [t.requires_grad_() for t in _inputs((2, 3, 4, 5, 4), True)]
    assert torch.autograd.gradcheck(lambda x, w, b: pointwise_conv2d(x, w, b, backend="native"), inputs)


def test_saves_what_the_convolution_saves():
    x, weight, bias = (t.requires_grad_() for t in _inputs((1, 8, 16, 16, 24), True, torch.float32))
    conv_bytes, _ = saved_bytes(lambda: F.conv2d(x, weight, bias))
    products_bytes, out = saved_bytes(lambda: pointwise_conv2d(x, weight, bias, backend="native"))
    assert products_bytes == conv_bytes == x.nbytes + weight.nbytes
    del out


def test_a_recipe_replaces_the_saved_input():
    """The products save x as the very tensor given, so saved_as_recipe recognises it."""
    x, weight, _ = (t.requires_grad_() if t is not None else t for t in _inputs((1, 8, 16, 16, 4), False))
    hidden = x * 2

    def project():
        with saved_as_recipe(hidden, lambda: x.detach() * 2):
            return pointwise_conv2d(hidden, weight, None, backend="native")

    kept, out = saved_bytes(project)
    assert kept == weight.nbytes
    grads = torch.autograd.grad(out.sum(), (x, weight))
    want = torch.autograd.grad(F.conv2d(x * 2, weight).sum(), (x, weight))
    for got, expected in zip(grads, want):
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)


def test_where_the_products_run():
    x, weight, bias = _inputs((1, 4, 5, 5, 3), True, torch.float32)
    assert "mm" not in _ops_of(lambda: pointwise_conv2d(x, weight, bias, backend="reference"))
    assert "convolution" in _ops_of(lambda: pointwise_conv2d(x, weight, bias, backend="reference"))
    assert _ops_of(lambda: pointwise_conv2d(x, weight, bias, backend="native")) & {"mm", "addmm"}
    with sparse_attn.use_backend("reference"):
        assert not runs_as_products(x, weight)
    assert runs_as_products(x, weight)  # "auto": off reference, whatever the build has
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not runs_as_products(x, weight, "native")
        assert pointwise_conv2d(x, weight, bias, backend="native").dtype == torch.bfloat16
    assert not runs_as_products(x.double(), weight, "native")  # mixed dtypes: the convolution's error
    assert not runs_as_products(x[:0], weight, "native")
    assert not runs_as_products(x.to("meta"), weight.to("meta"), "native")  # only CPU was measured
    assert pointwise_conv2d(x[:0], weight, bias, backend="native").shape == (0, 3, 5, 5)


def test_other_cpus_keep_the_convolution(monkeypatch):
    monkeypatch.setattr(pointwise, "PRODUCTS_ON_THIS_CPU", False)
    x, weight, bias = _inputs((1, 4, 5, 5, 3), True, torch.float32)
    assert not runs_as_products(x, weight, "native")
    assert "convolution" in _ops_of(lambda: pointwise_conv2d(x, weight, bias, backend="native"))


@pytest.mark.parametrize("capability, vendor, expected", [
    ("AVX512", "GenuineIntel", True), ("AVX512", "AuthenticAMD", True), ("AVX2", "GenuineIntel", True),
    ("AVX2", "AuthenticAMD", False),  # measured 0.6-1.1x the convolution there
    ("DEFAULT", "GenuineIntel", False), ("AVX2", "", False)])
def test_where_the_products_pay(monkeypatch, capability, vendor, expected):
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    monkeypatch.setattr(pointwise, "_cpu_vendor", lambda: vendor)
    assert pointwise._products_pay_here() is expected


def test_module_is_a_conv2d_with_the_same_checkpoint():
    official = nn.Conv2d(6, 10, kernel_size=1, bias=True)
    ours = PointwiseConv2d(6, 10, bias=True, backend="native")
    ours.load_state_dict(official.state_dict())
    assert isinstance(ours, nn.Conv2d) and list(ours.state_dict()) == ["weight", "bias"]
    x = torch.randn(2, 6, 7, 9)
    torch.testing.assert_close(ours(x), official(x), rtol=1e-6, atol=1e-6)
    assert "backend='native'" in repr(ours)


def test_compiles_without_recompiles():
    x, weight, bias = (t.requires_grad_() for t in _inputs((1, 4, 6, 5, 3), True, torch.float32))
    fn = lambda x, w, b: pointwise_conv2d(x, w, b, backend="native")  # noqa: E731
    with compiled_once(fn) as compiled:
        for h in (6, 8):
            xi = torch.randn(1, 4, h, 5, requires_grad=True)
            out = compiled(xi, weight, bias)
            torch.testing.assert_close(out, F.conv2d(xi, weight, bias), rtol=1e-5, atol=1e-5)
            out.sum().backward()


def test_bad_weight_is_named():
    x, weight, _ = _inputs((1, 4, 5, 5, 3), False)
    with pytest.raises(ValueError, match="weight"):
        pointwise_conv2d(x, weight[:, :3], backend="native")
    with pytest.raises(ValueError, match="weight"):
        pointwise_conv2d(x, torch.randn(3, 4, 3, 3, dtype=x.dtype), backend="native")


def test_output_can_be_modified_in_place():
    """The products' output is a tensor of its own, not a view (autograd refuses in-place changes
    to a custom Function's view outputs; MEFC's lean form sums into its first term)."""
    x, weight, _ = (t.requires_grad_() if t is not None else t for t in _inputs((2, 3, 4, 5, 4), False))
    out = pointwise_conv2d(x, weight, None, backend="native")
    assert out._base is None
    out.add_(pointwise_conv2d(x, weight, None, backend="native"))
    grads = torch.autograd.grad(out.sum(), (x, weight))
    want = torch.autograd.grad((2 * F.conv2d(x, weight)).sum(), (x, weight))
    for got, expected in zip(grads, want):
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
