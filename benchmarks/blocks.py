"""Per-block op cases: the channel LayerNorm, GDFN's gated depthwise core and the depthwise
convolutions (DESIGN.md §5), each against the PyTorch code it replaces in Restormer and DRSformer.

The official code is written out below in plain PyTorch (its structure): ``LayerNorm`` as
to_3d -> ``WithBias_LayerNorm`` over the last dim -> to_4d, and the GDFN between project_in and
project_out as ``dwconv`` -> chunk -> ``gelu(x1) * x2``; the depthwise convolutions are the
official ``nn.Conv2d(..., groups=C)``: the 3x3 on q, k, v (``qkv_dwconv``, 3·dim channels) and
the widest of MEFC's experts (7x7, dilation 2, dim channels at full resolution). Ours:
``sparse_attn.layer_norm2d``, ``sparse_attn.gated_dwconv`` and ``sparse_attn.depthwise_conv2d`` on
every backend. Beside them, GDFN's ``project_in`` (1x1, dim -> 2h) against ``F.conv2d``: not an
op, but :mod:`sparse_attn.nn.pointwise` runs the networks' 1x1 convolutions as matrix products
off ``reference`` on CPU (every backend's row is that same product; no target). Level l = 1..4 of Restormer: dim 48·2^(l-1) at H/2^(l-1) × W/2^(l-1); the GDFN's
hidden width h = int(2.66·dim).
"""
import torch
import torch.nn.functional as F

from .case import Case, Variant, baselines, require_backend
from .report import Target, find_row

GROUP = "blocks"
PARTS = {"norm": "LayerNorm (WithBias)", "gate": "GDFN core (gelu)", "qkv_dw": "qkv depthwise 3x3",
         "expert_dw": "MEFC depthwise 7x7 dilation 2", "project_in": "GDFN project_in 1x1"}
OPS = ("norm", "gate", "qkv_dw", "expert_dw")  # the parts that are sparse_attn ops (issue 15's targets)
DEPTHWISE = {"qkv_dw": (3, 1, 3), "expert_dw": (7, 2, 1)}  # part: kernel size, dilation, channels per dim
BACKENDS = ("reference", "native", "triton")
EXPANSION = 2.66
BASE_DIM = 48


def official_layer_norm(x, weight, bias):
    """Restormer's LayerNorm: b c h w -> b (h w) c, WithBias_LayerNorm, back."""
    b, c, h, w = x.shape
    t = x.flatten(2).transpose(1, 2)
    mu = t.mean(-1, keepdim=True)
    sigma = t.var(-1, keepdim=True, unbiased=False)
    t = (t - mu) / torch.sqrt(sigma + 1e-5) * weight + bias
    return t.transpose(1, 2).reshape(b, c, h, w)


def official_gate(x, weight):
    """Restormer's FeedForward between project_in and project_out (bias-free, as Restormer)."""
    x1, x2 = F.conv2d(x, weight, padding=1, groups=x.shape[1]).chunk(2, dim=1)
    return F.gelu(x1) * x2


def official_depthwise(part):
    """The official depthwise nn.Conv2d of ``part`` as a function of x and its weight."""
    k, dilation, _ = DEPTHWISE[part]
    return lambda x, weight: F.conv2d(x, weight, padding=dilation * (k - 1) // 2, dilation=dilation,
                                      groups=x.shape[1])


def level_spec(part, level, side, compile=True, errors=True):
    scale = 2 ** (level - 1)
    return {"part": part, "batch": 1, "dim": BASE_DIM * scale, "height": side // scale, "width": side // scale,
            "compile": compile, "errors": errors}


def default_specs(sweep):
    """quick: the four levels of a 128² image, and level 1 of 256² (issue 15's target shape);
    targets: the target shape alone; full: the four levels of 128², 256² and 512². MEFC's
    expert: level 1 only."""
    target = [level_spec(part, 1, 256) for part in PARTS]
    if sweep == "targets":
        return target
    sides = (128, 256, 512) if sweep == "full" else (128,)
    specs = [level_spec(part, level, side, compile=sweep == "full", errors=sweep == "full")
             for side in sides for level in range(1, 5) for part in PARTS
             if level == 1 or part != "expert_dw"]  # MEFC runs at full resolution only
    return specs if sweep == "full" else specs + target


def _ours(part, backend, device):
    require_backend(backend, device)
    import sparse_attn

    if part == "norm":
        return lambda x, weight, bias: sparse_attn.layer_norm2d(x, weight, bias, backend=backend)
    if part in DEPTHWISE:
        dilation = DEPTHWISE[part][1]
        return lambda x, weight: sparse_attn.depthwise_conv2d(x, weight, None, dilation, backend=backend)
    if part == "project_in":
        from sparse_attn.nn.pointwise import pointwise_conv2d

        return lambda x, weight: pointwise_conv2d(x, weight, None, backend=backend)
    return lambda x, weight: sparse_attn.gated_dwconv(x, weight, None, "gelu", backend=backend)


def make_case(spec):
    part, b, dim, height, width = spec["part"], spec["batch"], spec["dim"], spec["height"], spec["width"]
    if part in DEPTHWISE:
        k, _, per_dim = DEPTHWISE[part]
        channels, official = per_dim * dim, official_depthwise(part)
    elif part == "project_in":  # weight (2h, dim, 1, 1)
        k, channels, official = 1, dim, lambda x, weight: F.conv2d(x, weight)
    else:
        k = 3
        channels = dim if part == "norm" else 2 * int(dim * EXPANSION)
        official = official_layer_norm if part == "norm" else official_gate

    def inputs(device, dtype):
        generator = torch.Generator().manual_seed(0)
        shapes = [((b, channels, height, width), 1.0, 0.0)]
        if part == "norm":
            shapes += [((channels,), 0.2, 1.0), ((channels,), 0.2, 0.0)]
        elif part == "project_in":
            shapes += [((2 * int(dim * EXPANSION), channels, 1, 1), channels ** -0.5, 0.0)]
        else:
            shapes += [((channels, 1, k, k), 1 / k, 0.0)]
        return [(torch.randn(*shape, generator=generator, dtype=torch.float64) * scale + shift)
                .to(device=device, dtype=dtype).requires_grad_() for shape, scale, shift in shapes]

    variants = baselines(lambda device, dtype: official, compile=spec["compile"])
    variants += [Variant(name, lambda device, dtype, name=name: _ours(part, name, device)) for name in BACKENDS]
    return Case(group=GROUP, name=PARTS[part], shape=f"B{b} C{channels} {height}x{width}", spec=spec,
                pixels=height * width, inputs=inputs, variants=variants,
                truth=(lambda device: official) if spec["errors"] else None)


def targets(rows):
    """Issue 15's targets: each op's forward at least 2x the code it replaces (CPU, native, fp32,
    Restormer level 1 at 256²; MEFC's expert at its full resolution, 256²), eager and compiled."""
    out = []
    get = lambda row, field: getattr(row, field, None)  # noqa: E731
    for part, name in ((part, PARTS[part]) for part in OPS):
        shape = make_case(level_spec(part, 1, 256)).shape
        row = find_row(rows, name, shape, "native")
        out += [Target("15", f"{name} {shape}, native: fwd vs official eager", get(row, "speedup_eager_fwd"), ">=", 2.0),
                Target("15", f"{name} {shape}, native: fwd vs official compiled", get(row, "speedup_compiled_fwd"),
                       ">=", 2.0)]
    return out
