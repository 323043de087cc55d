"""PANet (issue 12): the pyramid attention module against the official module's float64 output
and gradients (the fixture) and against the official formula written out, the networks PANet
(fixture) and PAEDSR, checkpoints, sizes, the official configurations' parameter counts, on every
backend of :func:`sparse_attn.patch_attention` that runs here."""
import math

import pytest
import torch
import torch.nn.functional as F

import sparse_attn
from sparse_attn.models import PAEDSR, PANet
from sparse_attn.models.checkpoint import CheckpointError
from sparse_attn.nn import PyramidAttention
from sparse_attn.ops.patch_attention import patch_attention

from helpers import FLOOR_ULPS, why_not
from model_cases import assert_training_agrees, train_steps
from test_models import load_fixture, needs_fixtures

BACKENDS = sparse_attn.backends.available("cpu")
ATTENTION_FIXTURE, NETWORK_FIXTURE = "panet_attention_small", "panet_small"
FLOAT64_TOLERANCE = 1e-10


def why_unavailable(backend, dtype):
    """None when patch_attention runs ``backend`` on CPU ``dtype`` tensors, else its reason."""
    q = torch.ones(1, 2, 3, 3, dtype=dtype)
    return why_not(lambda: patch_attention(q, [q], [q], backend=backend))


def skip_unless_runs(backend, dtype):
    reason = why_unavailable(backend, dtype)
    if reason is not None:
        pytest.skip(reason)


def backend_cases(slow_backends=("triton",)):
    """(backend, dtype) for every backend here in float64 and float32; the Triton interpreter's
    (a minute per network forward on 2 cores) in the slow tier."""
    for backend in BACKENDS:
        for dtype in (torch.float64, torch.float32):
            marks = [pytest.mark.slow] if backend in slow_backends else []
            yield pytest.param(backend, dtype, marks=marks, id=f"{backend}-{str(dtype).replace('torch.', '')}")


# The PReLU slopes' gradients are scalars: sums over the whole map with cancellation, whose
# float32 error is one random draw. On the fixture's loss weight native's came out 2.4-3.9x the
# float32 reference's, Triton's 5.0x; over 16 random loss weights native's RMS error is 0.97x and
# 1.03x the reference's (another draw of the same size: 0.2x to 3.9x). So a scalar gradient is
# judged by the RMS of its error over several loss weights (test_module_scalar_gradients_...),
# every other tensor by its largest error on the fixture.
SCALAR_DRAWS = 8


def _randomise(module, seed=1):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.3 + (0.25 if p.numel() == 1 else 0.0))
    return module


# ---------------------------------------------------------------------------------------------
# The official formula, written out: unfold, normalised key patches, a dense softmax (or the
# official one-hot of average=False), and the transposed convolution that pastes the patches
# ---------------------------------------------------------------------------------------------
def _official_resize(x, s):
    return F.interpolate(x, scale_factor=s, mode="bicubic")


def _torch11_resize(x, s):
    h, w = x.shape[-2:]
    return F.interpolate(x, size=(math.floor(h * s), math.floor(w * s)), mode="bicubic")


def _plain_pyramid_attention(module, x, resize=_official_resize, one_hot=False):
    b, _, h, w = x.shape
    query = F.unfold(module.conv_match_L_base(x), 3, padding=1)                      # (B, 9 Cq, N)
    levels = [x if s == 1 else resize(x, s) for s in module.scale]
    keys = torch.cat([F.unfold(module.conv_match(r), 3, padding=1) for r in levels], 2)     # (B, 9 Cq, M)
    values = torch.cat([F.unfold(module.conv_assembly(r), 3, padding=1) for r in levels], 2)
    keys = keys / keys.norm(dim=1, keepdim=True).clamp_min(module.escape_NaN.item())
    attention = (module.softmax_scale * query.transpose(1, 2) @ keys).softmax(dim=-1)  # (B, N, M)
    if one_hot:
        attention = (attention == attention.amax(dim=-1, keepdim=True)).to(x.dtype)
    return F.fold(values @ attention.transpose(1, 2), (h, w), 3, padding=1) / 4 + x * module.res_scale


