"""The one op plug (DESIGN.md "How an op plugs in").

An op declares its implementations once, in an :class:`OpTable` beside its contract: the
argument check, the reference, the autograd pieces shared by its kernels (fake
implementations, what to save, the backward formula) and one :class:`Kernels` entry per compiled
backend (op names, the dtypes each device takes, a ``limits`` check). :func:`plug` turns the
table into the torch.library registrations and into dispatch:

- native: the schemas come from csrc/ops.cpp; here they get their fake implementations and the
  autograd formula.
- triton: the launchers become ops of their own, ``triton_op`` when the kernels are compiled
  (torch.compile then sees the kernels), and opaque ``custom_op`` with the table's fakes in
  Triton's interpreter, whose kernels cannot be traced but can be called from a compiled graph.
  They share the native op's autograd formula: the contract (inputs, outputs, what is saved) is
  the op's, not the backend's.
- dispatch: ``auto`` walks the device's order (sparse_attn.backends.auto_order) and takes the
  first backend with no reason against these tensors; an explicit backend that cannot run raises
  BackendUnavailable with that reason, never a C++ error.
"""
import dataclasses
from typing import Any, Callable, Mapping, Optional

import torch

from .. import backends

_OPS = {}  # public name -> Op

# What Triton kernels that accumulate in fp32 take: fp32, fp16 and bf16 on GPUs; on CPU tensors
# (Triton's interpreter, whose bf16 products are wrong: numpy has no bf16) fp32 and fp16.
TRITON_DTYPES = {"cpu": (torch.float32, torch.float16), "cuda": (torch.float32, torch.float16, torch.bfloat16)}


@dataclasses.dataclass(frozen=True)
class Kernels:
    """One compiled backend of an op.

    forward, backward: op names in the ``sparse_attn`` namespace. Native ones are declared in
        csrc/ops.cpp; Triton ones are registered here from ``launchers``.
    dtypes: {device type: the dtypes its kernels take}; a device type not listed takes none.
    limits: called with the kernel arguments; returns why these tensors are beyond the kernels
        (a shape or grid bound), or None.
    launchers: Triton only: the module in sparse_attn.kernels whose annotated ``forward`` and
        ``backward`` start the kernels (None when Triton cannot be imported).
    """
    forward: str
    backward: str
    dtypes: Mapping[str, tuple]
    limits: Optional[Callable[..., Optional[str]]] = None
    launchers: Any = None


def first_output(outputs):
    """The public result of a forward op whose later outputs are statistics kept for backward."""
    return outputs[0]


@dataclasses.dataclass(frozen=True)
class OpTable:
    """Everything about an op that is not a kernel.

    name: the public function's name (``sparse_attn.<name>``).
    arguments: the contract: validates the public arguments (without ``backend``) and returns
        the kernel arguments, the positional arguments of the forward op; raises errors that name
        the argument.
    reference: the pure-PyTorch op on the kernel arguments, returning the public result.
    result: the public result from the forward op's outputs (e.g. the first of several).
    fake_forward, fake_backward: shapes and dtypes of the forward and backward ops' outputs.
    setup_context: torch.library's ``setup_context(ctx, inputs, output)``: saves for backward.
    backward: ``backward(ctx, backward_op, *grad_outputs)``: the gradients of the forward op's
        inputs, computed with ``backward_op`` (the backend's backward op).
    native, triton: the compiled backends, or None where the op has none.
    """
    name: str
    arguments: Callable
    reference: Callable
    fake_forward: Callable
    fake_backward: Callable
    setup_context: Callable
    backward: Callable
    result: Callable = staticmethod(lambda outputs: outputs)
    native: Optional[Kernels] = None
    triton: Optional[Kernels] = None


@dataclasses.dataclass(frozen=True)
class Explanation:
    """Which backend ``auto`` runs an op's arguments on, and why each other one was passed over.

    reasons: {backend: why it cannot run these arguments, or None}; order: the backends `auto`
    tries on this device type, in order (others run only when asked for by name).
    """
    op: str
    device_type: str
    chosen: str
    reasons: Mapping[str, Optional[str]]
    order: tuple

    def __str__(self):
        lines = [f"{self.op} on {self.device_type} tensors: auto picks {self.chosen!r}"]
        for name, reason in self.reasons.items():
            if name == self.chosen:
                continue
            if reason is None:
                reason = ("can run, after the chosen one" if name in self.order
                          else f"can run, but auto does not try it on {self.device_type} tensors: ask for it by name")
            lines.append(f"  {name}: {reason}")
        return "\n".join(lines)


def _dtype_name(dtype):
    return str(dtype).replace("torch.", "")


