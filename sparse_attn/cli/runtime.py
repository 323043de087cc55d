"""Where the jobs run: the device and the op backend a user names, checked with one clear error."""
import torch

import sparse_attn

from .errors import CliError

BACKEND_CHOICES = ("auto",) + tuple(sparse_attn.backends.BACKENDS)


def check_backend(name, option="--backend"):
    """``name`` if it names a backend or "auto"; whether it can run is the ops' to say."""
    if name not in BACKEND_CHOICES:
        raise CliError(f"{option}: expected one of {', '.join(BACKEND_CHOICES)}, got {name!r}")
    return name


def device(name, option="--device", local_rank=0):
    """The torch.device for ``name`` (None or "auto": the CUDA device of this process when there
    is one, else the CPU)."""
    if name in (None, "auto"):
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        name = f"cuda:{local_rank}"
    try:
        result = torch.device(name)
    except RuntimeError:
        raise CliError(f"{option}: {name!r} is not a device (cpu, cuda, cuda:N)") from None
    if result.type not in ("cpu", "cuda"):
        raise CliError(f"{option}: expected cpu or cuda, got {name!r}")
    if result.type == "cuda" and not torch.cuda.is_available():
        raise CliError(f"{option}: cuda was asked for, but no CUDA device is present")
    return result
