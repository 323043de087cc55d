"""Pure-PyTorch reference of the depthwise convolution op (DESIGN.md §5)."""
import torch.nn.functional as F


def depthwise_conv2d(x, weight, bias=None, dilation=1):
    """F.conv2d of x (B, C, H, W) with weight (C, 1, K, K), one group per channel, stride 1 and
    zero padding dilation·(K - 1)/2 (the output has x's size)."""
    k = weight.shape[-1]
    return F.conv2d(x, weight, bias, padding=dilation * (k - 1) // 2, dilation=dilation, groups=x.shape[1])
