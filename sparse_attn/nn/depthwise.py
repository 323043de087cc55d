"""The networks' depthwise convolutions (the 3x3 on q, k, v of the channel attentions, the
experts of DRSformer's MEFC) on :func:`sparse_attn.depthwise_conv2d`, their ``nn.Conv2d``
modules kept as they are so that checkpoints load."""
from torch import nn

from ..ops import depthwise_conv2d
from ..ops.depthwise_conv2d import KERNEL_SIZES
from .input_checks import autocast_parameters


def runs_on_the_op(conv):
    """Whether ``conv`` is what the op computes: one group per channel, a square kernel of a size
    the op takes, stride 1, zero padding that keeps the map's size."""
    if not isinstance(conv, nn.Conv2d):
        return False
    k, dilation = conv.kernel_size[0], conv.dilation[0]
    return (conv.groups == conv.in_channels == conv.out_channels
            and conv.kernel_size == (k, k) and k in KERNEL_SIZES and conv.stride == (1, 1)
            and conv.dilation == (dilation, dilation) and conv.padding == (dilation * (k - 1) // 2,) * 2
            and conv.padding_mode == "zeros")


def depthwise(conv, x, backend="auto", channels=slice(None)):
    """``conv(x)`` on the op's ``backend`` ("auto" follows ``use_backend``, whose ``reference``
    is ``F.conv2d`` itself). ``channels``: which of the convolution's channels x holds (a slice,
    for the attention's band-by-band forward). Any other convolution (one the op does not
    compute), and an empty batch (which the op does not take), run as the module would."""
    weight, bias = conv.weight[channels], conv.bias[channels] if conv.bias is not None else None
    if not runs_on_the_op(conv) or x.numel() == 0:
        return conv._conv_forward(x, weight, bias)
    weight, bias = autocast_parameters(x, weight, bias)
    return depthwise_conv2d(x, weight, bias, conv.dilation[0], backend=backend)
