"""BasicSR-style YAML options: reading them, ``--set`` overrides, and which keys went unused.

The official DRSformer and Restormer option files load unchanged. Keys are read through
:meth:`Options.get` with dotted paths (``"train.optim_g.lr"``); after set-up the job reports the
keys it never read (e.g. ``model_type``, ``io_backend``), so nothing is silently ignored, and
nothing about them is fatal.
"""
import copy
import os

from .errors import CliError

_MISSING = object()


class Options:
    """A nested options dict with dotted-path access that remembers what was read."""

    def __init__(self, tree, source="options"):
        if not isinstance(tree, dict):
            raise CliError(f"{source}: expected a mapping of options at the top level, got {type(tree).__name__}")
        self.tree, self.source, self._read = tree, source, set()

    @classmethod
    def load(cls, path, overrides=()):
        """Read the YAML file ``path`` and apply ``KEY=VALUE`` overrides (values parsed as YAML)."""
        import yaml
        try:
            with open(path) as f:
                tree = yaml.safe_load(f)
        except FileNotFoundError:
            raise CliError(f"--opt: {path} does not exist") from None
        except IsADirectoryError:
            raise CliError(f"--opt: {path} is a folder") from None
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            raise CliError(f"--opt: {path} is not valid YAML ({' '.join(str(exc).split())[:200]})") from None
        options = cls(tree if tree is not None else {}, os.path.basename(path))
        for item in overrides:
            options.override(item)
        return options

    def override(self, item):
        """Apply one ``a.b.c=value`` (value parsed as YAML: numbers, lists, true/false, ~)."""
        import yaml
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise CliError(f"--set: expected KEY=VALUE (e.g. train.total_iter=1000), got {item!r}")
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError:
            value = text
        node = self.tree
        parts = key.strip().split(".")
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[parts[-1]] = value

    def get(self, path, default=_MISSING, kind=None):
        """The value at the dotted ``path`` (``default`` when absent or ~; a CliError when absent
        without a default). ``kind``: float, int or bool converts and checks (YAML reads 3e-4 without
        a dot as a string, as BasicSR's files know)."""
        self._read.add(path)
        node = self.tree
        for part in path.split("."):
            if not isinstance(node, dict) or node.get(part) is None:
                if default is _MISSING:
                    raise CliError(f"{self.source}: the option {path} is required")
                return default
            node = node[part]
        return _convert(node, kind, path, self.source) if kind else node

    def has(self, path):
        return self.get(path, None) is not None

    def unused(self):
        """The dotted paths of leaves never read (a read of a mapping counts for all below it)."""
        return [path for path in _leaves(self.tree)
                if not any(path == r or path.startswith(r + ".") for r in self._read)]

    def as_dict(self):
        return copy.deepcopy(self.tree)


def _convert(value, kind, path, source):
    try:
        if kind is bool:
            if isinstance(value, bool):
                return value
            raise ValueError
        if kind is int and float(value) != int(float(value)):
            raise ValueError
        return kind(float(value)) if kind is int else kind(value)
    except (TypeError, ValueError):
        raise CliError(f"{source}: {path}: expected {kind.__name__}, got {value!r}") from None


def _leaves(tree, prefix=""):
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            yield from _leaves(value, path + ".")
        else:
            yield path