# ---------------------------------------------------------------------------------------------
# The module
# ---------------------------------------------------------------------------------------------
def _attention_from_fixture(fixture, dtype, **kwargs):
    module = PyramidAttention(**fixture["config"], **kwargs)
    module.load_state_dict(fixture["state_dict"], strict=True)
    return module.to(dtype)


def _module_output_and_grads(module, x, loss_weight):
    x = x.detach().clone().requires_grad_()
    out = module(x)
    params = dict(module.named_parameters())
    grads = torch.autograd.grad((out * loss_weight).sum(), [x] + list(params.values()))
    return out.detach(), dict(zip(["input"] + list(params), grads))


@needs_fixtures
def test_module_state_dict_is_the_official_one():
    fixture = load_fixture(ATTENTION_FIXTURE)
    ours = PyramidAttention(**fixture["config"]).state_dict()
    assert list(ours) == list(fixture["state_dict"])
    assert all(ours[k].shape == v.shape and ours[k].dtype == v.dtype for k, v in fixture["state_dict"].items())
    assert torch.equal(ours["escape_NaN"], fixture["state_dict"]["escape_NaN"])


@needs_fixtures
@pytest.mark.parametrize("backend, dtype", list(backend_cases()))
def test_module_fixture_parity(backend, dtype):
    """Output and the gradient of the input and of every parameter against the official module's
    float64 ones: within 1e-10 in float64; in float32 within twice the error of the reference
    backend run in float32 (plus a few ulps of the largest value, as helpers.py's rule), scalar
    gradients excepted (see SCALAR_DRAWS)."""
    skip_unless_runs(backend, dtype)
    fixture = load_fixture(ATTENTION_FIXTURE)
    truth = {"output": fixture["output"], **fixture["grads"]}
    weight = fixture["loss_weight"]

    def run(on, in_dtype):
        module = _attention_from_fixture(fixture, in_dtype, backend=on)
        out, grads = _module_output_and_grads(module, fixture["input"].to(in_dtype), weight.to(in_dtype))
        return {"output": out, **grads}

    got = run(backend, dtype)
    assert set(got) == set(truth)
    own = run("reference", dtype) if dtype != torch.float64 else None
    for name, true in truth.items():
        error = (got[name].double() - true).abs().max().item()
        if dtype == torch.float64:
            assert error <= FLOAT64_TOLERANCE, f"{name}: {error:.3g}"
            continue
        if true.numel() == 1:
            continue
        own_error = (own[name].double() - true).abs().max().item()
        floor = FLOOR_ULPS[dtype] * torch.finfo(dtype).eps * true.abs().max().item()
        assert error <= 2 * own_error + floor, f"{name}: {error:.3g} vs the reference's {own_error:.3g}"
        assert own_error <= 1e-4 * true.abs().max().item(), f"{name}: the float32 reference strays {own_error:.3g}"


@needs_fixtures
@pytest.mark.parametrize("backend", [pytest.param(b, marks=[pytest.mark.slow] if b == "triton" else [])
                                     for b in BACKENDS if b != "reference"])
def test_module_scalar_gradients_within_twice_the_reference_error_on_average(backend):
    """The PReLU slopes' gradients in float32, on the fixture's module and input with SCALAR_DRAWS
    random loss weights: the RMS of their error against float64 (the reference backend, which
    the float64 fixture test ties to the official module) within twice the float32 reference's."""
    skip_unless_runs(backend, torch.float32)
    fixture = load_fixture(ATTENTION_FIXTURE)
    scalars = [name for name, p in fixture["state_dict"].items() if p.numel() == 1 and name != "escape_NaN"]
    squares = {(on, name): 0.0 for on in (backend, "reference") for name in scalars}
    generator = torch.Generator().manual_seed(100)
    for _ in range(SCALAR_DRAWS):
        weight = torch.randn(fixture["loss_weight"].shape, generator=generator, dtype=torch.float64)

        def grads(on, dtype):
            module = _attention_from_fixture(fixture, dtype, backend=on)
            return _module_output_and_grads(module, fixture["input"].to(dtype), weight.to(dtype))[1]

        truth = grads("reference", torch.float64)
        for on in (backend, "reference"):
            got = grads(on, torch.float32)
            for name in scalars:
                squares[(on, name)] += (got[name].double() - truth[name]).abs().item() ** 2
    for name in scalars:
        ours, own = (math.sqrt(squares[(on, name)] / SCALAR_DRAWS) for on in (backend, "reference"))
        assert ours <= 2 * own, f"{name}: RMS error {ours:.3g} vs the reference's {own:.3g}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("batch, h, w", [(2, 7, 5), (1, 2, 3), (1, 2, 2), (3, 11, 4)])
