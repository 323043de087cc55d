"""Magic-ELF's ALformer and its multi-input attention (issue 14): the modules against plain
formulas, parity with the official code's outputs (the fixture) on every backend, checkpoints,
any input size, torch.compile, and training on every backend."""
import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparse_attn
from sparse_attn.models import ALformer
from sparse_attn.models.checkpoint import CheckpointError
from sparse_attn.models.alformer import quadrants_to_channels, shuffle_up
from sparse_attn.nn import MultiInputAttention, MultiInputTransformerBlock, PReLUGatedFFN

from model_cases import BACKENDS, assert_training_agrees, runs, skip_unless_runs, train_steps, training_dtype
from test_models import PARITY_TOLERANCE, load_fixture, needs_fixtures

FIXTURE = "alformer_small"
SMALL = dict(n_feat=8)


def _randomise(module, std=0.5):
    torch.manual_seed(1)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * std + (1.0 if p.numel() == 1 else 0.0))
    return module


# ---------------------------------------------------------------------------------------------
# The modules against plain formulas
# ---------------------------------------------------------------------------------------------
def _plain_multi_input_attention(module, q_fea, k_fea, v_fea):
    """The official Attention.forward written out (torch.topk: random inputs have no ties)."""
    b, c, h, w = q_fea.shape
    heads = module.num_heads
    q, k, v = (t.reshape(b, heads, c // heads, h * w) for t in (module.q(q_fea), module.k(k_fea), module.v(v_fea)))
    scores = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1) * module.temperature
    kept = torch.zeros_like(scores).scatter_(-1, scores.topk(module.kept, dim=-1).indices, 1.0) > 0
    out = scores.masked_fill(~kept, float("-inf")).softmax(dim=-1) @ v
    return module.project_out(out.reshape(b, c, h, w))


def _float64_backends():
    return [b for b in BACKENDS if runs(b, torch.float64)]


@pytest.mark.parametrize("dim, heads, topk, kept", [(16, 1, None, 16), (16, 2, None, 8), (48, 1, 2 / 3, 32),
                                                    (30, 2, 0.5, 7)])
def test_multi_input_attention_matches_the_formula(dim, heads, topk, kept):
    module = _randomise(MultiInputAttention(dim, heads, bias=True, topk=topk)).double()
    assert module.kept == kept
    assert sorted(module.state_dict()) == ["k.bias", "k.weight", "project_out.bias", "project_out.weight",
                                           "q.bias", "q.weight", "temperature", "v.bias", "v.weight"]
    q_fea, k_fea, v_fea = (torch.randn(2, dim, 5, 7, dtype=torch.float64) for _ in range(3))
    expected = _plain_multi_input_attention(module, q_fea, k_fea, v_fea)
    for backend in _float64_backends():
        with sparse_attn.use_backend(backend):
            torch.testing.assert_close(module(q_fea, k_fea, v_fea), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("topk", [None, 0.5])
def test_multi_input_attention_on_triton(topk):
    skip_unless_runs("triton", torch.float32)
    module = _randomise(MultiInputAttention(16, 2, bias=False, topk=topk))
    inputs = [torch.randn(1, 16, 6, 5, requires_grad=True) for _ in range(3)]
    expected = _plain_multi_input_attention(module, *inputs)
    expected_grads = torch.autograd.grad(expected.square().sum(), inputs + list(module.parameters()))
    with sparse_attn.use_backend("triton"):
        out = module(*inputs)
        grads = torch.autograd.grad(out.square().sum(), inputs + list(module.parameters()))
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    for grad, expected_grad in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected_grad, rtol=1e-4, atol=1e-4)


def test_multi_input_attention_arguments():
    with pytest.raises(ValueError, match="num_heads"):
        MultiInputAttention(10, 3, bias=False)
    for bad in (0, 1.5, -0.2, True, "half"):
        with pytest.raises(ValueError, match="topk"):
            MultiInputAttention(16, 1, bias=False, topk=bad)
    with pytest.raises(ValueError, match="keeps no channel"):
        MultiInputAttention(8, 2, bias=False, topk=0.2)
    module = MultiInputAttention(8, 2, bias=False)
    x = torch.randn(1, 8, 4, 4)
    with pytest.raises(ValueError, match=r"k_fea: expected \(B, 8, H, W\)"):
        module(x, torch.randn(1, 6, 4, 4), x)
    with pytest.raises(ValueError, match="v_fea: expected the shape of q_fea"):
        module(x, x, torch.randn(1, 8, 4, 5))
    with pytest.raises(TypeError, match="q_fea: expected the module's dtype float32, got float64"):
        module(x.double(), x, x)
    block = MultiInputTransformerBlock(8, 1, 2.66, False, "WithBias", feedforward=PReLUGatedFFN)
    with pytest.raises(ValueError, match=r"value: expected \(B, 8, H, W\)"):
        block(x, x, torch.randn(1, 4, 4, 4))


def _plain_block(block, key, query, value):
    """The official TransformerBlock.forward: the attention's q_fea is norm_key(key)."""
    attn = _plain_multi_input_attention(block.attn, block.norm_key(key), block.norm_query(query),
                                        block.norm_value(value))
    x = value + attn
    return x + block.ffn(block.norm2(x))


def _block(degradation_mask=False):
    return _randomise(MultiInputTransformerBlock(8, 1, 2.66, False, "WithBias", feedforward=PReLUGatedFFN,
                                                 degradation_mask=degradation_mask)).double()


def test_multi_input_block_keeps_the_official_argument_order():
    block = _block()
    assert {k.split(".")[0] for k in block.state_dict()} == {"norm_key", "norm_query", "norm_value", "attn", "norm2",
                                                             "ffn"}
    key, query, value = (torch.randn(1, 8, 6, 6, dtype=torch.float64) for _ in range(3))
    torch.testing.assert_close(block(key, query, value), _plain_block(block, key, query, value), rtol=1e-12,
                               atol=1e-12)
    # The order matters: queries from `key` (swapping key and query changes the result).
    assert (block(query, key, value) - block(key, query, value)).abs().max() > 1e-3


def test_degradation_mask_is_off_by_default_and_gates_keys_and_values():
    plain, masked = _block(), _block(degradation_mask=True)
    assert plain.degradation_mask is None and "degradation_mask.weight" in masked.state_dict()
    masked.load_state_dict(plain.state_dict(), strict=False)  # the same weights but the mask's
    key, query, value = (torch.randn(1, 8, 6, 6, dtype=torch.float64) for _ in range(3))
    with torch.no_grad():
        masked.degradation_mask.weight.zero_()
        masked.degradation_mask.bias.fill_(-1e4)  # a closed mask: the gate is 1, the official block
        torch.testing.assert_close(masked(key, query, value), plain(key, query, value), rtol=0, atol=0)
        masked.degradation_mask.bias.fill_(1e4)  # an open mask doubles the keys' and values' features
    doubled = _plain_multi_input_attention(masked.attn, masked.norm_key(key), 2 * masked.norm_query(query),
                                           2 * masked.norm_value(value))
    x = value + doubled
    torch.testing.assert_close(masked(key, query, value), x + masked.ffn(masked.norm2(x)), rtol=1e-12, atol=1e-12)
    # The mask follows the rain features (the `key` argument) and learns.
    with torch.no_grad():
        masked.degradation_mask.weight.normal_()
        masked.degradation_mask.bias.zero_()
    masked(key, query, value).square().sum().backward()
    assert masked.degradation_mask.weight.grad.abs().sum() > 0


def test_prelu_gated_ffn_is_elfs_feedforward():
    ffn = _randomise(PReLUGatedFFN(16, 2.66, bias=True)).double()
    assert {k: tuple(v.shape) for k, v in ffn.state_dict().items()} == {
        "act1.weight": (1,), "project_in.weight": (84, 16, 1, 1), "project_in.bias": (84,),
        "dwconv.weight": (84, 1, 3, 3), "dwconv.bias": (84,),
        "project_out.weight": (16, 42, 1, 1), "project_out.bias": (16,)}
    x = torch.randn(1, 16, 6, 5, dtype=torch.float64)
    h = F.conv2d(F.conv2d(x, ffn.project_in.weight, ffn.project_in.bias), ffn.dwconv.weight, ffn.dwconv.bias,
                 padding=1, groups=84)
    expected = F.conv2d(F.prelu(h[:, :42], ffn.act1.weight) * h[:, 42:], ffn.project_out.weight, ffn.project_out.bias)
    for backend in _float64_backends():
        with sparse_attn.use_backend(backend):
            torch.testing.assert_close(ffn(x), expected, rtol=1e-13, atol=1e-13)


def test_shuffle_up_reads_offsets_column_major():
    x = torch.arange(2 * 8 * 3 * 5, dtype=torch.float64).reshape(2, 8, 3, 5)
    out = shuffle_up(x, 2)
    assert out.shape == (2, 2, 6, 10)
    for c in range(2):
        for i in range(2):
            for j in range(2):
                assert torch.equal(out[:, c, i::2, j::2], x[:, c * 4 + j * 2 + i])
    assert not torch.equal(out, F.pixel_shuffle(x, 2))


def test_quadrants_to_channels():
    x = torch.randn(2, 3, 6, 8)
    expected = torch.cat([x[..., :3, :4], x[..., :3, 4:], x[..., 3:, :4], x[..., 3:, 4:]], 1)
    assert torch.equal(quadrants_to_channels(x), expected)


# ---------------------------------------------------------------------------------------------
# The network: parity with the official code
# ---------------------------------------------------------------------------------------------
@needs_fixtures
def test_state_dict_matches_the_official_one():
    fixture = load_fixture(FIXTURE)
    model = ALformer(**fixture["config"])
    ours = model.state_dict()
    # The same keys; the order differs only inside the FFNs, whose `act1` upstream registers first.
    assert sorted(ours) == sorted(fixture["state_dict"])
    for key, value in fixture["state_dict"].items():
        assert ours[key].shape == value.shape, key
    # Upstream shares one PReLU among the channel-attention blocks of each sub-network: its
    # state_dict holds the slope under every name, and a strict load fills the one parameter.
    shared = model.ssnet.ssnnet_encoder.encoder_level1.CAB1.body[1]
    assert shared is model.ssnet.ssnnet_decoder.decoder_level3.CAB1.body[1]
    assert model.dsnet.shallow_feat1[1].body[1] is model.dsnet.dsnnet_decoder.decoder_level1.CAB1.body[1]
    assert shared is not model.dsnet.shallow_feat1[1].body[1]


@needs_fixtures
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_fixture_parity(backend, dtype):
    skip_unless_runs(backend, dtype)
    fixture = load_fixture(FIXTURE)
    model = ALformer(**fixture["config"])
    model.load_state_dict(fixture["state_dict"], strict=True)
    model.to(dtype).eval()
    with torch.no_grad(), sparse_attn.use_backend(backend):
        outputs = model(fixture["input"].to(dtype))
    assert isinstance(outputs, list) and len(outputs) == 2
    for name, out, expected in zip(("restored", "background"), outputs, fixture["output"]):
        assert out.shape == expected.shape, name
        error = (out.double() - expected).abs().max().item()
        print(f"alformer {name} {backend} {dtype}: max abs error {error:.3g}")
        assert error <= PARITY_TOLERANCE[dtype], name


def test_default_parameter_count():
    with torch.device("meta"):
        model = ALformer()
    assert sum(p.numel() for p in model.parameters()) == 1_223_972


def test_constructor_arguments():
    with pytest.raises(ValueError, match="in_c, out_c"):
        ALformer(in_c=1)
    with torch.device("meta"):
        masked = ALformer(degradation_mask=True, topk=0.5)
    assert masked.ssnet.stem.former.attn.kept == 24
    assert "ssnet.stem.former.degradation_mask.weight" in masked.state_dict()


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------
@needs_fixtures
@pytest.mark.parametrize("layout", ["bare", "dataparallel", "official_training_file"])
def test_official_checkpoints_load_strictly(tmp_path, layout):
    fixture = load_fixture(FIXTURE)
    state_dict = fixture["state_dict"]
    if layout != "bare":  # the official training script wraps the network in DataParallel
        state_dict = {f"module.{k}": v for k, v in state_dict.items()}
    checkpoint = {"epoch": 250, "state_dict": state_dict, "optimizer": {"state": {}, "param_groups": [{"lr": 2e-4}]}} \
        if layout == "official_training_file" else state_dict
    path = tmp_path / "model_best.pth"
    torch.save(checkpoint, path)
    if layout == "official_training_file":
        model = ALformer(**fixture["config"]).load_pretrained(path, param_key="state_dict")
    else:
        model = ALformer.from_pretrained(path, **fixture["config"])
    for key, value in model.state_dict().items():
        assert torch.equal(value, fixture["state_dict"][key]), key
    with torch.no_grad():
        restored = model.double()(fixture["input"])[0]
    torch.testing.assert_close(restored, fixture["output"][0], rtol=0, atol=1e-10)


def test_checkpoint_of_the_masked_network_says_so(tmp_path):
    masked = ALformer(**SMALL, degradation_mask=True)
    path = tmp_path / "masked.pth"
    torch.save(masked.state_dict(), path)
    with pytest.raises(CheckpointError, match=r"(?s)unexpected keys \(2\): ssnet\.stem\.former\.degradation_mask\.bias.*"
                                              r"construct ALformer\(degradation_mask=True\)"):
        ALformer(**SMALL).load_pretrained(path)
    ALformer(**SMALL, degradation_mask=True).load_pretrained(path)
    torch.save(ALformer(**SMALL).state_dict(), path)
    with pytest.raises(CheckpointError, match=r"missing keys \(2\)[\s\S]*construct ALformer\(\)"):
        ALformer(**SMALL, degradation_mask=True).load_pretrained(path)


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------
def test_odd_sizes_are_reflect_padded_to_16_and_cropped():
    model = _randomise(ALformer(**SMALL), std=0.2).eval()
    x = torch.rand(1, 3, 13, 21)
    with torch.no_grad():
        restored, background = model(x)
        # What an official test script has to do around the official network.
        expected = model(F.pad(x, (0, 11, 0, 3), mode="reflect"))
        assert torch.equal(model.restore(x), restored)
    assert restored.shape == x.shape and background.shape == (1, 3, 7, 11)
    torch.testing.assert_close(restored, expected[0][..., :13, :21], rtol=0, atol=0)
    torch.testing.assert_close(background, expected[1][..., :7, :11], rtol=0, atol=0)


def test_input_errors():
    model = ALformer(**SMALL)
    with pytest.raises(ValueError, match=r"x_img: expected \(B, 3, H, W\)"):
        model(torch.randn(3, 16, 16))
    with pytest.raises(ValueError, match=r"x_img: expected \(B, 3, H, W\)"):
        model(torch.randn(1, 4, 16, 16))
    with pytest.raises(TypeError, match="x_img"):
        model([[1.0]])
    with pytest.raises(ValueError, match="too small"):
        model(torch.randn(1, 3, 8, 16))
    with pytest.raises(TypeError, match=r"x_img: expected a floating-point tensor .* got uint8"):
        model(torch.zeros(1, 3, 16, 16, dtype=torch.uint8))
    with pytest.raises(TypeError, match="x_img: expected the module's dtype float32, got float64"):
        model(torch.zeros(1, 3, 16, 16, dtype=torch.float64))


def test_empty_batches():
    restored, background = ALformer(**SMALL)(torch.rand(0, 3, 13, 21))
    assert restored.shape == (0, 3, 13, 21) and background.shape == (0, 3, 7, 11)
    block = _block()
    x = torch.rand(0, 8, 5, 7, dtype=torch.float64, requires_grad=True)
    out = block(x, x, x)
    assert out.shape == x.shape
    out.sum().backward()
    assert x.grad.shape == x.shape


# ---------------------------------------------------------------------------------------------
# torch.compile and training
# ---------------------------------------------------------------------------------------------
class Restored(nn.Module):
    """The network's restored image alone, for the single-output test helpers.

    With their initial zero biases the multi-input block's ``norm_key`` and ``norm_query`` have
    gradient zero for their weights, exactly (q and k are normalised per channel, so a channel's
    scale cancels): float32 then compares rounding noise with rounding noise. Random biases
    make every gradient a real one."""

    def __init__(self, **kwargs):
        super().__init__()
        self.net = ALformer(**kwargs)
        with torch.no_grad():
            for name, p in self.net.named_parameters():
                if "norm" in name and name.endswith(".bias"):
                    p.normal_(std=0.1)

    def forward(self, x):
        return self.net.restore(x)


@pytest.mark.slow
def test_compile_fullgraph():
    model = ALformer(**SMALL).eval()
    x = torch.rand(1, 3, 13, 19)
    with sparse_attn.use_backend("native" if "native" in BACKENDS else "reference"):
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
        with torch.no_grad():
            for got, expected in zip(compiled(x), model(x)):
                torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
def test_training_steps_agree_with_reference(backend):
    dtype, loss_rtol, grad_rel = training_dtype(backend)
    build = functools.partial(Restored, **SMALL)
    assert_training_agrees(*train_steps(build, backend, dtype), *train_steps(build, "reference", dtype),
                           loss_rtol, grad_rel)
