"""Inputs and comparisons shared by the mixed_scale_dwconv tests of every backend: the backend in
some dtype against the float64 reference, its error bounded by the reference's own error in that
dtype (as flash-attention's tests do)."""
import torch

import sparse_attn
from sparse_attn.reference import mixed_scale_dwconv as reference

NAMES = ("x", "w3", "w5", "w3_1", "w5_1", "b3", "b5", "b3_1", "b5_1")

# (B, 2h, H, W). The CPU tiles are 32 x 128 pixels: the shapes cover several tiles with ragged
# edges, images thinner than a 5x5 kernel (1 x N, N x 1, 1 x 1), an odd h and DRSformer's
# level-1 width 2h = 254 (h = 127).
SHAPES = [
    (2, 6, 5, 9),
    (1, 254, 9, 7),
    (2, 6, 1, 7),
    (1, 6, 7, 1),
    (1, 6, 1, 1),
    (1, 2, 2, 3),
    (2, 6, 37, 133),
]


def make_inputs(shape, dtype, bias=True, device="cpu"):
    """x and the eight parameters, scaled like trained weights so that both relus cut."""
    batch, channels, height, width = shape
    hidden = channels // 2
    g = torch.Generator().manual_seed(channels * 1009 + height * 31 + width)

    def rand(*s, scale=1.0):
        return (torch.randn(*s, generator=g, dtype=torch.float64) * scale).to(device=device, dtype=dtype)

    x = rand(batch, channels, height, width)
    weights = [rand(channels, 1, 3, 3, scale=1 / 3), rand(channels, 1, 5, 5, scale=1 / 5),
               rand(hidden, 2, 3, 3, scale=1 / 4), rand(hidden, 2, 5, 5, scale=1 / 7)]
    biases = ([rand(channels, scale=0.2), rand(channels, scale=0.2), rand(hidden, scale=0.2),
               rand(hidden, scale=0.2)] if bias else [None] * 4)
    return [x, *weights, *biases]


def forward_and_grads(fn, inputs, grad_out):
    """fn's output and the gradients of every given input (None for missing biases)."""
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in inputs]
    out = fn(*leaves)
    given = [t for t in leaves if t is not None]
    grads = iter(torch.autograd.grad(out, given, grad_out))
    return out.detach(), [next(grads) if t is not None else None for t in leaves]


def as_dtype(tensors, dtype):
    return [t.to(dtype) if t is not None else None for t in tensors]


def assert_close_to_reference(backend, shape, dtype, bias, device="cpu"):
    """The backend's forward and gradients against the float64 reference: in float64 to rounding,
    in float32 at most 2x the float32 reference's own error (plus a rounding floor)."""
    inputs64 = make_inputs(shape, torch.float64, bias, device)
    grad64 = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(7)).to(device)
    truth = forward_and_grads(reference, inputs64, grad64)
    fn = lambda *a: sparse_attn.mixed_scale_dwconv(*a, backend=backend)  # noqa: E731
    got = forward_and_grads(fn, as_dtype(inputs64, dtype), grad64.to(dtype))
    if dtype == torch.float64:
        baseline = [torch.zeros(())] * 10
    else:
        ref32 = forward_and_grads(reference, as_dtype(inputs64, dtype), grad64.to(dtype))
        baseline = [(a.double() - b).abs().max() if b is not None else None
                    for a, b in zip([ref32[0], *ref32[1]], [truth[0], *truth[1]])]
    eps = torch.finfo(dtype).eps
    for name, mine, ref, ref_error in zip(("out",) + NAMES, [got[0], *got[1]], [truth[0], *truth[1]], baseline):
        if ref is None:
            assert mine is None, f"{name}: expected no gradient for a missing bias"
            continue
        assert mine.dtype == dtype and mine.shape == ref.shape, name
        error = (mine.double() - ref).abs().max().item()
        floor = 8 * eps * max(ref.abs().max().item(), 1.0)
        assert error <= 2 * ref_error.item() + floor, (
            f"{name}: error {error:.3g} vs the {dtype} reference's {ref_error.item():.3g} (floor {floor:.3g})")


def opcheck_forward_and_backward(forward_op, backward_op, inputs):
    """torch.library.opcheck of a forward op on `inputs` (x and the eight parameters, biases may
    be None) and of its backward op on that forward's output."""
    torch.library.opcheck(forward_op.default, tuple(inputs))
    x, w3, w5, w3_1, w5_1, b3, b5, _, _ = detached = [t.detach() if t is not None else None for t in inputs]
    out = forward_op(*detached)
    torch.library.opcheck(backward_op.default, (torch.randn_like(out), x, out, w3, w5, w3_1, w5_1, b3, b5))