class Op:
    """A plugged op: ``op(backend, *public_args)`` checks, dispatches and runs it."""

    def __init__(self, table):
        self.table = table
        self.kernels = {"native": table.native, "triton": table.triton}
        self.forward_ops, self.interpreted = {}, False
        if table.native is not None and backends.why_unavailable("native", "cpu") is None:
            self._register_native(table.native)
        if table.triton is not None and table.triton.launchers is not None:
            self._register_triton(table.triton)

    # -- registration ---------------------------------------------------------------------------
    def _register_autograd(self, forward_name, backward_op):
        table = self.table

        def backward(ctx, *grads):
            return table.backward(ctx, backward_op, *grads)

        torch.library.register_autograd(f"sparse_attn::{forward_name}", backward, setup_context=table.setup_context)

    def _register_native(self, kernels):
        if not hasattr(torch.ops.sparse_attn, kernels.forward):  # a build older than this op
            return
        torch.library.register_fake(f"sparse_attn::{kernels.forward}", self.table.fake_forward)
        torch.library.register_fake(f"sparse_attn::{kernels.backward}", self.table.fake_backward)
        self._register_autograd(kernels.forward, getattr(torch.ops.sparse_attn, kernels.backward))
        self.forward_ops["native"] = getattr(torch.ops.sparse_attn, kernels.forward)

    def _register_triton(self, kernels):
        # In the interpreter the kernels are plain Python functions that torch.compile cannot
        # trace into a graph: there the ops are opaque, with the table's fakes.
        self.interpreted = backends.TRITON_INTERPRETED
        define = torch.library.custom_op if self.interpreted else torch.library.triton_op
        forward = define(f"sparse_attn::{kernels.forward}", kernels.launchers.forward, mutates_args=())
        backward = define(f"sparse_attn::{kernels.backward}", kernels.launchers.backward, mutates_args=())
        if self.interpreted:
            forward.register_fake(self.table.fake_forward)
            backward.register_fake(self.table.fake_backward)
        self._register_autograd(kernels.forward, getattr(torch.ops.sparse_attn, kernels.backward))
        self.forward_ops["triton"] = getattr(torch.ops.sparse_attn, kernels.forward)

    # -- dispatch -------------------------------------------------------------------------------
    def why_not(self, name, args):
        """Why backend ``name`` cannot run the op on these kernel arguments, or None."""
        if name == "reference":
            return None
        kernels = self.kernels[name]
        if kernels is None:
            return f"{self.table.name} has no {name} kernels"
        tensor = args[0]
        device_type = tensor.device.type
        reason = backends.why_unavailable(name, device_type)
        if reason is not None:
            return reason
        if name not in self.forward_ops:
            return (f"sparse_attn._C has no {kernels.forward} (the build predates this op: run `make build`)"
                    if name == "native" else f"Triton's kernels of {self.table.name} could not be loaded")
        if name == "native" and not backends.native_has_kernel(kernels.forward, device_type):
            return f"sparse_attn._C has no {device_type.upper()} kernel for {kernels.forward}"
        supported = kernels.dtypes.get(device_type, ())
        if tensor.dtype not in supported:
            where = f"{device_type} tensors" + (" (Triton's interpreter)" if name == "triton" and device_type == "cpu" else "")
            return (f"its kernels take {', '.join(_dtype_name(d) for d in supported) or 'no dtype'} on {where}, "
                    f"got {_dtype_name(tensor.dtype)}")
        return kernels.limits(*args) if kernels.limits is not None else None

    def select(self, backend, args):
        """The backend that runs these kernel arguments: ``backend``, else the one `use_backend`
        set, else the first of the device's order that can run. Raises BackendUnavailable with
        the reason when a requested backend cannot run."""
        requested = backends.requested(backend)
        if requested != "auto":
            reason = self.why_not(requested, args)
            if reason is None:
                return requested
            # `use_backend(...)` moves a whole model; an op that has no kernels of that backend at
            # all runs on its usual order (an explicit backend= still raises).
            if backend != "auto" or self.kernels.get(requested, True) is not None:
                raise backends.BackendUnavailable(f"{self.table.name}: backend {requested!r} cannot run here: {reason}")
        for name in backends.auto_order(args[0].device.type):
            if self.why_not(name, args) is None:
                return name
        return "reference"

    def __call__(self, backend, *public_args, **public_kwargs):
        args = self.table.arguments(*public_args, **public_kwargs)
        name = self.select(backend, args)
        if name == "reference":
            return self.table.reference(*args)
        return self.table.result(self.forward_ops[name](*args))

    def explain(self, *public_args, **public_kwargs):
        args = self.table.arguments(*public_args, **public_kwargs)
        device_type = args[0].device.type
        reasons = {name: self.why_not(name, args) for name in backends.BACKENDS}
        return Explanation(self.table.name, device_type, self.select("auto", args), reasons,
                           tuple(backends.auto_order(device_type)))



def plug(table):
    """Register ``table``'s op and return the :class:`Op` that dispatches it."""
    if table.name in _OPS:
        raise RuntimeError(f"op {table.name!r} is plugged twice")
    op = _OPS[table.name] = Op(table)
    return op


def lookup(op):
    """The plugged :class:`Op` of a public op function or name."""
    name = op if isinstance(op, str) else getattr(op, "__name__", None)
    if name not in _OPS:
        raise ValueError(f"op: expected one of {sorted(_OPS)} (or the function), got {op!r}")
    return _OPS[name]


def plugged():
    """The names of every plugged op."""
    return sorted(_OPS)
