"""The networks the jobs run, by name, and their construction from options or from a checkpoint.

Every network in :mod:`sparse_attn.models` (``__all__``) is available, by its class name in any
case (``drsformer``, ``Restormer``, ...), so networks added later need nothing here. A checkpoint
is recognised from its keys: which network it belongs to (the key patterns, digits aside, of each
network's default configuration) and, for the Restormer-family U-Nets, the configuration
(``dim``, ``num_blocks``, ``heads``, DRSformer with or without MEFC, refinement blocks, ...);
a network class may tell its own from the keys with a ``config_from_state_dict`` classmethod (PANet).
Checkpoints this command writes also carry the ``network_g`` options they were trained with.
"""
import inspect
import re

import torch

from sparse_attn import models

from .errors import CliError


def registry():
    """{lower-case name: network class} of every network in sparse_attn.models."""
    return {name.lower(): getattr(models, name) for name in models.__all__}


def network_class(name):
    classes = registry()
    if not isinstance(name, str) or name.lower() not in classes:
        raise CliError(f"unknown network {name!r}; available: {', '.join(cls.__name__ for cls in classes.values())}")
    return _restores_in_place(classes[name.lower()])


def _restores_in_place(cls):
    """``cls``, or CliError for a network the jobs cannot run: they restore (and train on)
    images in [0, 1] at their own size, which a super-resolution network (``upscales = True``,
    e.g. PAEDSR, images in [0, 255]) does not take."""
    if getattr(cls, "upscales", False):
        raise CliError(f"{cls.__name__} is a super-resolution network (its output is larger than its input); "
                       f"the jobs restore images at their own size: use sparse_attn.models.{cls.__name__} from Python")
    return cls


def build(options):
    """The network of a BasicSR ``network_g`` block: ``{"type": "DRSformer", "dim": 48, ...}``."""
    options = dict(options or {})
    cls = network_class(options.pop("type", None))
    accepted = inspect.signature(cls.__init__).parameters
    unknown = sorted(k for k in options if k not in accepted)
    if unknown:
        raise CliError(f"network_g: {cls.__name__} takes no argument {', '.join(unknown)} "
                       f"(it takes {', '.join(p for p in accepted if p != 'self')})")
    try:
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in options.items()})
    except (TypeError, ValueError) as exc:
        raise CliError(f"network_g: cannot build {cls.__name__}: {exc}") from None


def first_output(output):
    """The restored image of a network's output: networks with several outputs (ALformer) return
    the restored image first."""
    return output[0] if isinstance(output, (tuple, list)) else output


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------
def read_checkpoint(path):
    """(state_dict, network_g options or None) of a checkpoint file: BasicSR's ``{"params": ...}``
    (``params_ema`` preferred when present, as BasicSR's test scripts do not, but EMA weights are
    the ones to restore with), ``{"state_dict": ...}`` (Magic-ELF's training files), or a bare
    state_dict; a ``module.`` prefix (DDP) is dropped."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CliError(f"--weights: {path} does not exist") from None
    except IsADirectoryError:
        raise CliError(f"--weights: {path} is a folder, not a checkpoint file") from None
    except Exception as exc:  # pickle, zip and torch errors all mean: not a checkpoint we can read
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CliError(f"--weights: {path} is not a PyTorch checkpoint ({reason[:200]})") from None
    if not isinstance(checkpoint, dict):
        raise CliError(f"--weights: {path} holds a {type(checkpoint).__name__}, not a state_dict")
    options = checkpoint.get("network_g") if isinstance(checkpoint.get("network_g"), dict) else None
    for key in ("params_ema", "params", "state_dict"):  # state_dict: Magic-ELF's training files
        if isinstance(checkpoint.get(key), dict):
            checkpoint = checkpoint[key]
            break
    if not checkpoint or not all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        raise CliError(f"--weights: {path} holds no state_dict (no tensors under 'params' or at the top level)")
    return {k.removeprefix("module."): v for k, v in checkpoint.items()}, options


def _patterns(keys):
    return {re.sub(r"\.\d+\.", ".#.", f".{k}.") for k in keys}


def recognise(state_dict):
    """(network class, similarity in [0, 1]) of the network whose default configuration's key
    patterns best match the checkpoint's (Jaccard similarity of the sets of patterns)."""
    theirs = _patterns(state_dict)
    best, best_score = None, -1.0
    for cls in registry().values():
        try:
            with torch.device("meta"):
                ours = _patterns(cls().state_dict())
        except Exception:  # a network that has no default configuration
            continue
        score = len(ours & theirs) / len(ours | theirs)
        if score > best_score:
            best, best_score = cls, score
    return best, best_score


