"""Region selection attention and the LAA-Transformer reconstruction (issue 13): the module
against a dense implementation of the same attention (full N x N scores, every key outside the
selected regions masked), every region selected = dense attention, any size (pad and crop),
gradients, every backend of the op; the network's shapes, parameter count, wavelet path, and a
short CPU training run on face crops in which the loss falls and PSNR beats bicubic."""
import copy
import functools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import sparse_attn
from helpers import skip_unless_runs, why_not
from sparse_attn.models import LAATransformer
from sparse_attn.models.laa_transformer import haar_dwt, haar_idwt
from sparse_attn.nn import RegionSelectionAttention

BACKENDS = sparse_attn.backends.available("cpu")


@pytest.fixture(autouse=True)
def _one_thread():
    """Small maps on a shared machine: OpenMP threads waiting on each other dominate."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------
# The module, computed densely
# ---------------------------------------------------------------------------------------------
def dense_region_selection(module, x):
    """``module(x)`` written independently of the module and of the op: pixels keep their (H, W)
    grid (no padding), each pixel knows its region, the region means are one-hot averages, the
    selection is ``topk``, and the fine attention is full N x N attention with every key outside
    the query region's selected regions masked to -inf."""
    b, c, h, w = x.shape
    heads, p = module.num_heads, module.region_size
    d = c // heads
    scale = d ** -0.5
    rows, cols = math.ceil(h / p), math.ceil(w / p)
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    region_of = ((ys // p) * cols + xs // p).reshape(-1)                 # (N,)
    one_hot = F.one_hot(region_of, rows * cols).to(x.dtype)              # (N, R)

    q, k, v = (t.reshape(b, heads, d, h * w) for t in module.qkv_dwconv(module.qkv(x)).chunk(3, dim=1))
    q_r, k_r, v_r = (t @ one_hot / one_hot.sum(0) for t in (q, k, v))    # (b, heads, d, R)
    scores = scale * q_r.transpose(-1, -2) @ k_r                         # (b, heads, R, R)
    coarse_regions = scores.softmax(-1) @ v_r.transpose(-1, -2)          # (b, heads, R, d)
    if module.coarse_upsample == "nearest":
        coarse = coarse_regions[:, :, region_of].transpose(-1, -2)      # (b, heads, d, N)
    else:
        grid = coarse_regions.transpose(-1, -2).reshape(b, c, rows, cols)
        coarse = F.interpolate(grid, scale_factor=p, mode="bilinear")[..., :h, :w].reshape(b, heads, d, h * w)

    R = rows * cols
    t = min(module.topk_regions, R) if module.topk_regions is not None else math.ceil(module.topk_fraction * R)
    reads = torch.zeros(b, heads, R, R, dtype=torch.bool).scatter_(-1, scores.topk(t, dim=-1).indices, True)
    allowed = reads[:, :, region_of][:, :, :, region_of]                # (b, heads, N, N)
    s = (scale * q.transpose(-1, -2) @ k).masked_fill(~allowed, float("-inf"))
    fine = (s.softmax(-1) @ v.transpose(-1, -2)).transpose(-1, -2)      # (b, heads, d, N)

    if module.combine == "sum":
        out = coarse + fine
    else:
        gate = torch.sigmoid(module.combine_gate).reshape(heads, d, 1)
        out = gate * fine + (1 - gate) * coarse
    return module.project_out(out.reshape(b, c, h, w))


def module_and_input(size, region, topk, dtype=torch.float64, batch=2, dim=8, heads=2, backend="reference", **options):
    torch.manual_seed(0)
    module = RegionSelectionAttention(dim, heads, region_size=region, topk_regions=topk, backend=backend,
                                      **options).to(dtype)
    with torch.no_grad():  # weights of trained size, so that attention is far from uniform
        for parameter in module.parameters():
            parameter.normal_(0, 0.6)
    x = torch.randn(batch, dim, *size, dtype=dtype, requires_grad=True)
    return module, x


def output_and_grads(fn, module, x):
    torch.manual_seed(1)
    out = fn(x)
    grads = torch.autograd.grad((out * torch.randn_like(out)).sum(), [x, *module.parameters()])
    return out, grads


# (H, W), region side: regions that tile exactly (R = 4), an odd number of regions (3 x 5), sizes
# that need padding in both directions (13 x 10 with 4 x 4: rows and columns of partial regions),
# and one region column thinner than the region.
SIZES = [((8, 8), 4), ((12, 20), 4), ((13, 10), 4), ((9, 7), 8)]


@pytest.mark.parametrize("size,region", SIZES)
@pytest.mark.parametrize("topk", [1, None, 100], ids=["t=1", "t=ceil(R/4)", "t=R"])
def test_module_equals_dense_masked_attention(size, region, topk):
    module, x = module_and_input(size, region, topk)
    out, grads = output_and_grads(module, module, x)
    expected, expected_grads = output_and_grads(functools.partial(dense_region_selection, module), module, x)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    for grad, expected_grad in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected_grad, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("options", [dict(combine="gate"), dict(coarse_upsample="bilinear"),
                                     dict(topk_fraction=0.5, heads=4, bias=True)], ids=str)
def test_module_options_equal_dense_masked_attention(options):
    module, x = module_and_input((12, 20), 4, None, **options)
    if module.combine_gate is not None:
        with torch.no_grad():
            module.combine_gate.normal_()
    out, grads = output_and_grads(module, module, x)
    expected, expected_grads = output_and_grads(functools.partial(dense_region_selection, module), module, x)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    for grad, expected_grad in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected_grad, rtol=1e-9, atol=1e-10)


def test_every_region_selected_is_dense_attention():
    """t = R: the fine attention is plain softmax attention over every pixel (no routing at all)."""
    module, x = module_and_input((16, 12), 4, 12, combine="gate")
    with torch.no_grad():
        module.combine_gate.fill_(1e4)  # sigmoid = 1: the fine result alone
        b, c, h, w = x.shape
        q, k, v = (t.reshape(b, 2, c // 2, h * w).transpose(-1, -2)
                   for t in module.qkv_dwconv(module.qkv(x)).chunk(3, dim=1))
        dense = F.scaled_dot_product_attention(q, k, v).transpose(-1, -2).reshape(b, c, h, w)
        torch.testing.assert_close(module(x), module.project_out(dense), rtol=1e-10, atol=1e-10)


def test_fewer_regions_differ_from_dense():
    """The check above must be able to fail: with t < R the result is not dense attention."""
    sparse, x = module_and_input((16, 12), 4, 3)
    dense, _ = module_and_input((16, 12), 4, 12)
    with torch.no_grad():
        assert (sparse(x) - dense(x)).abs().max() > 1e-3


@pytest.mark.parametrize("size", [(1, 1), (5, 3), (8, 8), (17, 9), (3, 30)])
def test_any_size_is_padded_and_cropped(size):
    module, x = module_and_input(size, 8, None, dtype=torch.float32, batch=3)
    out = module(x)
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_empty_batch():
    module, _ = module_and_input((8, 8), 4, None, dtype=torch.float32)
    assert module(torch.zeros(0, 8, 8, 8)).shape == (0, 8, 8, 8)


def test_gradients_reach_every_parameter():
    module, x = module_and_input((12, 20), 4, None, dtype=torch.float32, combine="gate", bias=True)
    module(x).square().sum().backward()
    for name, parameter in [("x", x), *module.named_parameters()]:
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name
        assert parameter.grad.abs().max() > 0, f"{name}: zero gradient"


FLOOR = {torch.float64: 1e-10, torch.float32: 8 * torch.finfo(torch.float32).eps}


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_backend_of_the_op(backend):
    """The module on each backend the op offers here (float64 where the backend takes it, else
    float32), padding and t < R included, by the rule of tests/helpers.py: output and every
    gradient at most twice as far from the float64 reference as the reference run in the same
    dtype, plus a floor relative to the largest true value: 8 units in the last place in float32;
    1e-10 in float64 (the models' float64 parity tolerance: the op's rounding goes on through the
    module's convolutions, so single-op floors do not apply)."""
    module64, x64 = module_and_input((13, 10), 4, 2, backend="reference")
    truth = output_and_grads(module64, module64, x64)
    for dtype in (torch.float64, torch.float32):
        module = copy.deepcopy(module64).to(dtype)
        module.backend = backend
        x = x64.detach().to(dtype).requires_grad_()
        if why_not(lambda: module(x)) is None:
            break
    skip_unless_runs(lambda: module(x))
    got = output_and_grads(module, module, x)
    module.backend = "reference"
    ref = output_and_grads(module, module, x)
    names = ["output", "x", *(name for name, _ in module.named_parameters())]
    for name, g, r, t in zip(names, [got[0], *got[1]], [ref[0], *ref[1]], [truth[0], *truth[1]]):
        allowed = 2 * (r.double() - t).abs().max() + FLOOR[dtype] * t.abs().max()
        error = (g.double() - t).abs().max()
        assert error <= allowed, f"{name}: error {error:.3g} > allowed {allowed:.3g} ({dtype})"


@pytest.mark.parametrize("arguments,message", [
    (dict(dim=8, num_heads=3), "num_heads"), (dict(dim=8, num_heads=2, region_size=0), "region_size"),
    (dict(dim=8, num_heads=2, topk_regions=0), "topk_regions"), (dict(dim=8, num_heads=2, combine="max"), "combine"),
    (dict(dim=8, num_heads=2, topk_fraction=0.0), "topk_fraction"),
    (dict(dim=8, num_heads=2, coarse_upsample="area"), "coarse_upsample")])
def test_bad_arguments_are_named(arguments, message):
    with pytest.raises(ValueError, match=message):
        RegionSelectionAttention(**arguments)


def test_wrong_input_is_named():
    module = RegionSelectionAttention(8, 2)
    with pytest.raises(ValueError, match=r"x: expected \(B, 8, H, W\)"):
        module(torch.zeros(1, 4, 8, 8))


# ---------------------------------------------------------------------------------------------
# The network
# ---------------------------------------------------------------------------------------------
SMALL = dict(dim=8, num_blocks=(1, 1, 1, 1), heads=(1, 1, 2, 2), region_size=4)


def test_haar_is_orthonormal_and_inverts():
    x = torch.randn(2, 3, 6, 10, dtype=torch.float64)
    bands = haar_dwt(x)
    assert bands.shape == (2, 12, 3, 5)
    torch.testing.assert_close(haar_idwt(bands), x, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(bands.square().sum(), x.square().sum())  # energy kept
    # A constant map has only the LL band, 2 x the constant (orthonormal: (1+1+1+1)/2).
    constant = haar_dwt(torch.full((1, 1, 4, 4), 3.0))
    assert torch.equal(constant[:, 0], torch.full((1, 2, 2), 6.0)) and not constant[:, 1:].any()
    # A horizontal step of a 2x2 cell (left 1, right 0) is half LL, half horizontal detail.
    step = haar_dwt(torch.tensor([[[[1.0, 0.0], [1.0, 0.0]]]]))
    assert step.flatten().tolist() == [1.0, 1.0, 0.0, 0.0]


@pytest.mark.parametrize("size,scale", [((8, 8), 8), ((5, 7), 4), ((6, 3), 2)])
def test_network_shapes(size, scale):
    net = LAATransformer(scale=scale, **SMALL)
    with torch.no_grad():
        out = net(torch.rand(2, 3, *size))
    assert out.shape == (2, 3, scale * size[0], scale * size[1]) and torch.isfinite(out).all()
    assert net(torch.rand(0, 3, *size)).shape == (0, 3, scale * size[0], scale * size[1])


def test_default_network_is_x8_face_super_resolution():
    net = LAATransformer()
    with torch.device("meta"):
        meta = LAATransformer()
    assert meta.scale == 8
    with torch.no_grad():
        out = net(torch.rand(1, 3, 16, 16))
    assert out.shape == (1, 3, 128, 128) and torch.isfinite(out).all()


def expected_parameter_count(dim=32, num_blocks=(2, 2, 2, 2), ffn_expansion_factor=2.66, reduction=4):
    """The default configuration's parameters, counted from the architecture (no biases except
    the LayerNorms' and the channel gate's)."""
    def block(c):
        norms = 2 * 2 * c
        attention = c * 3 * c + 3 * c * 9 + c * c                      # qkv, depthwise, project_out
        h = int(c * ffn_expansion_factor)
        ffn = c * 2 * h + 2 * h * 9 + h * c                              # project_in, depthwise, project_out
        g = c // reduction
        integration = c * c + c * 9 + (c * g + g) + (g * c + c) + c * c  # local, gate, project
        return norms + attention + ffn + integration

    def fusion(c):
        return 6 * c * 4 * c + 2 * c * 4 * c * 9 + 2 * c * c           # sub-band fusion, upsample, reduce

    dims = [dim * 2 ** level for level in range(4)]
    total = 3 * dim * 9 + dim * 3 * 9                                    # head, output
    total += sum(2 * num_blocks[l] * block(dims[l]) for l in range(3)) + num_blocks[3] * block(dims[3])
    total += sum(dims[l] * dims[l] // 2 * 9 for l in range(3))           # Downsample: 3x3 to c/2
    total += sum(fusion(dims[l]) for l in range(3))
    return total


def test_default_parameter_count():
    with torch.device("meta"):
        net = LAATransformer()
    assert sum(p.numel() for p in net.parameters()) == expected_parameter_count()
    with torch.device("meta"):
        small = LAATransformer(dim=16, num_blocks=(1, 2, 3, 4))
    assert sum(p.numel() for p in small.parameters()) == expected_parameter_count(16, (1, 2, 3, 4))


def test_network_gradients_reach_every_parameter():
    net = LAATransformer(scale=4, **SMALL)
    net(torch.rand(2, 3, 8, 8)).square().mean().backward()
    for name, parameter in net.named_parameters():
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name
        assert parameter.grad.abs().max() > 0, f"{name}: zero gradient"


def test_network_arguments():
    with pytest.raises(ValueError, match="num_blocks"):
        LAATransformer(num_blocks=(1, 1, 1))
    with pytest.raises(ValueError, match="out_channels"):
        LAATransformer(out_channels=1)
    net = LAATransformer(feature_integration=False, combine="gate", topk_regions=2, **SMALL)
    assert not any(".integration." in name for name, _ in net.named_parameters())
    assert net.encoder_level1[0].attn.topk_regions == 2 and net.encoder_level1[0].attn.combine == "gate"


def test_in_the_cli_registry():
    from sparse_attn.cli.networks import build, registry
    assert registry()["laatransformer"] is LAATransformer
    net = build({"type": "LAATransformer", "dim": 8, "num_blocks": [1, 1, 1, 1], "scale": 4})
    assert isinstance(net, LAATransformer) and net.scale == 4


# ---------------------------------------------------------------------------------------------
# Training on face crops
# ---------------------------------------------------------------------------------------------
# Square boxes (top, left, side) around the faces of scikit-image's sample photographs: the
# astronaut (Eileen Collins), the cameraman, and the cat.
FACE_BOXES = {"astronaut": (15, 150, 160), "camera": (50, 150, 136), "chelsea": (0, 100, 300)}


def face_crops(count, size, seed=0):
    """``count`` (3, size, size) crops in [0, 1]: random squares of 75-100% of a face box, mirrored
    at random, area-resized to ``size``."""
    from skimage import data
    rng = np.random.default_rng(seed)
    crops = []
    for index in range(count):
        name = list(FACE_BOXES)[index % len(FACE_BOXES)]
        top, left, side = FACE_BOXES[name]
        image = np.asarray(getattr(data, name)(), dtype=np.float32) / 255
        image = image if image.ndim == 3 else np.repeat(image[..., None], 3, axis=2)
        crop_side = int(side * rng.uniform(0.75, 1.0))
        y, x = top + rng.integers(0, side - crop_side + 1), left + rng.integers(0, side - crop_side + 1)
        crop = torch.from_numpy(image[y:y + crop_side, x:x + crop_side, :3]).permute(2, 0, 1)[None]
        crop = crop.flip(-1) if rng.random() < 0.5 else crop
        crops.append(F.interpolate(crop, size=(size, size), mode="area")[0])
    return torch.stack(crops)


def psnr(prediction, target):
    mse = (prediction.clamp(0, 1) - target).square().mean()
    return (10 * torch.log10(1 / mse)).item()


def train_face_sr(net, targets, steps, lr):
    """Adam on L1 for ``steps`` full-batch steps; (first loss, last loss, PSNR of the network,
    PSNR of bicubic) on ``targets``."""
    lows = F.interpolate(targets, scale_factor=1 / net.scale, mode="bicubic", antialias=True).clamp(0, 1)
    optimizer = torch.optim.Adam(net.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = F.l1_loss(net(lows), targets)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    with torch.no_grad():
        bicubic = F.interpolate(lows, scale_factor=net.scale, mode="bicubic")
        return losses[0], losses[-1], psnr(net(lows), targets), psnr(bicubic, targets)


def check_face_sr_training(size, count, steps):
    torch.manual_seed(0)
    net = LAATransformer(**SMALL)
    first, last, ours, bicubic = train_face_sr(net, face_crops(count, size), steps=steps, lr=1e-3)
    print(f"\nx8 face SR, {count} crops {size}x{size}, {steps} steps: L1 {first:.4f} -> {last:.4f}; "
          f"PSNR {ours:.2f} dB vs bicubic {bicubic:.2f} dB")
    assert last < 0.9 * first
    assert ours > bicubic + 0.25


def test_training_on_face_crops_beats_bicubic():
    """4x4 -> 32x32 (x8): small enough for the fast tier on two shared cores (about 45 s on one thread)."""
    check_face_sr_training(size=32, count=6, steps=80)

