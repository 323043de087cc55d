"""Checkpoint I/O for any network: :class:`CheckpointMixin`.

Release files of the restoration networks come in a few layouts: BasicSR's
``{"params": state_dict}`` (or ``"params_ema"``; Restormer, DRSformer), a bare state_dict
(EDSR-PyTorch, PANet), and either one saved from a ``DataParallel`` / ``DistributedDataParallel``
wrapper, whose keys start with ``module.``. The mixin reads all of them with torch's weights-only
reader, so a file never runs code, and says in one line what is wrong with a file it cannot use.
"""
import os
import warnings
from collections import OrderedDict
from collections.abc import Mapping

import torch
from torch.nn.modules.utils import consume_prefix_in_state_dict_if_present

# The keys under which BasicSR stores the weights, in the order they are tried.
PARAM_KEYS = ("params", "params_ema")
# Prefixes that wrappers put before every key: (Distributed)DataParallel's, torch.compile's.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
_KEYS_SHOWN = 5


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded: unreadable, not a state_dict, or of another network."""


class CheckpointMixin:
    """``load_pretrained`` / ``from_pretrained`` for an ``nn.Module`` subclass.

    Use it as the first base, ``class Net(CheckpointMixin, nn.Module)``. A subclass may override
    :meth:`_config_summary` (the constructor arguments that decide the keys, shown when a
    checkpoint does not match) and :meth:`_checkpoint_hint` (a sentence on the likely cause of a
    mismatch, e.g. which constructor argument to change).
    """

    def load_pretrained(self, path_or_state_dict, strict=True, *, param_key=None):
        """Load weights into this module and return the module.

        path_or_state_dict: a file written by ``torch.save`` (read on the CPU with
            ``weights_only=True``; parameters are then copied to wherever the module is), or the
            loaded object itself. Either holds a state_dict, bare or as BasicSR's
            ``{"params": state_dict}`` / ``{"params_ema": state_dict}``; a ``module.`` prefix on
            every key (a DataParallel checkpoint) is dropped.
        strict: True (default): the keys must match this module's exactly. False: load the keys
            both have and leave the others as they are (at least one must be shared).
        param_key: the BasicSR key to read ("params" or "params_ema"); None takes "params" when
            present, else "params_ema".

        Raises :class:`CheckpointError` (a ValueError) for a file that is not a checkpoint that
        can be read safely, for a checkpoint holding no state_dict, for one of another network
        (naming the missing and unexpected keys, and the shapes that differ), and for one whose
        copies of a tensor the module holds once (PAEDSR's attention, a shared activation)
        differ; nothing is loaded then.
        """
        source = _describe(path_or_state_dict)
        checkpoint = _read(path_or_state_dict, source)
        state_dict = _strip_wrapper_prefix(_unwrap(checkpoint, source, param_key), self.state_dict().keys())
        self._check_compatible(state_dict, source, strict)
        self._check_tied_copies(state_dict, source)
        if not strict:
            own = self.state_dict().keys()
            state_dict = {k: v for k, v in state_dict.items() if k in own}
        self.load_state_dict(state_dict, strict=strict)
        return self

    @classmethod
    def from_pretrained(cls, path, **constructor_kwargs):
        """Construct ``cls(**constructor_kwargs)`` (e.g. the official constructor arguments of the
        checkpoint's network) and load ``path`` into it strictly (see :meth:`load_pretrained`)."""
        return cls(**constructor_kwargs).load_pretrained(path)

    # -- hooks for subclasses -------------------------------------------------------------------
    def _config_summary(self):
        """The constructor arguments that decide the keys, as ``"dim=48, mefc=True"``; "" if none."""
        return ""

    def _checkpoint_hint(self, missing, unexpected):
        """A sentence on the likely cause of a key mismatch, or ""."""
        return ""

    # -- the check --------------------------------------------------------------------------------
    def _check_compatible(self, state_dict, source, strict):
        own = self.state_dict()
        missing = sorted(k for k in own if k not in state_dict)
        unexpected = sorted(k for k in state_dict if k not in own)
        shared = [k for k in own if k in state_dict]
        reshaped = [f"{k} {tuple(state_dict[k].shape)} vs {tuple(own[k].shape)}" for k in shared
                    if state_dict[k].shape != own[k].shape]
        keys_differ = (missing or unexpected) if strict else not shared
        if not keys_differ and not reshaped:
            return
        target = f"{type(self).__name__}({self._config_summary()})"
        header = f"{source} does not match {target}"
        if not shared:
            header += ": no key in common, a checkpoint of another network?"
        lines = [header + ("" if header.endswith("?") else ":")]
        if missing and (strict or not shared):
            lines.append(f"  missing keys ({len(missing)}): {_listing(missing)}")
        if unexpected and (strict or not shared):
            lines.append(f"  unexpected keys ({len(unexpected)}): {_listing(unexpected)}")
        if reshaped:
            lines.append(f"  shapes differ (checkpoint vs model) ({len(reshaped)}): {_listing(reshaped)}")
        hint = self._checkpoint_hint(missing, unexpected)
        if hint:
            lines.append(f"  hint: {hint}")
        raise CheckpointError("\n".join(lines))

    def _check_tied_copies(self, state_dict, source):
        """Keys that name one tensor of this module (a module registered twice, an activation
        shared by many blocks) must hold equal values in the checkpoint: loading them one after
        the other would silently keep the last."""
        by_tensor = {}
        for key, tensor in self.state_dict(keep_vars=True).items():
            if key in state_dict:
                by_tensor.setdefault(id(tensor), []).append(key)
        differ = [keys for keys in by_tensor.values()
                  if any(not torch.equal(state_dict[k], state_dict[keys[0]]) for k in keys[1:])]
        if differ:
            listing = "; ".join(_listing(keys) for keys in differ)
            raise CheckpointError(f"{source}: keys that are one tensor in {type(self).__name__} hold different "
                                  f"values in the checkpoint (a corrupt or edited file?): {listing}")


def _describe(path_or_state_dict):
    if isinstance(path_or_state_dict, (str, os.PathLike)):
        return os.fspath(path_or_state_dict)
    if isinstance(path_or_state_dict, Mapping):
        return "the state_dict"
    raise TypeError(f"path_or_state_dict: expected a file path or a state_dict, "
                    f"got {type(path_or_state_dict).__name__}")


def _read(path_or_state_dict, source):
    if isinstance(path_or_state_dict, Mapping):
        return path_or_state_dict
    try:
        with warnings.catch_warnings():
            # The weights-only reader warns about pickle protocols before it refuses a file.
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path_or_state_dict, map_location="cpu", weights_only=True)
    except OSError:
        raise  # missing file, a folder, no permission: the OS's message says it
    except Exception:
        # Torch's message for a file it refuses advises unpickling it, which runs whatever code
        # the file holds: say what the file is not instead, and drop torch's message (from None).
        raise CheckpointError(f"{source}: not a checkpoint that can be read safely (expected a torch.save "
                              f"file of tensors, such as a state_dict; code in a file is never run)") from None


def _unwrap(checkpoint, source, param_key):
    if not isinstance(checkpoint, Mapping):
        raise CheckpointError(f"{source}: expected a state_dict or a {{'params': state_dict}} checkpoint, "
                              f"got {type(checkpoint).__name__}")
    if param_key is not None:
        if param_key not in checkpoint:
            raise CheckpointError(f"{source}: no {param_key!r} in the checkpoint (its keys: {_listing(list(checkpoint))})")
        checkpoint = checkpoint[param_key]
    else:
        checkpoint = next((checkpoint[k] for k in PARAM_KEYS if isinstance(checkpoint.get(k), Mapping)), checkpoint)
    if not isinstance(checkpoint, Mapping):
        raise CheckpointError(f"{source}: expected a state_dict under {param_key!r}, got {type(checkpoint).__name__}")
    not_tensors = [str(k) for k, v in checkpoint.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise CheckpointError(f"{source}: expected a state_dict (tensors by name) or a {{'params': state_dict}} "
                              f"checkpoint; these entries are not tensors: {_listing(not_tensors)}")
    return checkpoint


def _strip_wrapper_prefix(state_dict, own_keys):
    """Drop a prefix that every key has and no key of the module has (a wrapper's), from the keys
    and from the modules' version metadata; the caller's dict is left as it is."""
    own_keys = list(own_keys)
    for prefix in WRAPPER_PREFIXES:
        if state_dict and all(k.startswith(prefix) for k in state_dict) \
                and not any(k.startswith(prefix) for k in own_keys):
            stripped = OrderedDict(state_dict)
            if hasattr(state_dict, "_metadata"):
                stripped._metadata = OrderedDict(state_dict._metadata)
            consume_prefix_in_state_dict_if_present(stripped, prefix)
            state_dict = stripped
    return state_dict


def _listing(items, limit=_KEYS_SHOWN):
    shown = ", ".join(items[:limit])
    return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")