def test_module_matches_the_official_formula_on_odd_sizes(backend, batch, h, w):
    """Sizes whose levels are all different and odd, the smallest input five levels allow (2x2:
    four 1x1 levels) and B > 1."""
    dtype = torch.float64 if why_unavailable(backend, torch.float64) is None else torch.float32
    skip_unless_runs(backend, dtype)
    module = _randomise(PyramidAttention(channel=6, reduction=2, backend=backend)).to(dtype)
    x = torch.randn(batch, 6, h, w, dtype=dtype)
    expected = _plain_pyramid_attention(module, x)
    tolerance = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(module(x), expected, rtol=tolerance, atol=tolerance)


def test_topk_beyond_the_number_of_keys_is_the_dense_softmax():
    dense = _randomise(PyramidAttention(channel=4, reduction=1)).double()
    kept = PyramidAttention(channel=4, reduction=1, topk=1000).double()
    kept.load_state_dict(dense.state_dict())
    x = torch.randn(1, 4, 3, 4, dtype=torch.float64)  # 12 + 6 + 6 + 4 + 2 = 30 key patches
    torch.testing.assert_close(kept(x), dense(x), rtol=1e-12, atol=1e-12)


@pytest.mark.slow  # the first compile of the five-level pyramid takes minutes on 2 cores (symbolic sizes)
@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
def test_module_compiles_without_graph_breaks_or_recompiles(backend):
    """torch.compile(fullgraph=True, dynamic=True): one graph for two sizes (the pyramid's level
    sizes stay symbolic), gradients through it. The reference backend is left out: its loop over
    query chunks specialises on the number of pixels. Counted as dynamo's unique graphs rather
    than backend calls (helpers.compiled_once): dynamo restarts its analysis of this module once
    and hands the same graph to the backend twice."""
    from torch._dynamo.utils import counters

    skip_unless_runs(backend, torch.float32)
    module = _randomise(PyramidAttention(channel=4, reduction=1, backend=backend))
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(module, backend="aot_eager", fullgraph=True, dynamic=True)
    for h, w in [(7, 9), (10, 6)]:
        x = torch.randn(2, 4, h, w, requires_grad=True)
        out = compiled(x)
        torch.testing.assert_close(out, module(x), rtol=1e-5, atol=1e-5)
        grad, = torch.autograd.grad(out.square().sum(), x)
        torch.testing.assert_close(grad, torch.autograd.grad(module(x).square().sum(), x)[0], rtol=1e-4, atol=1e-4)
    assert counters["stats"]["unique_graphs"] == 1, "a new size recompiled"


def test_level_sizes_are_floor_of_size_times_scale():
    module = PyramidAttention(channel=4)
    assert module.scale == [1.0, 0.9, 0.8, 0.7, 0.6]
    assert module.level_sizes(23, 29) == [(23, 29), (20, 26), (18, 23), (16, 20), (13, 17)]
    for side in range(2, 300):
        for s, (h, _) in zip(module.scale[1:], module.level_sizes(side, 2)[1:]):
            assert h == F.interpolate(torch.zeros(1, 1, side, 2), scale_factor=s, mode="bicubic").shape[2]


@pytest.mark.parametrize("recompute, resize", [(None, _official_resize), (True, _torch11_resize)])
def test_recompute_scale_factor_reproduces_torch_1_1(recompute, resize):
    """None: the official call in today's torch. True: torch 1.1's resampling (size first, then
    the ratio of the sizes), which differs visibly."""
    module = _randomise(PyramidAttention(channel=4, reduction=1, recompute_scale_factor=recompute)).double()
    x = torch.randn(1, 4, 13, 9, dtype=torch.float64)
    torch.testing.assert_close(module(x), _plain_pyramid_attention(module, x, resize), rtol=1e-12, atol=1e-12)
    other = _official_resize if resize is _torch11_resize else _torch11_resize
    assert (module(x) - _plain_pyramid_attention(module, x, other)).abs().max() > 1e-3


