"""The official code our ops, modules and networks are measured and tested against, in plain
PyTorch (einops replaced by reshape), with the official structure and parameter names.

One place for every baseline: the benchmarks time them, the tests check parity with them. They
are not part of the library (``sparse_attn.reference`` holds our own pure-PyTorch ground truth,
which fixes the tie rule the official code leaves to ``torch.topk``).

- :func:`drsformer_attention`: DRSformer's ``Attention`` between the qkv split and project_out.
- :func:`restormer_attention`: Restormer's MDTA between the qkv split and project_out.
- :class:`RestormerAttention`, :class:`DRSformerAttention`: the two modules.
- :func:`msfn_depthwise`, :class:`FeedForward`: DRSformer's MSFN, its depthwise core and the module.
- :func:`layer_norm`: the LayerNorm of both networks (``WithBias`` / ``BiasFree``).
- :class:`PyramidAttention`: PANet's pyramid attention module as the official code computes it
  (the N x M score map of every sample; the core is ``benchmarks.patch.official_patch_attention``);
  :func:`forward_chop`: EDSR-PyTorch's tiled inference, which PANet's test scripts use because of
  that map.
"""
import torch
import torch.nn.functional as F
from torch import nn

from sparse_attn.nn import drsformer_topk

from .patch import official_patch_attention


# ---------------------------------------------------------------------------------------------
# Attention
# ---------------------------------------------------------------------------------------------
def drsformer_attention(q, k, v, temperature, weights, topk):
    """DRSformer's top-k attention, for any number of branches: per branch a ``torch.topk`` mask
    scattered into a (d, d) map, a masked softmax and ``attn @ v``, summed with the branch weights.
    ``torch.topk`` breaks ties in an unspecified way, so it agrees with our reference only on
    tie-free inputs."""
    b, heads, d, _ = q.shape
    q = F.normalize(q, dim=-1)
    k = F.normalize(k, dim=-1)
    attn = (q @ k.transpose(-2, -1)) * temperature.reshape(-1, 1, 1)
    out = 0
    for r, kept_count in enumerate(topk):
        mask = torch.zeros(b, heads, d, d, device=q.device, dtype=q.dtype)
        mask.scatter_(-1, torch.topk(attn, k=kept_count, dim=-1, largest=True)[1], 1.0)
        branch = torch.where(mask > 0, attn, torch.full_like(attn, float("-inf"))).softmax(dim=-1)
        out = out + (branch @ v) * weights[r]
    return out


def restormer_attention(q, k, v, temperature):
    """Restormer's MDTA: one dense softmax over the normalised channel scores."""
    q = F.normalize(q, dim=-1)
    k = F.normalize(k, dim=-1)
    attn = (q @ k.transpose(-2, -1)) * temperature
    return attn.softmax(dim=-1) @ v


