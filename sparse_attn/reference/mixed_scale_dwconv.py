"""Pure-PyTorch reference of the mixed-scale depthwise core of DRSformer's MSFN (DESIGN.md §2).

The official sequence of convolutions between ``project_in`` and ``project_out``; autograd
differentiates it. Every intermediate (y3, y5, x1, x2, z1, z2) exists in full here, which is
what the fused kernels avoid.
"""
import torch
import torch.nn.functional as F


def mixed_scale_dwconv(x, w3, w5, w3_1, w5_1, b3=None, b5=None, b3_1=None, b5_1=None):
    """out = cat(z1, z2) for x of shape (B, 2h, H, W), with

        y3 = relu(dwconv3x3(x)),  y5 = relu(dwconv5x5(x))                 (depthwise, zero padding)
        x1 = cat(y3[:, :h], y5[:, :h]),  x2 = cat(y3[:, h:], y5[:, h:])
        z1 = relu(conv3x3(x1, groups=h)),  z2 = relu(conv5x5(x2, groups=h))
    """
    channels = x.shape[1]
    hidden = channels // 2
    y3_first, y3_second = F.relu(F.conv2d(x, w3, b3, padding=1, groups=channels)).chunk(2, dim=1)
    y5_first, y5_second = F.relu(F.conv2d(x, w5, b5, padding=2, groups=channels)).chunk(2, dim=1)
    z1 = F.relu(F.conv2d(torch.cat([y3_first, y5_first], dim=1), w3_1, b3_1, padding=1, groups=hidden))
    z2 = F.relu(F.conv2d(torch.cat([y3_second, y5_second], dim=1), w5_1, b5_1, padding=2, groups=hidden))
    return torch.cat([z1, z2], dim=1)