def test_average_false_is_topk_1():
    """The official one-hot of each query's best key (no ties in random inputs) is topk=1."""
    module = _randomise(PyramidAttention(channel=4, reduction=1, average=False)).double()
    assert module.topk == 1
    x = torch.randn(2, 4, 6, 7, dtype=torch.float64)
    torch.testing.assert_close(module(x), _plain_pyramid_attention(module, x, one_hot=True), rtol=1e-12, atol=1e-12)
    dense = PyramidAttention(channel=4, reduction=1).double()
    dense.load_state_dict(module.state_dict())
    assert (dense(x) - module(x)).abs().max() > 1e-3


def test_escape_nan_is_read_on_load_also_through_a_network():
    module = PyramidAttention(channel=4)
    assert module.key_eps == torch.tensor(1e-4, dtype=torch.float32).item()
    state = module.state_dict()
    state["escape_NaN"] = torch.tensor([0.5])
    module.load_state_dict(state)
    assert module.key_eps == 0.5
    net = PANet(n_resblocks=2, n_feats=8)
    state = net.state_dict()
    state["body.1.escape_NaN"] = torch.tensor([0.25])
    net.load_state_dict(state)
    assert net.attention.key_eps == 0.25


def test_module_arguments_and_input_errors():
    for kwargs, match in [(dict(ksize=5), "ksize, stride"), (dict(stride=2), "ksize, stride"),
                          (dict(level=0), "level"), (dict(level=11), "level"), (dict(topk=0), "topk"),
                          (dict(topk=2.5), "topk"), (dict(average=False, topk=4), "average=False"),
                          (dict(channel=4, reduction=8), "reduction")]:
        with pytest.raises(ValueError, match=match):
            PyramidAttention(**kwargs)
    module = PyramidAttention(channel=4)
    with pytest.raises(ValueError, match=r"x: expected \(B, 4, H, W\)"):
        module(torch.randn(1, 3, 8, 8))
    with pytest.raises(TypeError, match="x: expected the module's dtype float32, got float64"):
        module(torch.randn(1, 4, 8, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match="1x5 is too small for 5 pyramid levels"):
        module(torch.randn(1, 4, 1, 5))
    assert PyramidAttention(channel=4, level=1)(torch.randn(1, 4, 1, 5)).shape == (1, 4, 1, 5)
    assert module(torch.randn(0, 4, 6, 6)).shape == (0, 4, 6, 6)


# ---------------------------------------------------------------------------------------------
# PANet
# ---------------------------------------------------------------------------------------------
@needs_fixtures
def test_panet_state_dict_is_the_official_one():
    fixture = load_fixture(NETWORK_FIXTURE)
    ours = PANet(**fixture["config"]).state_dict()
    assert list(ours) == list(fixture["state_dict"]), "keys (and their order) differ from the official network"
    assert all(ours[k].shape == v.shape for k, v in fixture["state_dict"].items())


@needs_fixtures
@pytest.mark.parametrize("backend, dtype", list(backend_cases()))
def test_panet_fixture_parity(backend, dtype):
    """The official PANet's float64 output: within 1e-10 in float64; in float32 within twice the
    reference backend's own float32 error (plus a few ulps)."""
    skip_unless_runs(backend, dtype)
    fixture = load_fixture(NETWORK_FIXTURE)

    def run(on):
        net = PANet(**fixture["config"], backend=on)
        net.load_pretrained(fixture["state_dict"])
        with torch.no_grad():
            return net.to(dtype).eval()(fixture["input"].to(dtype)).double()

    error = (run(backend) - fixture["output"]).abs().max().item()
    print(f"PANet {backend} {dtype}: max abs error {error:.3g}")
    if dtype == torch.float64:
        assert error <= FLOAT64_TOLERANCE
    else:
        own = (run("reference") - fixture["output"]).abs().max().item()
        assert error <= 2 * own + FLOOR_ULPS[dtype] * torch.finfo(dtype).eps * fixture["output"].abs().max().item()


def test_panet_residual_blocks_share_one_prelu():
    net = PANet(n_resblocks=4, n_feats=8)
    slopes = [net.body[i].body[1] for i in (0, 1, 3, 4)]
    assert all(s is slopes[0] for s in slopes)
    assert net.attention is net.body[2]
    out = net(torch.randn(1, 3, 6, 5))
    out.sum().backward()
    assert slopes[0].weight.grad is not None
    # A second network has its own slope (upstream's default argument is shared between networks).
    assert PANet(n_resblocks=2, n_feats=8).body[0].body[1] is not slopes[0]


def test_panet_checkpoint_with_disagreeing_copies_of_the_shared_slope_is_refused(tmp_path):
    net = _randomise(PANet(n_resblocks=4, n_feats=8))
    state = net.state_dict()
    path = tmp_path / "panet.pt"
    torch.save({f"module.{k}": v for k, v in state.items()}, path)  # a DataParallel file
    loaded = PANet.from_pretrained(path, n_resblocks=4, n_feats=8)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in state.items())
    state["body.3.body.1.weight"] = state["body.3.body.1.weight"] + 1
    with pytest.raises(CheckpointError, match=r"one tensor in PANet hold different values.*body.0.body.1.weight"):
        PANet(n_resblocks=4, n_feats=8).load_pretrained(state)


