"""Which backends exist here, which one an op runs on, and why one cannot run.

Backends (DESIGN.md "Backends"):
  reference  pure PyTorch, anywhere: the ground truth and the fallback
  native     the C++/CUDA extension sparse_attn._C (CPU tensors; CUDA tensors when built with CUDA)
  triton     the Triton kernels (CUDA tensors; CPU tensors under TRITON_INTERPRET=1)
  auto       CUDA: triton, else native, else reference; CPU: native, else reference

This module knows the machine (what was built, what imports, which devices); each op's own table
(sparse_attn/ops/, through sparse_attn/ops/_library.py) knows its kernels' dtypes and limits.
Nothing here queries CUDA at import time. The extension and Triton are imported once, when
sparse_attn is imported; a failure is recorded and reported when that backend is asked for.
"""
import contextlib
import importlib
import os

import torch

BACKENDS = ("reference", "native", "triton")
# What `auto` tries, in order, per device type (Triton's interpreter is for tests, never automatic).
AUTO_ORDER = {"cuda": ("triton", "native", "reference")}
AUTO_ORDER_OTHER = ("native", "reference")


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
TRITON_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"

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
    """Whether sparse_attn._C registered a kernel of schema ``op`` for ``device_type`` ("cpu"/"cuda")."""
    return (op, device_type) in _NATIVE_KERNELS


def check_name(name, allow_auto=True):
    """``name`` if it names a backend (or "auto"), else a ValueError listing the choices."""
    choices = (("auto",) if allow_auto else ()) + BACKENDS
    if name not in choices:
        raise ValueError(f"backend: expected one of {choices}, got {name!r}")
    return name


def why_unavailable(name, device_type):
    """Why backend ``name`` cannot run any op on ``device_type`` tensors here (not built, not
    importable, wrong device), or None. Per-op limits (dtypes, shapes) are the op's:
    see :func:`explain`."""
    check_name(name, allow_auto=False)
    if name == "native":
        if _NATIVE_IMPORT_ERROR is not None:
            return f"the C++ extension is not built: {_NATIVE_IMPORT_ERROR}; run `make build`"
        if device_type == "cuda" and not any(device == "cuda" for _, device in _NATIVE_KERNELS):
            return "sparse_attn._C was built without nvcc, so it has no CUDA kernels"
        if device_type not in ("cpu", "cuda"):
            return f"the C++ extension has CPU and CUDA kernels, got {device_type} tensors"
    if name == "triton":
        if _TRITON_IMPORT_ERROR is not None:
            return _TRITON_IMPORT_ERROR
        if device_type == "cpu" and not TRITON_INTERPRETED:
            return ("Triton runs on CUDA tensors, and on CPU tensors only in its interpreter: "
                    "set TRITON_INTERPRET=1 before importing sparse_attn")
        if device_type not in ("cpu", "cuda"):
            return f"Triton kernels run on CUDA tensors, got {device_type} tensors"
    return None


def auto_order(device_type):
    """The backends `auto` tries for ``device_type`` tensors, in order."""
    return AUTO_ORDER.get(device_type, AUTO_ORDER_OTHER)


def requested(backend="auto"):
    """The backend asked for: ``backend`` itself, else the one `use_backend` set, else "auto"
    (which an op resolves per call). For code that must decide from the request, not from what
    an op resolved it to (so that a build without a backend changes no model's structure)."""
    check_name(backend)
    return backend if backend != "auto" else _forced_backend


def forced():
    """The backend `use_backend` set, or "auto"."""
    return _forced_backend


def available(device=None):
    """The backends that can run here: on ``device`` ("cpu"/"cuda"), or by default on any device
    this machine has. (Per-op dtype and shape limits: :func:`explain`.)"""
    devices = [device] if device is not None else ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    return [name for name in BACKENDS
            if any(why_unavailable(name, torch.device(dev).type) is None for dev in devices)]


def explain(op, *args, **kwargs):
    """For these arguments of ``op`` (a public op such as ``sparse_attn.mixed_scale_dwconv``, or
    its name), which backend ``backend="auto"`` picks and why each other one was passed over.

    Returns an :class:`~sparse_attn.ops._library.Explanation`: ``.chosen`` (a backend name),
    ``.reasons`` ({backend: why it cannot run, or None}); ``str()`` of it reads as a short report.
    """
    from .ops import _library  # the ops import this module
    return _library.lookup(op).explain(*args, **kwargs)


@contextlib.contextmanager
def use_backend(name):
    """Run every op (and every model and module left at ``backend="auto"``) on backend ``name``
    inside the block; an op that has no kernels of that backend at all runs on its usual order.
    An explicit ``backend=`` argument still wins."""
    global _forced_backend
    check_name(name)
    previous, _forced_backend = _forced_backend, name
    try:
        yield
    finally:
        _forced_backend = previous
