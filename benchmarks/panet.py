"""PANet cases (issue 12): whole-image inference on our backends against the official way of
running it, EDSR-PyTorch's ``forward_chop`` over the official pyramid attention module.

The official module holds the score of every query pixel against every key patch of the
pyramid (about 3.3 N² floats: 56 GB at 256x256), so PANet's test scripts chop an image into
quadrants (with a 10-pixel margin) until a tile has fewer than 6800 pixels: 16 tiles of 79x79 at
256x256. Each tile's attention then sees only that tile, so the chopped network is not the
whole-image one. The default denoising PANet (80 residual blocks, 64 features) with seeded
weights restores one image both ways; the official variant is the baseline of the speed-up
column. The section after the table compares the two outputs on a photograph: max abs
difference and PSNR.
"""
import copy
import math

import torch
from torch import nn

from sparse_attn.backends import BACKENDS

from . import official
from .case import EAGER, Case, Skipped, Variant, require_backend
from .streaming import photograph

GROUP = "panet"
OURS = tuple(b for b in BACKENDS if b != "reference")
# On a CPU the reference op (unfold-based, about 1,700 multiply-adds per query-key pair) and the
# Triton interpreter take many minutes per whole image: measured where they are fast enough.
CPU_SKIP = {"triton": "the Triton interpreter: hours for a whole PANet on a CPU"}


class Whole(nn.Module):
    """``model`` on the whole image, every op on ``backend``."""

    def __init__(self, model, backend):
        super().__init__()
        self.model, self.backend = model, backend

    def forward(self, x):
        import sparse_attn

        with sparse_attn.use_backend(self.backend):
            return self.model(x)


class OfficialChop(nn.Module):
    """``model`` with its attention replaced by the official module (same weights), run by
    ``forward_chop`` as PANet's test scripts do."""

    def __init__(self, model):
        super().__init__()
        self.model = official_panet(model)

    def forward(self, x):
        return official.forward_chop(self.model, x)


def official_panet(model):
    """A copy of our PANet whose attention is :class:`official.PyramidAttention` with its weights."""
    twin = copy.deepcopy(model)
    ours = twin.attention
    theirs = official.PyramidAttention(channel=ours.channel, res_scale=ours.res_scale,
                                       softmax_scale=ours.softmax_scale).to(ours.escape_NaN.device)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    twin.body[twin.n_resblocks // 2] = theirs.to(next(ours.parameters()).dtype)
    return twin


def spec(side, batch=1):
    return {"model": "PANet", "batch": batch, "side": side}


def default_specs(sweep):
    """quick: 64x64 (four 42x42 tiles; seconds per pass on a small CPU); targets: issue 12's
    256x256 (16 tiles of 79x79; minutes per pass); full: both."""
    if sweep == "full":
        return [spec(64), spec(256)]
    if sweep == "targets":
        return [spec(256)]
    return [spec(64)]


def _network(device, dtype):
    import sparse_attn.models

    torch.manual_seed(0)
    return sparse_attn.models.PANet().to(device=device, dtype=dtype).eval()


def _ours(backend):
    def build(device, dtype):
        require_backend(backend, device)
        if torch.device(device).type == "cpu" and backend in CPU_SKIP:
            raise Skipped(CPU_SKIP[backend])
        return Whole(_network(device, dtype), backend)
    return Variant(f"{backend} (whole image)", build)


def make_case(spec):
    b, side = spec["batch"], spec["side"]

    def inputs(device, dtype):
        generator = torch.Generator().manual_seed(0)
        return [torch.rand(b, 3, side, side, generator=generator).to(device=device, dtype=dtype)]

    variants = [Variant("official forward_chop", lambda device, dtype: OfficialChop(_network(device, dtype)), EAGER)]
    variants += [_ours(backend) for backend in OURS]
    return Case(group=GROUP, name="PANet inference", shape=f"B{b} 3x{side}x{side}", spec=spec, pixels=side * side,
                inputs=inputs, variants=variants, time_forward=True, time_backward=False)


def section(rows, opts, sweep):
    """Chopped against whole-image inference on a photograph (targets and full sweeps)."""
    title = "\nPANet: official forward_chop against whole-image inference (native) on a photograph:"
    if sweep == "quick":
        return title + "\n  (measured by --targets and --full)"
    try:
        return title + "\n  " + chop_against_whole(opts.device)
    except Exception as exc:  # reported, not raised: the table is already measured
        return title + f"\n  {type(exc).__name__}: {str(exc).splitlines()[0][:120]}"


def chop_against_whole(device, side=256, backend="native"):
    """One line: max abs difference and PSNR (peak 1) between the official chopped inference and
    ours on the whole image, on the photograph's central ``side`` x ``side`` crop."""
    image = photograph(device)
    top, left = (image.shape[-2] - side) // 2, (image.shape[-1] - side) // 2
    image = image[..., top:top + side, left:left + side]
    model = _network(device, torch.float32)
    with torch.no_grad():
        whole = Whole(model, backend)(image)
        chopped = OfficialChop(model)(image)
    difference = (chopped - whole).abs()
    mse = difference.square().mean().item()
    psnr = math.inf if mse == 0 else 10 * math.log10(1 / mse)
    return (f"PANet {side}x{side}: max |chopped - whole| {difference.max().item():.4g}, "
            f"PSNR(chopped, whole) {psnr:.1f} dB (seeded weights, not a trained checkpoint)")
