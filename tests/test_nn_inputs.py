"""Bad and edge-case inputs of every module of sparse_attn.nn and every network: an image of the
wrong dtype (uint8, float64 into a float32 module) or device gets an error naming the argument and
what it expected; an empty batch gives an empty batch of the right shape."""
import functools
import warnings

import pytest
import torch

from sparse_attn.models import DRSformer, DSGformer, Restormer
from sparse_attn.models.drsformer import MEFC
from sparse_attn.nn import (ChannelAttention, ChannelAttentionBase, DeepSparseAttention, FrequencyGatedFFN,
                            GatedDconvFFN, LayerNorm2d, MixedScaleFFN, PReLUGatedFFN, TopKChannelAttention)

MODULES = {
    "TopKChannelAttention": functools.partial(TopKChannelAttention, 16, 2, False),
    "ChannelAttention": functools.partial(ChannelAttention, 16, 2, False),
    "DeepSparseAttention": functools.partial(DeepSparseAttention, 16, 2, False),
    "MixedScaleFFN": functools.partial(MixedScaleFFN, 16, 2.66, False),
    "GatedDconvFFN": functools.partial(GatedDconvFFN, 16, 2.66, False),
    "PReLUGatedFFN": functools.partial(PReLUGatedFFN, 16, 2.66, False),
    "FrequencyGatedFFN": functools.partial(FrequencyGatedFFN, 16, 2.66, False),
    "LayerNorm2d": functools.partial(LayerNorm2d, 16),
    "LayerNorm2d_BiasFree": functools.partial(LayerNorm2d, 16, "BiasFree"),
}
SMALL = dict(dim=8, num_blocks=(1, 1, 1, 1), heads=(1, 2, 4, 8))
NETWORKS = {
    "DRSformer": functools.partial(DRSformer, **SMALL),
    "Restormer": functools.partial(Restormer, **SMALL, num_refinement_blocks=1),
    "DSGformer": functools.partial(DSGformer, **SMALL, num_refinement_blocks=1),
}
# (build, argument name, input channels) of everything tested here.
CASES = {**{name: (build, "x", 16) for name, build in MODULES.items()},
         "MEFC": (functools.partial(MEFC, 16), "x", 16),
         **{name: (build, "inp_img", 3) for name, build in NETWORKS.items()}}


@pytest.mark.parametrize("name", CASES)
def test_uint8_images_name_the_argument_and_the_dtype(name):
    build, argument, channels = CASES[name]
    image = torch.randint(0, 256, (1, channels, 8, 8), dtype=torch.uint8)
    with pytest.raises(TypeError, match=rf"^{argument}: expected a floating-point tensor of the module's dtype "
                                        rf"float32, got uint8 \(images: convert with \.float\(\) / 255\)$"):
        build()(image)


@pytest.mark.parametrize("name", CASES)
def test_another_float_dtype_names_the_expected_one(name):
    build, argument, channels = CASES[name]
    with pytest.raises(TypeError, match=rf"^{argument}: expected the module's dtype float32, got float64"):
        build()(torch.rand(1, channels, 8, 8, dtype=torch.float64))
    # ... and the module in that dtype takes it.
    assert build().double()(torch.rand(1, channels, 8, 8, dtype=torch.float64)).dtype == torch.float64


@pytest.mark.parametrize("name", CASES)
def test_another_device_names_the_expected_one(name):
    build, argument, channels = CASES[name]
    with pytest.raises(ValueError, match=rf"^{argument}: expected a tensor on the module's device cpu, got meta$"):
        build()(torch.empty(1, channels, 8, 8, device="meta"))


@pytest.mark.parametrize("name", MODULES)
def test_autocast_takes_other_float_dtypes(name):
    # Under autocast a module's convolutions cast their inputs, so the dtype check gives way, and
    # the parameters the custom ops take follow the activations' dtype; gradients reach them.
    module = MODULES[name]()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = module(torch.rand(1, 16, 8, 8, dtype=torch.bfloat16))
    assert out.shape == (1, 16, 8, 8)
    if name.startswith("LayerNorm2d"):  # the norm runs in its parameters' dtype, as autocast runs layer_norm
        assert out.dtype == torch.float32
    out.float().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in module.parameters())


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
@pytest.mark.parametrize("name", [*MODULES, "MEFC"])
def test_modules_return_an_empty_batch(name, grad):
    module = MEFC(16) if name == "MEFC" else MODULES[name]()
    x = torch.randn(0, 16, 5, 7, requires_grad=grad)
    with torch.set_grad_enabled(grad), warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning about an empty reduction either
        out = module(x)
    assert out.shape == (0, 16, 5, 7) and out.dtype == x.dtype
    if grad:  # a training step on an empty batch runs (its gradients are empty or zero)
        (out.sum() + 0 * x.sum()).backward()
        assert x.grad.shape == x.shape


@pytest.mark.parametrize("name", NETWORKS)
def test_networks_return_an_empty_batch(name):
    model = NETWORKS[name]()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = model(torch.randn(0, 3, 13, 21))
    assert out.shape == (0, 3, 13, 21) and out.dtype == torch.float32
    assert NETWORKS[name](out_channels=1)(torch.randn(0, 3, 16, 16)).shape == (0, 1, 16, 16)


def test_channel_attention_base_is_the_frame_of_every_attention_module():
    for name in ("TopKChannelAttention", "ChannelAttention", "DeepSparseAttention"):
        assert isinstance(MODULES[name](), ChannelAttentionBase)

    class Identity(ChannelAttentionBase):
        def attend(self, q, k, v):
            return v

    module = Identity(16, 2, False)
    assert sorted(module.state_dict()) == ["project_out.weight", "qkv.weight", "qkv_dwconv.weight", "temperature"]
    x = torch.randn(2, 16, 5, 7)
    v = module.qkv_dwconv(module.qkv(x))[:, 32:]
    torch.testing.assert_close(module(x), module.project_out(v))
    with pytest.raises(NotImplementedError, match="ChannelAttentionBase must implement attend"):
        ChannelAttentionBase(16, 2, False)(x)