@pytest.mark.parametrize("backend", BACKENDS)
def test_panet_any_size(backend):
    """A 9×14 image (odd pyramid levels), B = 2: against the reference in float64, or (a backend
    without float64) against float64 within twice the float32 reference's own error."""
    dtype = torch.float64 if why_unavailable(backend, torch.float64) is None else torch.float32
    skip_unless_runs(backend, dtype)
    net = _randomise(PANet(n_resblocks=2, n_feats=8, n_colors=1)).double()
    x = torch.randn(2, 1, 9, 14, dtype=torch.float64)

    def run(on, in_dtype):
        with torch.no_grad(), sparse_attn.use_backend(on):
            return net.to(in_dtype)(x.to(in_dtype)).double()

    truth, out = run("reference", torch.float64), run(backend, dtype)
    assert out.shape == x.shape
    if dtype == torch.float64:
        torch.testing.assert_close(out, truth, rtol=1e-12, atol=1e-12)
    else:
        own = (run("reference", dtype) - truth).abs().max().item()
        floor = FLOOR_ULPS[dtype] * torch.finfo(dtype).eps * truth.abs().max().item()
        assert (out - truth).abs().max().item() <= 2 * own + floor


# Triton's interpreter takes minutes for these steps: the slow tier (its op is in the fast one).
@pytest.mark.parametrize("backend", [pytest.param(b, marks=[pytest.mark.slow] if b == "triton" else [])
                                     for b in BACKENDS if b != "reference"])
def test_panet_trains_alike_on_every_backend(backend):
    """A few SGD steps of a small PANet: losses and final gradients as on the reference."""
    dtype = torch.float64 if why_unavailable(backend, torch.float64) is None else torch.float32
    skip_unless_runs(backend, dtype)
    loss_rtol, grad_rel = (1e-10, 1e-8) if dtype == torch.float64 else (1e-5, 1e-4)

    def build():
        return PANet(n_resblocks=2, n_feats=8)

    losses, grads = train_steps(build, backend, dtype)
    ref_losses, ref_grads = train_steps(build, "reference", dtype)
    assert_training_agrees(losses, grads, ref_losses, ref_grads, loss_rtol, grad_rel)


