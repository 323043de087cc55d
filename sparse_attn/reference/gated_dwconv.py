"""Pure-PyTorch reference of the gated depthwise core of Restormer's GDFN (DESIGN.md §5)."""
import torch
import torch.nn.functional as F

from ..encodings import GATE_ACTIVATION_CODES

ACTIVATIONS = tuple(GATE_ACTIVATION_CODES)  # "gelu", "prelu", "relu2", "identity"


def gate_activation(z, activation, activation_weight=None):
    """act(z) of the gate: exact (erf) GELU, PReLU with one slope ``activation_weight`` (1,),
    relu(z)², or z."""
    if activation == "gelu":
        return F.gelu(z)
    if activation == "prelu":
        return F.prelu(z, activation_weight)
    if activation == "relu2":
        return torch.relu(z).square()
    if activation == "identity":
        return z
    raise ValueError(f"activation: expected one of {ACTIVATIONS}, got {activation!r}")


def gated_dwconv(x, weight, bias=None, activation="gelu", activation_weight=None):
    """out = act(z[:, :h]) * z[:, h:] with z = dwconv3x3(x) + bias (zero padding 1), for x of
    shape (B, 2h, H, W) and weight (2h, 1, 3, 3)."""
    z1, z2 = F.conv2d(x, weight, bias, padding=1, groups=x.shape[1]).chunk(2, dim=1)
    return gate_activation(z1, activation, activation_weight) * z2
