"""Which backends exist here, which one an op runs on, and why one cannot run.

Backends (DESIGN.md "Backends"):
  reference  pure PyTorch, anywhere: the ground truth and the fallback
  native     the C++/CUDA extension sparse_attn._C (CPU tensors; CUDA tensors when built with CUDA)
  triton     the Triton kernels (CUDA tensors; CPU tensors under TRITON_INTERPRET=1)
  auto       CUDA: triton, else native, else reference; CPU: native, else reference

Nothing here queries CUDA at import time. The extension and Triton are imported once, when
sparse_attn is imported; a failure is recorded and reported when that backend is asked for.
"""
import contextlib
import importlib
import os

import torch

BACKENDS = ("reference", "native", "triton")


class BackendUnavailable(RuntimeError):
    """The requested backend cannot run these inputs here; the message says why."""


def _import_error(module):
    try:
        importlib.import_module(module)
    except Exception as exc:  # any failure (missing file, ABI mismatch) makes the backend unavailable
        return f"{module} failed to import ({type(exc).__name__}: {exc})"
    return None


_NATIVE_IMPORT_ERROR = _import_error("sparse_attn._C")
_TRITON_IMPORT_ERROR = _import_error("triton")
# Read once, like Triton itself: TRITON_INTERPRET takes effect when the kernels are decorated.
_TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# The backend chosen by `use_backend`; "auto" when none is. A plain global, so that
# torch.compile guards on it (changing it recompiles rather than being ignored).
_forced_backend = "auto"


def _native_kernels():
    """{(op, device_type)} of the kernels sparse_attn._C registered, read once at import (a
    plain set lookup later is what torch.compile can trace)."""
    if _NATIVE_IMPORT_ERROR is not None:
        return frozenset()
    ops = [name for name in torch._C._dispatch_get_all_op_names() if name.startswith("sparse_attn::")]
    return frozenset((name.split("::", 1)[1], device) for name in ops for device in ("cpu", "cuda")
                     if torch._C._dispatch_has_kernel_for_dispatch_key(name, device.upper()))


_NATIVE_KERNELS = _native_kernels()


def native_has_kernel(op, device_type):
    """Whether sparse_attn._C registered a kernel of ``op`` for ``device_type`` ("cpu"/"cuda")."""
    return (op, device_type) in _NATIVE_KERNELS


def why_unavailable(name, device_type, dtype=None, op=None, dtypes=None, triton_ready=True):
    """Why backend ``name`` cannot run an op on tensors of ``device_type``/``dtype``, or None.

    op: the schema name of the op's native kernel (checked when ``name`` is "native").
    dtypes: {backend: {device_type: dtypes it supports}} for the op; missing means any.
    triton_ready: True, False where the op has no Triton kernels yet, or a sentence saying why
        its Triton kernels cannot take these inputs (e.g. a shape limit).
    """
    if name not in BACKENDS:
        raise ValueError(f"backend: expected one of {('auto',) + BACKENDS}, got {name!r}")
    if name == "native":
        if _NATIVE_IMPORT_ERROR is not None:
            return f"the C++ extension is not built: {_NATIVE_IMPORT_ERROR}; run `make build`"
        if op is not None and not native_has_kernel(op, device_type):
            return (f"sparse_attn._C has no {device_type.upper()} kernel for {op}"
                    + (" (it was built without nvcc)" if device_type == "cuda" else ""))
    if name == "triton":
        if _TRITON_IMPORT_ERROR is not None:
            return _TRITON_IMPORT_ERROR
        if triton_ready is not True:
            return triton_ready or "this op has no Triton kernels"
        if device_type == "cpu" and not _TRITON_INTERPRET:
            return ("Triton runs on CUDA tensors, and on CPU tensors only in its interpreter: "
                    "set TRITON_INTERPRET=1 before importing sparse_attn")
        if device_type not in ("cpu", "cuda"):
            return f"Triton kernels run on CUDA tensors, got {device_type}"
    supported = (dtypes or {}).get(name, {}).get(device_type)
    if dtype is not None and supported is not None and dtype not in supported:
        names = ", ".join(str(d).replace("torch.", "") for d in supported)
        return f"its {device_type} kernels take {names}, got {str(dtype).replace('torch.', '')}"
    return None


def resolve(requested, tensor, **capabilities):
    """The backend an op runs ``tensor`` on: ``requested``, else the one `use_backend` forces,
    else the first of the device's preference order that can run. Raises BackendUnavailable
    with the reason when an explicitly requested backend cannot run."""
    if requested != "auto" and requested not in BACKENDS:
        raise ValueError(f"backend: expected one of {('auto',) + BACKENDS}, got {requested!r}")
    forced = requested == "auto" and _forced_backend != "auto"
    if requested == "auto":
        requested = _forced_backend
    device_type = tensor.device.type
    if requested != "auto":
        reason = why_unavailable(requested, device_type, tensor.dtype, **capabilities)
        if reason is None:
            return requested
        # `use_backend("triton")` moves a whole model; its ops that have no Triton kernels at all
        # run on the device's usual order instead (an explicit backend= still raises).
        if not (forced and requested == "triton" and capabilities.get("triton_ready", True) is False):
            raise BackendUnavailable(f"backend {requested!r} cannot run here: {reason}")
    order = ("triton", "native", "reference") if device_type == "cuda" else ("native", "reference")
    for name in order:
        if why_unavailable(name, device_type, tensor.dtype, **capabilities) is None:
            return name
    return "reference"


def available(device=None):
    """The backends that can run here: on ``device`` ("cpu"/"cuda"), or by default on any device
    this machine has. (Per-op and per-dtype limits are reported when an op is called.)"""
    devices = [device] if device is not None else ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    names = []
    for name in BACKENDS:
        # Every native build has the attention op's kernels wherever it has any.
        op = "sparse_channel_attention_forward" if name == "native" else None
        if any(why_unavailable(name, torch.device(dev).type, op=op) is None for dev in devices):
            names.append(name)
    return names


@contextlib.contextmanager
def use_backend(name):
    """Run every op (and every model and module left at ``backend="auto"``) on backend ``name``
    inside the block; an op that has no Triton kernels yet runs on its usual order under
    ``use_backend("triton")``. An explicit ``backend=`` argument still wins."""
    global _forced_backend
    if name != "auto" and name not in BACKENDS:
        raise ValueError(f"backend: expected one of {('auto',) + BACKENDS}, got {name!r}")
    previous, _forced_backend = _forced_backend, name
    try:
        yield
    finally:
        _forced_backend = previous
