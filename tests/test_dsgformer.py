"""The sparse gated deblurring transformer (issue 6): its two modules against plain formulas,
the network on every backend, torch.compile, and a short training run on synthetic motion blur."""
import functools

import pytest
import torch
import torch.nn.functional as F

import sparse_attn
from sparse_attn.models import DSGformer, Restormer
from sparse_attn.nn import DeepSparseAttention, FrequencyGatedFFN, frequency_gated_ffn
from sparse_attn.nn.frequency_gated_ffn import patch_filter_as_products, patch_spectral_filter

from benchmarks.memory import saved_bytes
from helpers import assert_matches_float64_reference
from model_cases import BACKENDS, assert_training_agrees, skip_unless_runs, train_steps, training_dtype

SMALL = dict(dim=8, num_blocks=(1, 1, 1, 1), num_refinement_blocks=1, heads=(1, 2, 4, 8))
small_model = functools.partial(DSGformer, **SMALL)


# ---------------------------------------------------------------------------------------------
# The modules against plain formulas
# ---------------------------------------------------------------------------------------------
def _plain_deep_sparse_attention(module, x):
    """Written out with torch.topk (random inputs have no ties)."""
    b, c, h, w = x.shape
    heads = module.num_heads
    q, k, v = module.qkv_dwconv(module.qkv(x)).chunk(3, dim=1)
    q, k, v = (t.reshape(b, heads, c // heads, h * w) for t in (q, k, v))
    scores = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1) * module.temperature
    kept = torch.zeros_like(scores).scatter_(-1, scores.topk(module.topk, dim=-1).indices, 1.0) > 0
    softmax_branch = scores.masked_fill(~kept, float("-inf")).softmax(dim=-1)
    relu2_branch = torch.relu(scores).square() * kept
    w_soft, w_relu = torch.softmax(module.branch_logits, dim=0)
    out = (w_soft * softmax_branch + w_relu * relu2_branch) @ v
    return module.project_out(out.reshape(b, c, h, w))


@pytest.mark.parametrize("dim, heads, keep, topk", [(48, 1, (2, 3), 32), (96, 2, (2, 3), 32), (30, 2, (1, 2), 7)])
def test_deep_sparse_attention_matches_the_formula(dim, heads, keep, topk):
    module = DeepSparseAttention(dim, heads, bias=False, keep_fraction=keep).double()
    assert module.topk == topk
    with torch.no_grad():
        module.temperature.uniform_(0.5, 2.0)
        module.branch_logits.copy_(torch.tensor([0.3, -0.4]))
    x = torch.randn(2, dim, 5, 7, dtype=torch.float64)
    for backend in BACKENDS:
        if backend == "triton":
            continue  # float64 is not a dtype of the Triton interpreter; covered in float32 below
        with sparse_attn.use_backend(backend):
            torch.testing.assert_close(module(x), _plain_deep_sparse_attention(module, x), rtol=1e-12, atol=1e-12)


def test_deep_sparse_attention_branch_weights_start_equal_and_learn():
    module = DeepSparseAttention(16, 2, bias=False)
    assert torch.equal(torch.softmax(module.branch_logits, 0), torch.tensor([0.5, 0.5]))
    module(torch.randn(1, 16, 4, 4)).square().sum().backward()
    assert module.branch_logits.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="keep_fraction"):
        DeepSparseAttention(16, 2, bias=False, keep_fraction=(3, 2))
    with pytest.raises(ValueError, match="keeps no channel"):
        DeepSparseAttention(4, 2, bias=False, keep_fraction=(1, 3))


