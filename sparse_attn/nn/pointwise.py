"""The networks' 1x1 convolutions (the projections into and out of every attention and
feed-forward block) as matrix products on CPU.

A 1x1 convolution of a (B, C_in, H, W) map is the product of its (C_out, C_in) weight with each
image's (C_in, H·W) columns. On an AVX-512 CPU (an Intel Xeon, fp32, two threads) PyTorch's CPU
convolution runs these shapes well below what the same product gets from ``torch.mm``: 40–290
GFLOP/s forward (slowest where C_in is small at full resolution) against 220–380, and 110–280
against 220–350 for the backward. With the same machine held to AVX2 (PyTorch's kernels, oneDNN
and MKL capped), Restormer's training step gained 1.21× -> 1.44× from the products; on an
AVX2-only AMD EPYC (an earlier measurement) the product was 0.6–1.1× the convolution. So off the
``reference`` backend, on a CPU with AVX-512 or an Intel CPU with AVX2,
:class:`PointwiseConv2d` computes the products itself. The module keeps ``nn.Conv2d``'s
parameters, so checkpoints load unchanged, and elsewhere (``reference``, other CPUs, CUDA, where
nothing was measured, autocast, empty batches) it is the convolution itself.
"""
import torch
import torch.nn.functional as F
from torch import nn

from ..backends import requested


def _columns(x):
    """(B, C, H, W) -> (B, C, H·W): a view for contiguous x (a copy otherwise)."""
    return x.flatten(2)


def _left_product(matrix, columns, bias=None, out=None):
    """``matrix @ columns[i] (+ bias)`` for every image i: (B, M, N), contiguous, written into
    ``out`` when given. (``torch.matmul`` of a 2-D by a 3-D tensor computes the transposed
    product and copies it back, which costs as much as the product itself at these sizes.)"""
    b = columns.shape[0]
    if out is None:
        out = columns.new_empty(b, matrix.shape[0], columns.shape[2])
    if b == 1:
        if bias is None:
            torch.mm(matrix, columns[0], out=out[0])
        else:  # the bias enters the product's accumulator instead of a second pass
            torch.addmm(bias.unsqueeze(1), matrix, columns[0], out=out[0])
    elif bias is None:
        torch.bmm(matrix.expand(b, -1, -1), columns, out=out)
    else:
        torch.baddbmm(bias.unsqueeze(1).expand_as(out), matrix.expand(b, -1, -1), columns, out=out)
    return out


def _project(x, weight, bias):
    """The 1x1 convolution of x as a matrix product (plus bias): a new (B, C_out, H, W) tensor
    (not a view: an autograd.Function's output that is a view could not be modified in place)."""
    b, _, h, w = x.shape
    out = x.new_empty(b, weight.shape[0], h, w)
    _left_product(weight.flatten(1), _columns(x), bias, out=out.view(b, -1, h * w))
    return out


class _Products(torch.autograd.Function):
    """The 1x1 convolution as products in forward and backward. It saves what the convolution
    saves (x itself and the weight; x as the very tensor given, so a saved-tensor hook that
    recognises it, such as :func:`sparse_attn.nn.recompute.saved_as_recipe`, still does)."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _project(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        grads = _columns(grad_out)  # (B, C_out, H·W)
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = _left_product(weight.flatten(1).t(), grads).view(x.shape)
        if ctx.needs_input_grad[1]:
            columns = _columns(x)
            if x.shape[0] == 1:
                grad_weight = torch.mm(grads[0], columns[0].t())
            else:
                grad_weight = torch.bmm(grads, columns.transpose(1, 2)).sum(0)
            grad_weight = grad_weight.view(weight.shape)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grads.sum((0, 2))
        return grad_x, grad_weight, grad_bias


def _cpu_vendor():
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":")[1].strip() for line in f if line.startswith("vendor_id")), "")
    except OSError:
        return ""


def _products_pay_here():
    """Where the products were measured faster than the convolution (the module's docstring)."""
    capability = torch.backends.cpu.get_cpu_capability()
    return capability.startswith("AVX512") or (capability == "AVX2" and _cpu_vendor() == "GenuineIntel")


PRODUCTS_ON_THIS_CPU = _products_pay_here()


def runs_as_products(x, weight, backend="auto"):
    """Whether the 1x1 convolution of ``x`` by ``weight`` runs as matrix products: off the
    ``reference`` backend (as requested: "auto" follows ``use_backend``), on a non-empty map of
    floats in the weight's dtype on a CPU with AVX-512 or an Intel one with AVX2
    (:data:`PRODUCTS_ON_THIS_CPU`), outside autocast."""
    return (PRODUCTS_ON_THIS_CPU and requested(backend) != "reference" and x.device.type == "cpu" and x.dim() == 4
            and x.shape[0] > 0 and x.dtype in (torch.float32, torch.float64) and x.dtype == weight.dtype
            and not torch.is_autocast_enabled("cpu"))


def pointwise_conv2d(x, weight, bias=None, backend="auto"):
    """``F.conv2d(x, weight, bias)`` for a (C_out, C_in, 1, 1) ``weight``: as matrix products
    where :func:`runs_as_products` says so, else the convolution itself."""
    if not runs_as_products(x, weight, backend):
        return F.conv2d(x, weight, bias)
    if weight.dim() != 4 or weight.shape[2:] != (1, 1) or x.shape[1] != weight.shape[1]:
        raise ValueError(f"weight: expected shape ({x.shape[1] if x.dim() == 4 else 'C_in'}, ..., 1, 1) "
                         f"for x of shape {tuple(x.shape)}, got {tuple(weight.shape)}")
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias)):
        return _Products.apply(x, weight, bias)
    return _project(x, weight, bias)


class PointwiseConv2d(nn.Conv2d):
    """``nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=bias)`` (same parameters and
    state-dict keys) on :func:`pointwise_conv2d`. ``backend``: "auto" follows ``use_backend``."""

    def __init__(self, in_channels, out_channels, bias=True, backend="auto", device=None, dtype=None):
        super().__init__(in_channels, out_channels, kernel_size=1, bias=bias, device=device, dtype=dtype)
        self.backend = backend

    def forward(self, x):
        return pointwise_conv2d(x, self.weight, self.bias, self.backend)

    def extra_repr(self):
        return f"{super().extra_repr()}, backend={self.backend!r}"
