"""saved_as_recipe: a tensor saved for backward as the recipe that makes it again."""
import torch
import torch.nn.functional as F

import sparse_attn
from sparse_attn.nn import GatedDconvFFN
from sparse_attn.nn.recompute import saved_as_recipe


def _saved_storages(fn):
    """The storages (by address) autograd saves while fn() runs, and fn's result."""
    seen = set()

    def pack(tensor):
        seen.add(tensor.untyped_storage().data_ptr())
        return tensor.detach()  # a live saved output would hold its own graph (benchmarks/memory.py)

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        result = fn()
    return seen, result


def _net(x, weight, recipe):
    hidden = torch.sigmoid(x)  # sigmoid keeps its output: a saved tensor the recipe must pass on
    if not recipe:
        return F.conv2d(hidden, weight), hidden
    kept = x.detach()
    with saved_as_recipe(hidden, lambda: torch.sigmoid(kept)):
        return F.conv2d(hidden, weight), hidden


def test_recipe_gives_the_same_gradients_and_passes_other_saves_on():
    torch.manual_seed(0)
    x = torch.randn(1, 4, 5, 5, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(3, 4, 1, 1, dtype=torch.float64, requires_grad=True)
    plain_saved, (plain, hidden_plain) = _saved_storages(lambda: _net(x, weight, recipe=False))
    lean_saved, (lean, hidden_lean) = _saved_storages(lambda: _net(x, weight, recipe=True))
    grad_out = torch.randn_like(plain)
    expected = torch.autograd.grad(plain, (x, weight), grad_out)
    got = torch.autograd.grad(lean, (x, weight), grad_out)
    for e, g in zip(expected, got):
        torch.testing.assert_close(g, e, rtol=0, atol=0)
    # Without the recipe the conv's input (sigmoid's output) is saved; with it, the outer hook
    # still sees sigmoid saving its output (the same storage), and the weight.
    assert hidden_plain.untyped_storage().data_ptr() in plain_saved
    assert weight.untyped_storage().data_ptr() in lean_saved
    assert hidden_lean.untyped_storage().data_ptr() in lean_saved  # sigmoid's own save, passed on
    assert len(lean_saved) == len(plain_saved)


def test_recipe_is_used_in_backward_instead_of_the_values():
    x = torch.randn(2, 3, requires_grad=True)
    weight = torch.randn(3, 3, requires_grad=True)
    calls = []
    hidden = x * 2

    def make():
        calls.append(1)
        return x.detach() * 2

    with saved_as_recipe(hidden, make):
        out = hidden @ weight
    out.sum().backward()
    assert calls == [1]
    torch.testing.assert_close(weight.grad, (x.detach() * 2).t() @ torch.ones(2, 3))


def test_no_recipe_without_grad():
    x = torch.randn(2, 3)
    with torch.no_grad(), saved_as_recipe(x, lambda: 1 / 0):
        assert torch.equal(x @ x.t(), x @ x.t())


def test_gated_ffn_keeps_no_gate_output_off_the_reference_backend():
    """native: project_out's input (h channels) is made again in backward, not kept."""
    torch.manual_seed(0)
    ffn = GatedDconvFFN(8, 2.0, bias=False).double()
    x = torch.randn(1, 8, 6, 6, dtype=torch.float64, requires_grad=True)
    saved, grads = {}, {}
    for backend in ("reference", "native"):
        storages = {}

        def pack(tensor):
            storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
            return tensor.detach()

        with sparse_attn.use_backend(backend), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = ffn(x)
        saved[backend] = sum(storages.values())
        grads[backend] = torch.autograd.grad(out.square().sum(), [x] + list(ffn.parameters()))
    hidden = ffn.hidden_features
    # native keeps x, hidden (2h channels, for the gate) and the three weights: no h-channel map
    kept = 8 * 36 + 2 * hidden * 36 + (2 * hidden * 8 + 2 * hidden * 9 + 8 * hidden)
    assert saved["native"] == kept * 8
    assert saved["reference"] > saved["native"]
    for r, n in zip(grads["reference"], grads["native"]):
        torch.testing.assert_close(n, r, rtol=1e-12, atol=1e-12)