def unet_config(state_dict, cls):
    """The constructor arguments of a Restormer-family U-Net (RestorationUNet) that the keys
    tell, restricted to those ``cls`` takes."""
    sd = state_dict
    embed = sd.get("patch_embed.proj.weight")
    if embed is None or "output.weight" not in sd:
        return {}
    dim = embed.shape[0]
    levels = ("encoder_level1", "encoder_level2", "encoder_level3", "latent")
    config = {"inp_channels": embed.shape[1], "out_channels": sd["output.weight"].shape[0], "dim": dim,
              "num_blocks": tuple(_count(sd, level) for level in levels),
              "bias": "output.bias" in sd,
              "LayerNorm_type": "WithBias" if "encoder_level1.0.norm1.body.bias" in sd else "BiasFree",
              "mefc": any(k.startswith("encoder_level0.") for k in sd),
              "num_refinement_blocks": _count(sd, "refinement"),
              "dual_pixel_task": "skip_conv.weight" in sd}
    temperatures = [sd.get(f"{level}.0.attn.temperature") for level in levels]
    if all(t is not None for t in temperatures):
        config["heads"] = tuple(t.shape[0] for t in temperatures)
    hidden = [sd.get(f"{level}.0.ffn.project_in.weight") for level in levels]
    if all(h is not None for h in hidden):
        config["ffn_expansion_factor"] = _expansion_factor(dim, [h.shape[0] // 2 for h in hidden])
    fft = sd.get("encoder_level1.0.ffn.fft")
    if fft is not None:
        config["patch_size"] = fft.shape[-2]
    accepted = inspect.signature(cls.__init__).parameters
    return {k: v for k, v in config.items() if k in accepted}


def _count(state_dict, prefix):
    indices = {int(m.group(1)) for k in state_dict for m in [re.match(rf"{prefix}\.(\d+)\.", k)] if m}
    return max(indices) + 1 if indices else 0


def _expansion_factor(dim, hidden):
    """A factor f with int(dim * 2**l * f) == hidden[l] at every level: the official 2.66 when it
    fits, else one derived from the first level."""
    for factor in (2.66, hidden[0] / dim, (hidden[0] + 0.5) / dim):
        if all(int(dim * 2 ** level * factor) == h for level, h in enumerate(hidden)):
            return factor
    return hidden[0] / dim


def load(name, path, **overrides):
    """The network ``name`` (None: recognised from the keys) with the weights of ``path``.

    Raises CliError, in one line, when the file is not a checkpoint, belongs to another network,
    or does not match the configuration the keys tell."""
    state_dict, options = read_checkpoint(path)
    found, score = recognise(state_dict)
    cls = network_class(name) if name else found
    if cls is None:
        raise CliError(f"--weights: {path} matches none of the networks")
    if found is not cls and score > 0.5:
        raise CliError(f"--weights: {path} is a {found.__name__} checkpoint, not {cls.__name__} "
                       f"(use --model {found.__name__.lower()})")
    _restores_in_place(cls)
    if options and network_class(options.get("type", cls.__name__)) is cls:
        net = build({**options, **overrides, "type": cls.__name__})
    else:
        told = cls.config_from_state_dict(state_dict) if hasattr(cls, "config_from_state_dict") else \
            unet_config(state_dict, cls)
        net = cls(**{**told, **overrides})
    load_weights(net, state_dict, f"--weights: {path}")
    return net


def load_weights(net, path_or_state_dict, what, strict=True):
    """``net.load_pretrained`` (the models' checkpoint reader and key check), its complaint as a
    CliError in one line."""
    from sparse_attn.models.checkpoint import CheckpointError
    try:
        net.load_pretrained(path_or_state_dict, strict=strict)
    except CheckpointError as exc:
        message = " ".join(line.strip() for line in str(exc).splitlines())
        raise CliError(f"{what}: {message}") from None
