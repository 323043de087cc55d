"""Frequency-gated feed-forward network of the sparse gated deblurring transformer.

A reconstruction (the paper behind ``sparse_attn.models.DSGformer`` published no code):

- From FFTformer (Kong et al., CVPR 2023, the discriminative frequency-domain FFN, DFFN): 1x1 in
  to 2h channels, a learnable real filter applied to the 2-D real FFT of every 8x8 patch
  (parameter ``fft`` of shape (2h, 1, 1, 8, 5), initialised to ones, i.e. the identity), a
  depthwise 3x3, the split into x1, x2 and a gate, 1x1 out. Parameter names are FFTformer's.
- From Restormer (Zamir et al., CVPR 2022, GDFN): the gate ``act(x1) * x2`` with GELU.
- Our choices: the gate may be ReLU² (``gate="relu2"``); maps whose sides are not multiples of
  the patch size are zero-padded at the bottom and right after ``project_in`` and cropped back
  after the inverse FFT (FFTformer requires divisible sizes; zeros rather than reflection so
  that the 2x2 maps of a small image's deepest level work too); the FFT runs in the input's
  dtype (float32 for half inputs); in training the spectrum is recomputed in backward rather
  than saved (``recompute_spectrum``); off the ``reference`` backend, on maps of at least 64x64
  pixels, the filter runs as products of matrices (below).

Memory (saved for backward, one block at dim 48, 256x256, float32): GDFN 203 MiB; this FFN
346 MiB when the complex spectrum is saved, 266 MiB when it is recomputed: the spectrum of the
2h-channel map is 1.25x that map (40 complex bins per 64 pixels), the map itself 1x.
"""
import functools

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..backends import requested
from .gated_dconv_ffn import gate_and_project
from .input_checks import autocast_parameters, check_feature_map
from .pointwise import PointwiseConv2d

GATES = ("gelu", "relu2")


