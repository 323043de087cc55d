"""No-grad inference of the blocks in row bands (issue 15): GatedDconvFFN (and PReLUGatedFFN)
and every channel attention defined by its branches run their forward band by band, so their
widest intermediates never exist for the whole map. Banded equals unbanded on every backend, odd
sizes, B > 1, bands down to one row; banding is automatic on CPU off the reference backend only,
never under grad; and the whole-map intermediates are really gone."""
import functools

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import sparse_attn
from sparse_attn.models import DRSformer, Restormer
from sparse_attn.nn import (ChannelAttention, DeepSparseAttention, GatedDconvFFN, PReLUGatedFFN,
                            TopKChannelAttention, bands)
from sparse_attn.nn.bands import banded_inference, inference_band_rows

from model_cases import BACKENDS, runs, skip_unless_runs

MODULES = {
    "gdfn": functools.partial(GatedDconvFFN, 16, 2.66, bias=True),
    "prelu_ffn": functools.partial(PReLUGatedFFN, 16, 2.66, bias=False),
    "mdta": functools.partial(ChannelAttention, 16, 2, bias=True),
    "tksa": functools.partial(TopKChannelAttention, 16, 2, bias=False),
    "deep_sparse": functools.partial(DeepSparseAttention, 16, 2, bias=True),
}
SMALL = dict(dim=8, num_blocks=(1, 1, 1, 1), heads=(1, 2, 4, 8))
NETWORKS = {
    "restormer": functools.partial(Restormer, **SMALL, num_refinement_blocks=1),
    "drsformer": functools.partial(DRSformer, **SMALL, mefc=False),
}


def _dtype(backend):
    """float64 where the backend takes it (the Triton interpreter does not), else float32."""
    dtype = torch.float64 if runs(backend, torch.float64) else torch.float32
    skip_unless_runs(backend, dtype)
    return dtype


def _tolerance(name, dtype):
    """Relative to the output's largest entry. The feed-forward does the same arithmetic per pixel
    banded or not (its 1×1 sums run over the channels of a pixel, its depthwise over the 3×3
    around it): a few ulps at most, where a convolution's kernel blocks a band otherwise (1 ulp
    is seen in float64). The attention's Gram matrix and norms are sums over the map's pixels
    (247 here), banded into up to 19 partial sums: reassociating them moves each sum by a few
    ulps of the sum of its terms' magnitudes, which the softmax and P·v carry about one to one
    (2-3 ulps are seen): a few dozen ulps."""
    return (8 if name in ("gdfn", "prelu_ffn") else 64) * torch.finfo(dtype).eps


def _whole_and_banded(module, x, rows, backend):
    with torch.no_grad(), sparse_attn.use_backend(backend):
        with banded_inference(False):
            whole = module(x)
        with banded_inference(rows):
            banded = module(x)
    return whole, banded


def _build(factory, dtype):
    torch.manual_seed(0)
    module = factory().to(dtype).eval()
    with torch.no_grad():  # the temperature, branch weights and PReLU slope away from their defaults
        for name, p in module.named_parameters():
            if p.dim() <= 1 or name == "temperature":
                p.add_(0.3 * torch.randn_like(p))
    return module


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(MODULES))
def test_module_bands_equal_whole(name, backend):
    """B = 2 on a 19×13 map (Triton's interpreter, slow: 9×7), in bands of 1 row (the halo), 4
    (which divides no side) and 7."""
    dtype = _dtype(backend)
    module = _build(MODULES[name], dtype)
    x = torch.randn(2, 16, *((9, 7) if backend == "triton" else (19, 13)), dtype=dtype)
    for rows in (1, 4) if backend == "triton" else (1, 4, 7):
        whole, banded = _whole_and_banded(module, x, rows, backend)
        assert banded.shape == whole.shape and banded.dtype == whole.dtype
        error = (banded - whole).abs().max().item()
        assert error <= _tolerance(name, dtype) * whole.abs().max().item(), f"rows={rows}: max abs error {error:.3g}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(NETWORKS))
def test_network_bands_equal_whole(name, backend):
    """A whole network (every block banded at every level, the halo at each level's edge): B = 2,
    27×21 (padded to 32×24 inside); Triton's interpreter 13×10, B = 1."""
    dtype = _dtype(backend)
    torch.manual_seed(0)
    net = NETWORKS[name]().to(dtype).eval()
    x = torch.rand(*((1, 3, 13, 10) if backend == "triton" else (2, 3, 27, 21)), dtype=dtype)
    whole, banded = _whole_and_banded(net, x, 5, backend)
    error = (banded - whole).abs().max().item()
    assert error <= {torch.float64: 1e-10, torch.float32: 1e-5}[dtype], f"max abs error {error:.3g}"


def test_default_restormer_bands_equal_whole():
    """The default configuration (dim 48, the official depths and heads, its full channel counts),
    float32, 70×52 in bands of 8 rows on native: within the streaming tests' float32 bound."""
    torch.manual_seed(0)
    net = Restormer().eval()
    whole, banded = _whole_and_banded(net, torch.rand(1, 3, 70, 52), 8, "native")
    error = (banded - whole).abs().max().item()
    assert error <= 1e-5, f"max abs error {error:.3g}"


