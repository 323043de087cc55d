"""Full networks on the library's modules, with the official constructor arguments and
parameter names: :class:`DRSformer` (with and without MEFC) and :class:`Restormer`."""
from .drsformer import DRSformer
from .restormer import Restormer

__all__ = ["DRSformer", "Restormer"]