class RestormerAttention(nn.Module):
    """Restormer's MDTA module: qkv 1x1, depthwise 3x3, one dense softmax, project_out."""

    def __init__(self, dim, num_heads, bias):
        super().__init__()
        self.num_heads = num_heads
        self.temperature = nn.Parameter(torch.ones(num_heads, 1, 1))
        self.qkv = nn.Conv2d(dim, dim * 3, kernel_size=1, bias=bias)
        self.qkv_dwconv = nn.Conv2d(dim * 3, dim * 3, kernel_size=3, stride=1, padding=1, groups=dim * 3, bias=bias)
        self.project_out = nn.Conv2d(dim, dim, kernel_size=1, bias=bias)

    def split_heads(self, x):
        b, c, h, w = x.shape
        q, k, v = self.qkv_dwconv(self.qkv(x)).chunk(3, dim=1)
        return [t.reshape(b, self.num_heads, c // self.num_heads, h * w) for t in (q, k, v)]

    def forward(self, x):
        q, k, v = self.split_heads(x)
        return self.project_out(restormer_attention(q, k, v, self.temperature).reshape(x.shape))


class DRSformerAttention(RestormerAttention):
    """DRSformer's ``Attention``: MDTA's layers, with four top-k branches whose weights are the
    parameters ``attn1..attn4``."""

    def __init__(self, dim, num_heads, bias):
        super().__init__(dim, num_heads, bias)
        for i in range(1, 5):
            setattr(self, f"attn{i}", nn.Parameter(torch.tensor([0.2])))

    def forward(self, x):
        q, k, v = self.split_heads(x)
        weights = torch.cat([self.attn1, self.attn2, self.attn3, self.attn4])
        out = drsformer_attention(q, k, v, self.temperature, weights, drsformer_topk(q.shape[2]))
        return self.project_out(out.reshape(x.shape))


# ---------------------------------------------------------------------------------------------
# MSFN
# ---------------------------------------------------------------------------------------------
def msfn_depthwise(x, w3, w5, w3_1, w5_1, b3=None, b5=None, b3_1=None, b5_1=None):
    """The official FeedForward between project_in and project_out: two depthwise convolutions of
    x, their halves crossed, two grouped convolutions, each followed by a ReLU."""
    hidden = x.shape[1] // 2
    x1_3, x2_3 = F.relu(F.conv2d(x, w3, b3, padding=1, groups=2 * hidden)).chunk(2, dim=1)
    x1_5, x2_5 = F.relu(F.conv2d(x, w5, b5, padding=2, groups=2 * hidden)).chunk(2, dim=1)
    x1 = F.relu(F.conv2d(torch.cat([x1_3, x1_5], dim=1), w3_1, b3_1, padding=1, groups=hidden))
    x2 = F.relu(F.conv2d(torch.cat([x2_3, x2_5], dim=1), w5_1, b5_1, padding=2, groups=hidden))
    return torch.cat([x1, x2], dim=1)


class FeedForward(nn.Module):
    """DRSformer's mixed-scale feed-forward network (MSFN), with the official parameter names."""

    def __init__(self, dim, ffn_expansion_factor, bias):
        super().__init__()
        hidden = int(dim * ffn_expansion_factor)
        self.project_in = nn.Conv2d(dim, hidden * 2, kernel_size=1, bias=bias)
        self.dwconv3x3 = nn.Conv2d(hidden * 2, hidden * 2, 3, stride=1, padding=1, groups=hidden * 2, bias=bias)
        self.dwconv5x5 = nn.Conv2d(hidden * 2, hidden * 2, 5, stride=1, padding=2, groups=hidden * 2, bias=bias)
        self.dwconv3x3_1 = nn.Conv2d(hidden * 2, hidden, 3, stride=1, padding=1, groups=hidden, bias=bias)
        self.dwconv5x5_1 = nn.Conv2d(hidden * 2, hidden, 5, stride=1, padding=2, groups=hidden, bias=bias)
        self.project_out = nn.Conv2d(hidden * 2, dim, kernel_size=1, bias=bias)

    def forward(self, x):
        convs = (self.dwconv3x3, self.dwconv5x5, self.dwconv3x3_1, self.dwconv5x5_1)
        core = msfn_depthwise(self.project_in(x), *(c.weight for c in convs), *(c.bias for c in convs))
        return self.project_out(core)


# ---------------------------------------------------------------------------------------------
# LayerNorm
# ---------------------------------------------------------------------------------------------
def layer_norm(x, weight, bias):
    """The official LayerNorm of an image: to (B, HW, C), normalise over C (biased variance,
    eps 1e-5; ``BiasFree`` when ``bias`` is None: no mean subtracted), back to (B, C, H, W)."""
    b, c, h, w = x.shape
    t = x.flatten(2).transpose(1, 2)
    sigma = t.var(-1, keepdim=True, unbiased=False)
    if bias is None:
        y = t / torch.sqrt(sigma + 1e-5) * weight
    else:
        y = (t - t.mean(-1, keepdim=True)) / torch.sqrt(sigma + 1e-5) * weight + bias
    return y.transpose(1, 2).reshape(b, c, h, w)


# ---------------------------------------------------------------------------------------------
# PANet
# ---------------------------------------------------------------------------------------------
class PyramidAttention(nn.Module):
    """PANet's ``PyramidAttention`` (official names and defaults, 3x3 patches at stride 1, the
    softmax form): the ``conv_match_L_base`` queries against every 3x3 key patch of the
    five-level pyramid (bicubic resizes by 1, 0.9, ..., 0.6 of the input, then ``conv_match``),
    the ``conv_assembly`` patches pasted back -- the core as the official code computes it, with
    the N x M score map of every sample (:func:`benchmarks.patch.official_patch_attention`) --,
    divided by 4, plus ``res_scale`` times the input."""

    def __init__(self, level=5, res_scale=1, channel=64, reduction=2, softmax_scale=10):
        super().__init__()
        self.res_scale, self.softmax_scale = res_scale, softmax_scale
        self.scale = [1 - i / 10 for i in range(level)]
        self.register_buffer("escape_NaN", torch.tensor([1e-4]))

        def conv_prelu(out_channels):
            return nn.Sequential(nn.Conv2d(channel, out_channels, 1), nn.PReLU())
        self.conv_match_L_base = conv_prelu(channel // reduction)
        self.conv_match = conv_prelu(channel // reduction)
        self.conv_assembly = conv_prelu(channel)

    def forward(self, x):
        levels = [x if s == 1 else F.interpolate(x, scale_factor=s, mode="bicubic") for s in self.scale]
        out = official_patch_attention(self.conv_match_L_base(x), [self.conv_match(r) for r in levels],
                                       [self.conv_assembly(r) for r in levels], self.softmax_scale,
                                       self.escape_NaN.item())
        return out / 4.0 + x * self.res_scale


def forward_chop(model, x, shave=10, min_size=6800):
    """EDSR-PyTorch's ``forward_chop`` at scale 1 (PANet's denoising trainer; 6800 is its
    ``min_size``): split the image into four quadrants grown by ``shave`` pixels; run the model
    on each when it has fewer than ``min_size`` pixels, else recurse; keep each result's own
    quadrant. A 256x256 image becomes 16 tiles of 79x79."""
    _, _, h, w = x.shape
    h_half, w_half = h // 2, w // 2
    h_size, w_size = h_half + shave, w_half + shave
    tiles = [x[..., :h_size, :w_size], x[..., :h_size, w - w_size:],
             x[..., h - h_size:, :w_size], x[..., h - h_size:, w - w_size:]]
    if h_size * w_size < min_size:
        results = [model(tile) for tile in tiles]
    else:
        results = [forward_chop(model, tile, shave, min_size) for tile in tiles]
    out = x.new_empty(results[0].shape[:2] + (h, w))
    out[..., :h_half, :w_half] = results[0][..., :h_half, :w_half]
    out[..., :h_half, w_half:] = results[1][..., :h_half, w_size - w + w_half:]
    out[..., h_half:, :w_half] = results[2][..., h_size - h + h_half:, :w_half]
    out[..., h_half:, w_half:] = results[3][..., h_size - h + h_half:, w_size - w + w_half:]
    return out
