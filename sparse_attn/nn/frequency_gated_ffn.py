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
  than saved (``recompute_spectrum``).

Memory (saved for backward, one block at dim 48, 256x256, float32): GDFN 203 MiB; this FFN
346 MiB when the complex spectrum is saved, 266 MiB when it is recomputed: the spectrum of the
2h-channel map is 1.25x that map (40 complex bins per 64 pixels), the map itself 1x.
"""
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .gated_dconv_ffn import gate_and_project
from .input_checks import autocast_parameters, check_feature_map

GATES = ("gelu", "relu2")


def patch_spectral_filter(x, filt, patch_size):
    """Filter every ``patch_size``² patch of ``x`` (B, C, H, W) in the frequency domain:
    irfft2(rfft2(patch) * filt). ``filt``: (C, 1, 1, p, p // 2 + 1). H, W any: zero-padded to
    multiples of p and cropped back."""
    if x.numel() == 0:
        return x  # filtered, an empty map is itself (and the FFT libraries reject empty transforms)
    b, c, h, w = x.shape
    p = patch_size
    pad_h, pad_w = (-h) % p, (-w) % p
    if pad_h or pad_w:
        x = F.pad(x, (0, pad_w, 0, pad_h))
    hp, wp = (h + pad_h) // p, (w + pad_w) // p
    patches = x.reshape(b, c, hp, p, wp, p).transpose(3, 4)  # (B, C, H/p, W/p, p, p)
    compute = patches if patches.dtype in (torch.float32, torch.float64) else patches.float()
    filtered = torch.fft.irfft2(torch.fft.rfft2(compute) * filt.to(compute.dtype), s=(p, p)).to(x.dtype)
    out = filtered.transpose(3, 4).reshape(b, c, hp * p, wp * p)
    return out[..., :h, :w] if (pad_h or pad_w) else out


class FrequencyGatedFFN(nn.Module):
    """1x1 in (dim -> 2h) -> per-patch learnable frequency filter -> depthwise 3x3 -> split x1, x2
    -> act(x1) * x2 -> 1x1 out (h -> dim), with h = int(dim * ffn_expansion_factor).

    Args:
        dim, ffn_expansion_factor, bias: as Restormer's GDFN.
        gate: "gelu" (default) or "relu2" (relu(x1)² * x2).
        patch_size: side of the patches the filter acts on (8, as FFTformer).
        recompute_spectrum: when gradients are recorded, save only the filter's input and redo
            the forward FFT in backward (activation checkpointing of the filter) instead of
            keeping the complex spectrum: less memory for one more FFT per backward.
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
        self.project_in = nn.Conv2d(dim, hidden * 2, kernel_size=1, bias=bias)
        self.fft = nn.Parameter(torch.ones(hidden * 2, 1, 1, patch_size, patch_size // 2 + 1))
        self.dwconv = nn.Conv2d(hidden * 2, hidden * 2, kernel_size=3, stride=1, padding=1,
                                groups=hidden * 2, bias=bias)
        self.project_out = nn.Conv2d(hidden, dim, kernel_size=1, bias=bias)

    def forward(self, x):
        """(B, dim, H, W) -> (B, dim, H, W)."""
        check_feature_map(self, x, self.dim)
        x = self.project_in(x)
        if self.recompute_spectrum and torch.is_grad_enabled():
            x = checkpoint(patch_spectral_filter, x, self.fft, self.patch_size, use_reentrant=False)
        else:
            x = patch_spectral_filter(x, self.fft, self.patch_size)
        if x.shape[0] == 0:  # the op takes no empty tensor; an empty batch has h channels here
            return self.project_out(x[:, :self.hidden_features])
        weight, bias = autocast_parameters(x, self.dwconv.weight, self.dwconv.bias)
        return gate_and_project(x, weight, bias, self.gate, None, self.backend, self.project_out)

    def extra_repr(self):
        return f"dim={self.dim}, hidden_features={self.hidden_features}, gate={self.gate!r}"
