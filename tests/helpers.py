"""What the tests of every op share: which backends run an input, the one tolerance rule against
a float64 truth, the torch.library check of every custom op a call dispatches, and the
no-recompile check of torch.compile.

The tolerance rule (as flash-attention's tests state theirs): a backend run in some dtype may be
at most twice as far from the float64 reference as the reference itself is when it runs in that
dtype, plus a floor of a few units in the last place (of the largest true value) for sums taken
in another order: the whole allowance in float64, where the reference is the truth."""
import contextlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from sparse_attn.backends import BackendUnavailable

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none here)")


# ---------------------------------------------------------------------------------------------
# Which backends run an input
# ---------------------------------------------------------------------------------------------
def why_not(call):
    """None when ``call()`` runs; else the message of the BackendUnavailable it raises."""
    try:
        call()
    except BackendUnavailable as exc:
        return str(exc)
    return None


def skip_unless_runs(call):
    """Skip the test, with the backend's reason, when ``call()`` raises BackendUnavailable."""
    reason = why_not(call)
    if reason is not None:
        pytest.skip(reason)


# ---------------------------------------------------------------------------------------------
# Inputs, outputs and gradients
# ---------------------------------------------------------------------------------------------
def cast(tensors, dtype):
    """Leaves requiring grad in ``dtype`` with the very strides of ``tensors`` (``Tensor.to``
    would make a strided view with gaps contiguous); None stays None."""
    out = []
    for t in tensors:
        if t is None:
            out.append(None)
            continue
        copy = torch.empty_strided(t.shape, t.stride(), dtype=dtype, device=t.device)
        with torch.no_grad():
            copy.copy_(t)
        out.append(copy.requires_grad_())
    return out


def forward_and_grads(fn, inputs, grad_out):
    """``fn(*inputs)`` on fresh leaves of the same values and strides, and the gradients of
    <output, grad_out> for every input (None for an input that is None)."""
    leaves = cast(inputs, inputs[0].dtype)
    out = fn(*leaves)
    given = [t for t in leaves if t is not None]
    grads = iter(torch.autograd.grad(out, given, grad_out))
    return [out.detach()] + [next(grads) if t is not None else None for t in leaves]


# The floor: units in the last place of the largest true value, allowed on top of twice the
# reference's own error, per dtype. An op whose sums are long may widen it in float64 (where the
# reference's own error is 0 by definition), saying why.
FLOOR_ULPS = {torch.float64: 8, torch.float32: 8, torch.float16: 2, torch.bfloat16: 2}


def assert_matches_float64_reference(fn, reference, inputs, dtype, names, grad_out=None, floor_ulps=None):
    """``fn`` in ``dtype`` against ``reference`` in float64 on the same values (``inputs`` are
    cast, strides kept): the output and the gradient of every input, each within the rule of
    this module. ``names``: the output's and each input's name, for the messages.
    ``floor_ulps``: {dtype: ulps} replacing entries of FLOOR_ULPS."""
    inputs64 = cast(inputs, torch.float64)
    out64 = reference(*inputs64).detach()
    if grad_out is None:
        generator = torch.Generator().manual_seed(7)
        grad_out = torch.randn(out64.shape, generator=generator, dtype=torch.float64).to(out64.device)
    grad64 = grad_out.to(torch.float64)
    truth = forward_and_grads(reference, inputs64, grad64)
    got = forward_and_grads(fn, cast(inputs64, dtype), grad64.to(dtype))
    own = forward_and_grads(reference, cast(inputs64, dtype), grad64.to(dtype)) if dtype != torch.float64 else truth
    for name, mine, true, ref in zip(names, got, truth, own):
        if true is None:
            assert mine is None, f"{name}: expected no gradient for an input that is None"
            continue
        assert mine.dtype == dtype and mine.shape == true.shape, f"{name}: {mine.dtype} {tuple(mine.shape)}"
        error = (mine.double() - true).abs().max().item()
        ref_error = (ref.double() - true).abs().max().item()
        floor = {**FLOOR_ULPS, **(floor_ulps or {})}[dtype] * torch.finfo(dtype).eps * true.abs().max().item()
        assert error <= 2 * ref_error + floor, (
            f"{name} in {dtype}: error {error:.3g} > 2 x the reference's {ref_error:.3g} + {floor:.3g}")


# ---------------------------------------------------------------------------------------------
# torch.library
# ---------------------------------------------------------------------------------------------
class _RecordCustomOps(TorchDispatchMode):
    """Records (op, args, kwargs) of every call to an op of the ``sparse_attn`` namespace."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "sparse_attn":
            detach = lambda a: a.detach().clone() if isinstance(a, torch.Tensor) else a  # noqa: E731
            self.calls.append((func, [detach(a) for a in args], {k: detach(v) for k, v in kwargs.items()}))
        return func(*args, **kwargs)


def opcheck_every_custom_op(call, inputs):
    """``torch.library.opcheck`` (schema, fake implementation, autograd registration, AOT
    dispatch with dynamic shapes) on every ``sparse_attn`` op that ``call(*inputs)`` and its
    backward dispatch, with the arguments they got. Forward ops are checked with inputs that
    require grad, as a user's would. Returns the names of the ops checked."""
    leaves = cast(inputs, inputs[0].dtype)
    forward, backward = _RecordCustomOps(), _RecordCustomOps()
    with forward:
        out = call(*leaves)
    with backward:
        torch.autograd.grad(out, [t for t in leaves if t is not None], torch.randn_like(out))
    assert forward.calls, "the call dispatched no sparse_attn op"
    for recorder, needs_grad in ((forward, True), (backward, False)):
        for op, args, kwargs in recorder.calls:
            if needs_grad:
                args = [a.requires_grad_() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                        for a in args]
            else:  # backward ops have no autograd of their own: as autograd calls them, detached
                detach = lambda t: t.detach() if isinstance(t, torch.Tensor) else t  # noqa: E731
                args = [[detach(t) for t in a] if isinstance(a, list) else detach(a) for a in args]
            torch.library.opcheck(op, tuple(args), kwargs)
    return sorted({str(op) for recorder in (forward, backward) for op, _, _ in recorder.calls})


# ---------------------------------------------------------------------------------------------
# torch.compile
# ---------------------------------------------------------------------------------------------
@contextlib.contextmanager
def compiled_once(fn, backend="inductor", dynamic=True):
    """``torch.compile(fn, fullgraph=True)``, fresh, for the block; on leaving it, asserts that
    every call in the block ran one compiled frame: a new size did not recompile."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    counter = CompileCounterWithBackend(backend)
    yield torch.compile(fn, backend=counter, fullgraph=True, dynamic=dynamic)
    assert counter.frame_count == 1, f"compiled {counter.frame_count} times (a new size recompiled)"


def assert_deterministic(fn, inputs, grad_out, names):
    """``fn``'s output and gradients are bitwise the same on a second run and on one thread."""
    first, second = forward_and_grads(fn, inputs, grad_out), forward_and_grads(fn, inputs, grad_out)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = forward_and_grads(fn, inputs, grad_out)
    finally:
        torch.set_num_threads(threads)
    for run in (second, single):
        assert torch.equal(run[0], first[0])
        for name, a, b in zip(names, run[1:], first[1:]):
            assert torch.equal(a, b), f"{name} differs between runs"