def _patches(x, p):
    """x (B, C, H, W) zero-padded to multiples of p, as (B, C, H/p, p, W/p, p), and the padding."""
    b, c, h, w = x.shape
    pad_h, pad_w = (-h) % p, (-w) % p
    if pad_h or pad_w:
        x = F.pad(x, (0, pad_w, 0, pad_h))
    return x.reshape(b, c, (h + pad_h) // p, p, (w + pad_w) // p, p), (pad_h, pad_w)


def _unpatch(patches, padding, h, w):
    b, c, hp, p, wp, _ = patches.shape
    out = patches.reshape(b, c, hp * p, wp * p)
    return out[..., :h, :w] if any(padding) else out


def patch_spectral_filter(x, filt, patch_size):
    """Filter every ``patch_size``² patch of ``x`` (B, C, H, W) in the frequency domain:
    irfft2(rfft2(patch) * filt). ``filt``: (C, 1, 1, p, p // 2 + 1). H, W any: zero-padded to
    multiples of p and cropped back."""
    if x.numel() == 0:
        return x  # filtered, an empty map is itself (and the FFT libraries reject empty transforms)
    p = patch_size
    patches, padding = _patches(x, p)
    patches = patches.transpose(3, 4)  # (B, C, H/p, W/p, p, p)
    compute = patches if patches.dtype in (torch.float32, torch.float64) else patches.float()
    filtered = torch.fft.irfft2(torch.fft.rfft2(compute) * filt.to(compute.dtype), s=(p, p)).to(x.dtype)
    return _unpatch(filtered.transpose(3, 4), padding, *x.shape[-2:])


@functools.lru_cache(maxsize=8)
def _unit_filter_operators(p, dtype, device):
    """(p·(p//2+1), p²·p²): row k is the p² x p² matrix (output pixel, input pixel of a patch,
    row-major) that patch_spectral_filter applies for a filter that is 1 at spectral bin k and 0
    elsewhere, computed in float64."""
    q = p // 2 + 1
    impulses = torch.eye(p * p, dtype=torch.float64).reshape(p * p, p, p)
    units = torch.eye(p * q, dtype=torch.float64).reshape(p * q, 1, p, q)
    responses = torch.fft.irfft2(torch.fft.rfft2(impulses) * units, s=(p, p))  # (bin, input pixel, p, p)
    return responses.reshape(p * q, p * p, p * p).transpose(1, 2).reshape(p * q, -1).to(dtype=dtype, device=device)


class _PatchProducts(torch.autograd.Function):
    """bmm(operators, columns) with operators = (filt (C, bins) @ the unit operators) reshaped to
    (C, p², p²). Backward keeps columns and filt, not the operators (C·p⁴ values, 16 KiB per
    channel at p = 8): it builds them again, one small product."""

    @staticmethod
    def forward(columns, filt, p):
        return torch.bmm(_operators(filt, p), columns)

    @staticmethod
    def setup_context(ctx, inputs, output):
        columns, filt, p = inputs
        ctx.save_for_backward(columns, filt)
        ctx.p = p

    @staticmethod
    def backward(ctx, grad):
        columns, filt = ctx.saved_tensors
        grad_columns = grad_filt = None
        if ctx.needs_input_grad[0]:
            grad_columns = torch.bmm(_operators(filt, ctx.p).transpose(1, 2), grad)
        if ctx.needs_input_grad[1]:
            grad_operators = torch.bmm(grad, columns.transpose(1, 2)).reshape(filt.shape[0], -1)
            grad_filt = grad_operators @ _unit_filter_operators(ctx.p, filt.dtype, filt.device).t()
        return grad_columns, grad_filt, None


def _operators(filt, p):
    """Each channel's p² x p² filter matrix from its spectral coefficients ``filt`` (C, bins)."""
    return (filt @ _unit_filter_operators(p, filt.dtype, filt.device)).reshape(filt.shape[0], p * p, p * p)


def patch_filter_as_products(x, filt, patch_size):
    """patch_spectral_filter as matrix products: the filter is linear in each patch, so every
    channel's filter is one p² x p² matrix (a sum of the unit filters' matrices weighted by
    ``filt``) applied to all of that channel's patches in one batched product. Many small FFTs
    and their complex intermediates become large products: 2-3x faster forward and backward on
    level-1 and level-2 maps of Restormer-sized networks, the same values up to rounding (sums
    of p² terms, about 3x the FFT's rounding in float32). Backward keeps the patches (the map's
    size) and the filter, so there is nothing to gain from recomputing it."""
    if x.numel() == 0:
        return x
    p = patch_size
    b, c = x.shape[:2]
    patches, padding = _patches(x, p)
    hp, wp = patches.shape[2], patches.shape[4]
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    columns = patches.to(compute).permute(1, 3, 5, 0, 2, 4).reshape(c, p * p, b * hp * wp)  # (C, pixel, patch)
    filtered = _PatchProducts.apply(columns, filt.reshape(c, -1).to(compute), p)
    filtered = filtered.reshape(c, p, p, b, hp, wp).permute(3, 0, 4, 1, 5, 2)
    return _unpatch(filtered.to(x.dtype), padding, *x.shape[-2:])


# Below this many pixels per map the FFTs are as fast as the products, whose matrices cost
# C·p^5·(p + 2)/2 multiply-adds to build whatever the map's size (measured at Restormer's widths).
PRODUCTS_MIN_PIXELS = 64 * 64


class FrequencyGatedFFN(nn.Module):
    """1x1 in (dim -> 2h) -> per-patch learnable frequency filter -> depthwise 3x3 -> split x1, x2
    -> act(x1) * x2 -> 1x1 out (h -> dim), with h = int(dim * ffn_expansion_factor).

    Args:
        dim, ffn_expansion_factor, bias: as Restormer's GDFN.
        gate: "gelu" (default) or "relu2" (relu(x1)² * x2).
        patch_size: side of the patches the filter acts on (8, as FFTformer).
        recompute_spectrum: when gradients are recorded, save only the filter's input and redo
            the forward FFT in backward (activation checkpointing of the filter) instead of
            keeping the complex spectrum: less memory for one more FFT per backward. (The
            products form, off ``reference`` on large maps, keeps no spectrum to recompute.)
        backend: the backend of the fused depthwise convolution and gate,
            :func:`sparse_attn.gated_dwconv` ("auto" follows ``use_backend``).
    """

    def __init__(self, dim, ffn_expansion_factor, bias, gate="gelu", patch_size=8, recompute_spectrum=True,
                 backend="auto"):
        super().__init__()
        if gate not in GATES:
            raise ValueError(f"gate: expected one of {GATES}, got {gate!r}")
        if not isinstance(patch_size, int) or patch_size < 1:
            raise ValueError(f"patch_size: expected a positive integer, got {patch_size!r}")
        hidden = int(dim * ffn_expansion_factor)
        self.dim, self.hidden_features, self.gate, self.patch_size = dim, hidden, gate, patch_size
        self.recompute_spectrum, self.backend = recompute_spectrum, backend
        self.project_in = PointwiseConv2d(dim, hidden * 2, bias=bias, backend=backend)
        self.fft = nn.Parameter(torch.ones(hidden * 2, 1, 1, patch_size, patch_size // 2 + 1))
        self.dwconv = nn.Conv2d(hidden * 2, hidden * 2, kernel_size=3, stride=1, padding=1,
                                groups=hidden * 2, bias=bias)
        self.project_out = PointwiseConv2d(hidden, dim, bias=bias, backend=backend)

    def forward(self, x):
        """(B, dim, H, W) -> (B, dim, H, W)."""
        check_feature_map(self, x, self.dim)
        x = self.project_in(x)
        if requested(self.backend) != "reference" and x.shape[0] * x.shape[-2] * x.shape[-1] >= PRODUCTS_MIN_PIXELS:
            x = patch_filter_as_products(x, self.fft, self.patch_size)  # keeps no spectrum
        elif self.recompute_spectrum and torch.is_grad_enabled():
            x = checkpoint(patch_spectral_filter, x, self.fft, self.patch_size, use_reentrant=False)
        else:
            x = patch_spectral_filter(x, self.fft, self.patch_size)
        if x.shape[0] == 0:  # the op takes no empty tensor; an empty batch has h channels here
            return self.project_out(x[:, :self.hidden_features])
        weight, bias = autocast_parameters(x, self.dwconv.weight, self.dwconv.bias)
        return gate_and_project(x, weight, bias, self.gate, None, self.backend, self.project_out)

    def extra_repr(self):
        return f"dim={self.dim}, hidden_features={self.hidden_features}, gate={self.gate!r}"
