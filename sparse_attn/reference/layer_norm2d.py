"""Pure-PyTorch reference of the channel LayerNorm of the Restormer family (DESIGN.md §5).

Normalises over the channels of every pixel of an NCHW map; autograd differentiates it.
"""
import torch


def layer_norm2d(x, weight, bias=None, eps=1e-5):
    """LayerNorm over dim 1 of x (B, C, H, W), with the biased variance over the C channels:

        bias given (Restormer's ``WithBias``):  (x - mean) / sqrt(var + eps) * weight + bias
        bias None  (``BiasFree``):              x / sqrt(var + eps) * weight

    As upstream, ``BiasFree`` still takes the variance about the mean but divides x itself.
    """
    var, mean = torch.var_mean(x, dim=1, correction=0, keepdim=True)
    rstd = torch.rsqrt(var + eps)
    channel = (1, -1, 1, 1)
    if bias is None:
        return x * rstd * weight.reshape(channel)
    return (x - mean) * rstd * weight.reshape(channel) + bias.reshape(channel)
