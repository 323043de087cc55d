"""Inputs and comparisons shared by the sparse_channel_attention tests of every backend:
the backend in some dtype against the float64 reference, its error bounded by the reference's
own error in that dtype (as flash-attention's tests do)."""
import torch

import sparse_attn

GRAD_NAMES = ("q", "k", "v", "temperature", "weights")
# Error allowed on top of twice the reference's own relative error, per dtype: a few ulps of
# the result, for sums whose order differs from the reference's.
ERROR_FLOOR = {torch.float32: 1e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def make_inputs(batch, heads, d, n, dtype=torch.float64, branches=4, layout="contiguous", device="cpu"):
    """q, k, v, temperature (heads, 1, 1), weights (branches,), as leaves requiring grad.
    layout "transposed": (B, heads, N, d) storage seen as (B, heads, d, N); "chunked": channel
    slices of one qkv map, as the modules produce them."""
    if layout == "transposed":
        q, k, v = (torch.randn(batch, heads, n, d, dtype=dtype, device=device).transpose(-1, -2) for _ in range(3))
    elif layout == "chunked":
        qkv = torch.randn(batch, 3 * heads * d, n, dtype=dtype, device=device)
        q, k, v = (t.reshape(batch, heads, d, n) for t in qkv.chunk(3, dim=1))
    else:
        q, k, v = (torch.randn(batch, heads, d, n, dtype=dtype, device=device) for _ in range(3))
    temperature = torch.rand(heads, 1, 1, dtype=dtype, device=device) + 0.5
    weights = torch.rand(branches, dtype=dtype, device=device) + 0.1
    return [t.detach().requires_grad_() for t in (q, k, v, temperature, weights)]


def run(backend, inputs, topk, activation="softmax", grad_out=None):
    """Output and the gradients of (q, k, v, temperature, weights) for <out, grad_out>."""
    out = sparse_attn.sparse_channel_attention(*inputs, topk, activation, backend=backend)
    if grad_out is None:
        grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, inputs, grad_out)
    return out.detach(), grads, grad_out


def cast(inputs, dtype):
    """Copies in `dtype` that keep the layout (strides) of the originals."""
    return [t.detach().to(dtype).requires_grad_() for t in inputs]


def max_rel_err(x, ref):
    return ((x.double() - ref.double()).abs().max() / ref.double().abs().max().clamp_min(1e-30)).item()


def assert_close_to_float64_reference(backend, inputs64, topk, activation, dtype):
    """`backend` run in `dtype` against the reference in float64 on the same values: for the
    output and every gradient, relative error <= 2 x the reference's own in `dtype` + a floor
    (in float64 itself: <= 1e-12)."""
    out64, grads64, g = run("reference", inputs64, topk, activation)
    out, grads, _ = run(backend, cast(inputs64, dtype), topk, activation, g.to(dtype))
    if dtype == torch.float64:
        tolerances = [1e-12] * 6
    else:
        ref_out, ref_grads, _ = run("reference", cast(inputs64, dtype), topk, activation, g.to(dtype))
        tolerances = [2 * max_rel_err(r, y) + ERROR_FLOOR[dtype]
                      for r, y in zip((ref_out, *ref_grads), (out64, *grads64))]
    for name, x, y, tol in zip(("out",) + GRAD_NAMES, (out, *grads), (out64, *grads64), tolerances):
        assert x.dtype == dtype and x.shape == y.shape, name
        err = max_rel_err(x, y)
        assert err <= tol, f"{backend} {dtype} {name}: relative error {err:.3g} > {tol:.3g}"


def with_ties_and_zero_channels(inputs):
    """A zero channel of q makes its score row all ties; a repeated channel of k makes two equal
    columns in every row; a zero channel of k a zero column."""
    q, k, v, temperature, weights = inputs
    with torch.no_grad():
        q[:, :, 3] = 0
        k[:, :, 7] = k[:, :, 2]
        k[:, :, 5] = 0
    return [q, k, v, temperature, weights]