class _Widest(TorchDispatchMode):
    """Records the largest tensor any op returns."""

    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.numel = max(self.numel, t.numel())
        return out


@pytest.mark.parametrize("name", ["gdfn", "mdta"])
def test_the_wide_intermediates_never_exist_whole(name):
    """The FFN's 2h = 84 hidden channels and the attention's 3·16 q, k, v exist a band at a time
    only: no tensor of the banded forward is larger than the map itself (16 channels), while the
    unbanded forward makes them for the whole map."""
    module = _build(MODULES[name], torch.float32)
    x = torch.randn(1, 16, 64, 24)
    widest = {}
    for rows in (False, 8):
        with torch.no_grad(), banded_inference(rows), _Widest() as seen:
            module(x)
        widest[rows] = seen.numel
    assert widest[False] >= 3 * x.numel()
    assert widest[8] <= x.numel()


class _FirstConvolution(TorchDispatchMode):
    """Records the height of every map of width ``width`` convolved with (a slice of) ``weight``:
    as a convolution (reference) or as the matrix products of sparse_attn.nn.pointwise, whose
    operand of columns holds the map's H·W pixels."""

    _PRODUCTS = {torch.ops.aten.mm: (0, 1), torch.ops.aten.addmm: (1, 2), torch.ops.aten.bmm: (0, 1),
                 torch.ops.aten.baddbmm: (1, 2)}  # operand positions, in every overload (.out too)

    def __init__(self, weight, width):
        super().__init__()
        self.storage, self.width, self.heights = weight.untyped_storage().data_ptr(), width, []

    def _is_weight(self, t):
        return t.untyped_storage().data_ptr() == self.storage

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.convolution.default and self._is_weight(args[1]):
            self.heights.append(args[0].shape[-2])
        elif func.overloadpacket in self._PRODUCTS:
            matrix, columns = (args[i] for i in self._PRODUCTS[func.overloadpacket])
            if self._is_weight(matrix):
                self.heights.append(columns.shape[-1] // self.width)
        return func(*args, **(kwargs or {}))


def _heights_seen(module, x, rows, backend="native", grad=False):
    """The heights of the maps the module's first 1×1 convolution (project_in, qkv) reads in one
    forward (the banded attention reads q, k and v in two slices of qkv: one per pass)."""
    first = module.project_in if isinstance(module, GatedDconvFFN) else module.qkv
    with torch.set_grad_enabled(grad), sparse_attn.use_backend(backend), banded_inference(rows), \
            _FirstConvolution(first.weight, x.shape[-1]) as seen:
        module(x)
    return seen.heights


@pytest.mark.parametrize("name", ["gdfn", "mdta"])
def test_automatic_on_cpu_off_reference_only(name, monkeypatch):
    """Automatic banding (bands of AUTO_BAND_PIXELS pixels, here made 64: 4 rows of a 16-wide
    map) on native; never on reference (the baseline keeps what the official code keeps), nor
    on a map of one band, nor when turned off."""
    monkeypatch.setattr(bands, "AUTO_BAND_PIXELS", 64)
    module = _build(MODULES[name], torch.float32)
    x = torch.randn(1, 16, 18, 16)
    passes = 1 if name == "gdfn" else 2  # the attention walks the bands twice
    assert _heights_seen(module, x, None) == passes * [5, 6, 6, 6, 3]  # 4 rows and the halos
    assert _heights_seen(module, x, None, backend="reference") == [18]
    assert _heights_seen(module, x, False) == [18]
    assert _heights_seen(module, x[..., :4, :], None) == [4]
    assert _heights_seen(module, x, 6, backend="reference") == passes * [7, 8, 7]  # asked for: anywhere


@pytest.mark.parametrize("name", ["gdfn", "mdta"])
def test_training_is_unbanded(name):
    """With gradients recorded the forward is the whole-map one, even when bands are asked for,
    and its gradients are those of the plain forward."""
    module = _build(MODULES[name], torch.float64)
    x = torch.randn(2, 16, 11, 9, dtype=torch.float64, requires_grad=True)
    assert _heights_seen(module, x, 3, grad=True) == [11]
    grads = []
    for rows in (False, 3):
        with banded_inference(rows):
            grads.append(torch.autograd.grad(module(x).square().sum(), [x, *module.parameters()]))
    for banded, whole in zip(*grads):
        assert torch.equal(banded, whole)


def test_inside_compile_is_unbanded(monkeypatch):
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    with torch.no_grad(), banded_inference(2):
        assert inference_band_rows(torch.empty(1, 4, 9, 9), "native") is None


def test_bands_never_narrower_than_the_halo():
    with torch.no_grad(), banded_inference(1):
        assert inference_band_rows(torch.empty(1, 4, 9, 9), "native", halo=3) == 3


@pytest.mark.parametrize("rows", [0, -2, True, 2.5, "4"])
def test_bad_rows_are_refused(rows):
    with pytest.raises(ValueError, match="rows"):
        with banded_inference(rows):
            pass
