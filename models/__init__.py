"""Full networks on the library's modules: :class:`DRSformer` (with and without MEFC) and
:class:`Restormer` with the official constructor arguments and parameter names, and
:class:`DSGformer`, the sparse gated deblurring transformer (a reconstruction), and
:class:`ALformer`, Magic-ELF's deraining network, and PANet's :class:`PANet` (denoising,
compression artefacts, demosaicing) and :class:`PAEDSR` (super-resolution), with the official
arguments and names."""
from .alformer import ALformer
from .drsformer import DRSformer
from .dsgformer import DSGformer
from .panet import PAEDSR, PANet
from .restormer import Restormer

__all__ = ["DRSformer", "Restormer", "DSGformer", "ALformer", "PANet", "PAEDSR"]