def _plain_frequency_gated_ffn(module, x):
    """FFTformer's per-patch filter written with unfold/fold, then the gate."""
    p = module.patch_size
    y = module.project_in(x)
    b, c, h, w = y.shape
    hp, wp = -(-h // p) * p, -(-w // p) * p
    y = F.pad(y, (0, wp - w, 0, hp - h))
    patches = F.unfold(y, p, stride=p).reshape(b, c, p, p, -1).permute(0, 1, 4, 2, 3)  # (B, C, L, p, p)
    filt = module.fft.reshape(c, 1, p, p // 2 + 1)
    filtered = torch.fft.irfft2(torch.fft.rfft2(patches) * filt, s=(p, p))
    y = F.fold(filtered.permute(0, 1, 3, 4, 2).reshape(b, c * p * p, -1), (hp, wp), p, stride=p)[..., :h, :w]
    x1, x2 = module.dwconv(y).chunk(2, dim=1)
    act = F.gelu(x1) if module.gate == "gelu" else torch.relu(x1) ** 2
    return module.project_out(act * x2)


@pytest.mark.parametrize("gate", ["gelu", "relu2"])
@pytest.mark.parametrize("size", [(16, 24), (13, 5), (2, 2)])
def test_frequency_gated_ffn_matches_the_formula(gate, size):
    module = FrequencyGatedFFN(8, 2.66, bias=True, gate=gate).double()
    assert module.fft.shape == (42, 1, 1, 8, 5)
    assert torch.equal(module.fft, torch.ones_like(module.fft))
    with torch.no_grad():
        module.fft.normal_()
    x = torch.randn(2, 8, *size, dtype=torch.float64)
    torch.testing.assert_close(module(x), _plain_frequency_gated_ffn(module, x), rtol=1e-12, atol=1e-12)


def test_frequency_filter_of_ones_is_the_identity():
    module = FrequencyGatedFFN(8, 2.66, bias=False).double()
    x = torch.randn(1, 8, 11, 17, dtype=torch.float64)
    y = module.project_in(x)
    x1, x2 = module.dwconv(y).chunk(2, dim=1)
    torch.testing.assert_close(module(x), module.project_out(F.gelu(x1) * x2), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="gate"):
        FrequencyGatedFFN(8, 2.66, bias=False, gate="relu")


def test_recomputed_spectrum_gives_the_same_gradients_and_saves_less():
    torch.manual_seed(0)
    saving = FrequencyGatedFFN(8, 2.66, bias=True, recompute_spectrum=False).double()
    recomputing = FrequencyGatedFFN(8, 2.66, bias=True, recompute_spectrum=True).double()
    with torch.no_grad():
        saving.fft.normal_()
    recomputing.load_state_dict(saving.state_dict())
    x = torch.randn(2, 8, 21, 16, dtype=torch.float64, requires_grad=True)
    grad_out = torch.randn(2, 8, 21, 16, dtype=torch.float64)
    results = []
    for module in (saving, recomputing):
        out = module(x)
        results.append((out, *torch.autograd.grad(out, (x, *module.parameters()), grad_out)))
    for expected, got in zip(*results):
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)

    # What is no longer kept is exactly the complex spectrum: B=2, 2h=42 channels, 3x2 patches
    # of 8x5 complex128 bins (1.25x the 2h-channel map).
    x = torch.randn(2, 8, 24, 16, dtype=torch.float64, requires_grad=True)
    spectrum_bytes = 2 * 42 * (3 * 2) * (8 * 5) * 16
    assert saved_bytes(lambda: saving(x))[0] - saved_bytes(lambda: recomputing(x))[0] == spectrum_bytes


def test_frequency_gated_ffn_compiles_with_gradients():
    module = FrequencyGatedFFN(8, 2.66, bias=False)
    x = torch.randn(1, 8, 13, 19, requires_grad=True)
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    torch.testing.assert_close(out, module(x), rtol=1e-5, atol=1e-5)
    grad = torch.autograd.grad(out.square().sum(), x)[0]
    torch.testing.assert_close(grad, torch.autograd.grad(module(x).square().sum(), x)[0], rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# The network
# ---------------------------------------------------------------------------------------------
def test_default_parameter_count():
    with torch.device("meta"):
        model, restormer = DSGformer(), Restormer()
    count = sum(p.numel() for p in model.parameters())
    print(f"DSGformer default configuration: {count:,} parameters")
    # Restormer's convolutions exactly, plus per block two branch logits and the (2h, 1, 1, 8, 5)
    # filter; blocks per width: 48: 4, 96: 6 + 6 + 4 + 4 (refinement), 192: 6 + 6, 384: 8.
    extra = sum(n * (2 + 2 * int(d * 2.66) * 8 * 5) for d, n in ((48, 4), (96, 20), (192, 12), (384, 8)))
    assert count == sum(p.numel() for p in restormer.parameters()) + extra


@pytest.mark.parametrize("size", [(16, 16), (13, 21)])
def test_shapes_and_odd_sizes(size):
    model = small_model().double().eval()
    x = torch.randn(2, 3, *size, dtype=torch.float64)
    with torch.no_grad():
        out = model(x)
        h, w = size
        expected = model(F.pad(x, (0, (-w) % 8, 0, (-h) % 8), mode="reflect"))[..., :h, :w]
    assert out.shape == x.shape
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    with pytest.raises(ValueError, match="inp_img"):
        model(torch.randn(1, 4, 16, 16, dtype=torch.float64))


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
def test_backend_outputs_agree_with_reference(backend):
    dtype = torch.float64 if backend != "triton" else torch.float32
    skip_unless_runs(backend, dtype)
    model = small_model(gate="relu2").to(dtype).eval()
    x = torch.rand(1, 3, 24, 16, dtype=dtype)
    with torch.no_grad():
        with sparse_attn.use_backend("reference"):
            expected = model(x)
        with sparse_attn.use_backend(backend):
            out = model(x)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(out, expected, rtol=tol, atol=tol)


@pytest.mark.slow
@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
def test_training_steps_agree_with_reference(backend):
    dtype, loss_rtol, grad_rel = training_dtype(backend)
    assert_training_agrees(*train_steps(small_model, backend, dtype), *train_steps(small_model, "reference", dtype),
                           loss_rtol, grad_rel)


@pytest.mark.slow
def test_compile_fullgraph():
    model = small_model().eval()
    x = torch.randn(1, 3, 13, 19)
    with sparse_attn.use_backend("native" if "native" in BACKENDS else "reference"):
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
        with torch.no_grad():  # an inference graph: tracing the joint backward graph too doubles the time
            torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)


def _motion_blur(images, length=7):
    """Horizontal linear motion blur (a box kernel along x), per channel, reflect borders."""
    kernel = torch.full((3, 1, 1, length), 1.0 / length, dtype=images.dtype)
    return F.conv2d(F.pad(images, (length // 2, length // 2, 0, 0), mode="reflect"), kernel, groups=3)


def test_short_training_run_on_motion_blur_reduces_the_loss():
    torch.manual_seed(0)
    # Sharp synthetic images: random rectangles on a smooth background.
    sharp = F.interpolate(torch.rand(2, 3, 3, 3), size=(24, 24), mode="bilinear", align_corners=False)
    for i in range(2):
        for _ in range(3):
            y, x, hh, ww = torch.randint(0, 16, (4,)).tolist()
            sharp[i, :, y:y + 2 + hh % 8, x:x + 2 + ww % 8] = torch.rand(3, 1, 1)
    blurred = _motion_blur(sharp)
    model = small_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(15):
        optimizer.zero_grad()
        loss = F.l1_loss(model(blurred), sharp)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    print(f"L1 loss: first {losses[0]:.4f}, last {losses[-1]:.4f}")
    assert sum(losses[-3:]) / 3 < 0.7 * sum(losses[:3]) / 3


@pytest.mark.parametrize("shape", [(2, 5, 16, 24), (1, 3, 21, 13), (1, 2, 3, 5)], ids=str)
def test_filter_as_products_is_the_spectral_filter(shape):
    """The products form against the FFT form: equal in float64 (forward, both gradients), and
    in float32 within the float64-truth rule of the op tests."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    filt = 1 + 0.5 * torch.randn(shape[1], 1, 1, 8, 5, generator=g, dtype=torch.float64)
    products, spectral = (lambda a, f: patch_filter_as_products(a, f, 8)), (lambda a, f: patch_spectral_filter(a, f, 8))
    for dtype in (torch.float64, torch.float32):
        # the filter's gradient sums every patch's terms in another order: 64 ulps in float64
        assert_matches_float64_reference(products, spectral, [x, filt], dtype, ("out", "x", "filt"),
                                         floor_ulps={torch.float64: 64})


@pytest.mark.parametrize("backend,products", [("reference", False), ("auto", True)])
def test_frequency_gated_ffn_filters_large_maps_as_products_off_reference(monkeypatch, backend, products):
    calls = []
    for name in ("patch_spectral_filter", "patch_filter_as_products"):
        original = getattr(frequency_gated_ffn, name)
        monkeypatch.setattr(frequency_gated_ffn, name,
                            lambda *a, _name=name, _f=original: calls.append(_name) or _f(*a))
    module = FrequencyGatedFFN(4, 2.66, bias=False, backend=backend)
    small, large = torch.randn(1, 4, 63, 64), torch.randn(1, 4, 64, 64, requires_grad=True)
    module(small)
    assert calls == ["patch_spectral_filter"]
    calls.clear()
    out = module(large)  # with gradients: the FFTs are recomputed in backward, the products are not
    out.sum().backward()
    assert calls == (["patch_filter_as_products"] if products else ["patch_spectral_filter"] * 2)


def test_filter_as_products_saves_the_patches_and_the_filter_only():
    x = torch.randn(2, 6, 16, 24, requires_grad=True)
    filt = torch.randn(6, 1, 1, 8, 5, requires_grad=True)
    saved, _ = saved_bytes(lambda: patch_filter_as_products(x, filt, 8))
    assert saved == x.nbytes + filt.nbytes  # not the (6, 64, 64) operators
