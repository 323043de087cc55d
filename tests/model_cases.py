"""Helpers shared by the model tests: the backends that run here, and the comparison of a few
training steps on a backend with the same steps on ``reference``."""
import pytest
import torch
import torch.nn.functional as F

import sparse_attn
from sparse_channel_attention_cases import why_unavailable

# Every backend that runs here; the triton one (CPU tensors under TRITON_INTERPRET=1) is included
# and skipped, with the reason, wherever the attention op says it cannot run the inputs.
BACKENDS = sparse_attn.backends.available("cpu")


def skip_unless_runs(backend, dtype):
    """Skip (with the op's reason) where the attention op cannot run ``backend`` in ``dtype``."""
    reason = why_unavailable(backend, dtype)
    if reason is not None:
        pytest.skip(reason)


def runs(backend, dtype):
    """Whether the attention op runs ``backend`` in ``dtype`` here."""
    return why_unavailable(backend, dtype) is None


def training_dtype(backend):
    """float64 where the backend takes it (the Triton interpreter does not), else float32; with
    the relative tolerance of losses and of gradients (against each gradient's largest entry)."""
    if runs(backend, torch.float64):
        return torch.float64, 1e-10, 1e-8
    skip_unless_runs(backend, torch.float32)
    return torch.float32, 1e-5, 1e-4


def assert_training_agrees(losses, grads, ref_losses, ref_grads, loss_rtol, grad_rel):
    assert ref_losses[-1] < ref_losses[0], "the steps must train (else the comparison says little)"
    torch.testing.assert_close(losses, ref_losses, rtol=loss_rtol, atol=0)
    for key, ref in ref_grads.items():
        error = (grads[key] - ref).abs().max().item()
        assert error <= grad_rel * ref.abs().max().item(), f"{key}: max abs error {error:.3g}"


def train_steps(build, backend, dtype=torch.float64, steps=3):
    """Losses and final gradients of a few SGD steps of ``build()`` from a fixed initialisation."""
    torch.manual_seed(0)
    model = build().to(dtype)
    x = torch.rand(2, 3, 16, 16, dtype=dtype)
    target = torch.rand(2, 3, 16, 16, dtype=dtype)
    # Plain SGD: Adam divides by the root of tiny second moments and turns round-off into
    # lr-sized differences, which would compare the optimiser rather than the backends.
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    losses = []
    with sparse_attn.use_backend(backend):
        for _ in range(steps):
            optimizer.zero_grad()
            loss = F.l1_loss(model(x), target)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    return losses, {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}  # not frozen ones