# ---------------------------------------------------------------------------------------------
# PAEDSR
# ---------------------------------------------------------------------------------------------
def _paedsr_keys(n_resblocks, upsampler_convs):
    """The official PAEDSR's state_dict keys, in order, from its definition: sub_mean, msa (the
    attention), add_mean, head, body (residual blocks, the attention again, a conv), tail."""
    conv = lambda name: [f"{name}.weight", f"{name}.bias"]  # noqa: E731
    attention = ["escape_NaN"] + [f"{m}.{p}" for m in ("conv_match_L_base", "conv_match", "conv_assembly")
                                  for p in ("0.weight", "0.bias", "1.weight")]
    blocks = lambda start: [k for i in range(start, start + n_resblocks // 2)  # noqa: E731
                            for k in conv(f"body.{i}.body.0") + conv(f"body.{i}.body.2")]
    middle = n_resblocks // 2
    return (conv("sub_mean") + [f"msa.{k}" for k in attention] + conv("add_mean") + conv("head.0") + blocks(0)
            + [f"body.{middle}.{k}" for k in attention] + blocks(middle + 1) + conv(f"body.{2 * middle + 1}")
            + [k for i in upsampler_convs for k in conv(f"tail.0.{i}")] + conv("tail.1"))


@pytest.mark.parametrize("scale, upsampler_convs", [(2, [0]), (3, [0]), (4, [0, 2])])
def test_paedsr_keys_hold_the_attention_twice(scale, upsampler_convs):
    net = PAEDSR(n_resblocks=4, n_feats=16, scale=scale)
    state = net.state_dict()
    assert list(state) == _paedsr_keys(4, upsampler_convs)
    assert net.msa is net.body[2]
    assert torch.equal(state["msa.conv_match.0.weight"], state["body.2.conv_match.0.weight"])
    assert net.msa.res_scale == 0.1 and net.msa.conv_match[0].out_channels == 2  # reduction 8


def test_paedsr_loads_a_bare_state_dict_strictly_and_refuses_disagreeing_copies(tmp_path):
    source = _randomise(PAEDSR(n_resblocks=2, n_feats=16, scale=2))
    path = tmp_path / "paedsr_x2.pt"
    torch.save(source.state_dict(), path)
    net = PAEDSR.from_pretrained(path, n_resblocks=2, n_feats=16, scale=2)
    assert all(torch.equal(net.state_dict()[k], v) for k, v in source.state_dict().items())
    net.load_state_dict(source.state_dict(), strict=True)
    edited = source.state_dict()
    edited["body.1.conv_assembly.0.bias"] = edited["body.1.conv_assembly.0.bias"] + 1
    with pytest.raises(CheckpointError, match="msa.conv_assembly.0.bias, body.1.conv_assembly.0.bias"):
        PAEDSR(n_resblocks=2, n_feats=16).load_pretrained(edited)
    with pytest.raises(CheckpointError, match="tail.0.2"):
        PAEDSR(n_resblocks=2, n_feats=16, scale=4).load_pretrained(path)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scale", [2, 3])
def test_paedsr_upsamples_any_size(backend, scale):
    dtype = torch.float64 if why_unavailable(backend, torch.float64) is None else torch.float32
    skip_unless_runs(backend, dtype)
    net = _randomise(PAEDSR(n_resblocks=2, n_feats=16, scale=scale)).double()
    x = torch.rand(1, 3, 7, 5, dtype=torch.float64) * 255
    with torch.no_grad():
        with sparse_attn.use_backend("reference"):
            truth = net(x)
            own = net.to(dtype)(x.to(dtype)) if dtype != torch.float64 else truth  # the reference's own error
        with sparse_attn.use_backend(backend):
            out = net.to(dtype)(x.to(dtype))
    assert out.shape == (1, 3, 7 * scale, 5 * scale) and out.dtype == dtype
    if dtype == torch.float64:
        torch.testing.assert_close(out, truth, rtol=1e-10, atol=1e-10)
    else:  # within twice the reference's own float32 error (plus 8 ulps of the output's scale)
        error, own_error = (out.double() - truth).abs().max().item(), (own.double() - truth).abs().max().item()
        assert error <= 2 * own_error + 8 * torch.finfo(dtype).eps * truth.abs().max().item(), (error, own_error)


def test_paedsr_arguments():
    with pytest.raises(ValueError, match="scale: expected 3 or a power of 2"):
        PAEDSR(n_resblocks=2, n_feats=16, scale=5)
    with pytest.raises(ValueError, match="n_colors"):
        PAEDSR(n_resblocks=2, n_feats=16, n_colors=1)
    with pytest.raises(ValueError, match=r"x: expected \(B, 3, H, W\)"):
        PAEDSR(n_resblocks=2, n_feats=16)(torch.randn(1, 1, 8, 8))


# ---------------------------------------------------------------------------------------------
# The official configurations
# ---------------------------------------------------------------------------------------------
# sum(p.numel() for p in model.parameters()) of the official classes built with the released
# options (DN_RGB/CAR/Demosaic PANET: n_resblocks 80, n_feats 64; SR PAEDSR: 32, 256, res_scale
# 0.1), which counts a tensor held twice once (PANet's one PReLU slope, PAEDSR's attention) and
# includes the mean shifts. By hand for PANet: head 3·64·9+64 = 1,792; 80 blocks of
# 2·(64·64·9+64) = 5,908,480 and the shared slope 1; attention 2·(64·32+32+1) + (64·64+64+1)
# = 8,323; body conv 36,928; tail 64·3·9+3 = 1,731; mean shifts 2·12 = 24: 5,957,279.
@pytest.mark.parametrize("build, count", [
    (PANet, 5_957_279),
    (PAEDSR, 40_811_870),
    (lambda: PAEDSR(scale=3), 43_762_270),
    (lambda: PAEDSR(scale=4), 43_172_190),
])
def test_default_parameter_counts(build, count):
    with torch.device("meta"):
        model = build()
    assert sum(p.numel() for p in model.parameters()) == count


# ---------------------------------------------------------------------------------------------
# The benchmarks' official baseline (benchmarks/official.py)
# ---------------------------------------------------------------------------------------------
@needs_fixtures
def test_benchmark_official_module_reproduces_the_fixture():
    from benchmarks import official

    fixture = load_fixture(ATTENTION_FIXTURE)
    module = official.PyramidAttention(**fixture["config"]).double()
    module.load_state_dict(fixture["state_dict"], strict=True)
    x = fixture["input"].clone().requires_grad_()
    out = module(x)
    assert (out - fixture["output"]).abs().max().item() <= FLOAT64_TOLERANCE
    grad, = torch.autograd.grad((out * fixture["loss_weight"]).sum(), x)
    assert (grad - fixture["grads"]["input"]).abs().max().item() <= FLOAT64_TOLERANCE


def test_forward_chop_tiles_as_the_official_trainer():
    from benchmarks import official

    shapes = []

    def model(tile):
        shapes.append(tuple(tile.shape[-2:]))
        return tile * 2

    x = torch.randn(1, 3, 256, 256)
    assert torch.equal(official.forward_chop(model, x), x * 2)  # each pixel from the tile that owns it
    assert shapes == [(79, 79)] * 16
    shapes.clear()
    official.forward_chop(model, torch.randn(1, 3, 37, 50))
    assert shapes == [(28, 35)] * 4


# ---------------------------------------------------------------------------------------------
# The command line (sparse_attn/cli/networks.py)
# ---------------------------------------------------------------------------------------------
def test_cli_recognises_a_panet_checkpoint_and_its_configuration(tmp_path):
    from sparse_attn.cli import networks

    source = _randomise(PANet(n_resblocks=4, n_feats=8, n_colors=1))  # a compression-artefact PANet
    path = tmp_path / "model_best.pt"
    torch.save(source.state_dict(), path)
    loaded = networks.load(None, str(path))
    assert type(loaded) is PANet and (loaded.n_resblocks, loaded.n_feats, loaded.n_colors) == (4, 8, 1)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in source.state_dict().items())


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_cli_refuses_paedsr_and_its_keys_tell_its_configuration(scale, tmp_path):
    from sparse_attn.cli import networks
    from sparse_attn.cli.errors import CliError

    net = PAEDSR(n_resblocks=2, n_feats=16, scale=scale)
    assert PAEDSR.config_from_state_dict(net.state_dict()) == dict(n_resblocks=2, n_feats=16, n_colors=3, scale=scale)
    with pytest.raises(CliError, match="PAEDSR is a super-resolution network"):
        networks.network_class("paedsr")
    path = tmp_path / "paedsr.pt"
    torch.save(net.state_dict(), path)
    with pytest.raises(CliError, match="PAEDSR is a super-resolution network"):
        networks.load(None, str(path))
