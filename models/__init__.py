"""Full networks on the library's modules: :class:`DRSformer` (with and without MEFC) and
:class:`Restormer` with the official constructor arguments and parameter names, and
:class:`DSGformer`, the sparse gated deblurring transformer (a reconstruction),
:class:`ALformer`, Magic-ELF's deraining network, PANet's :class:`PANet` (denoising,
compression artefacts, demosaicing) and :class:`PAEDSR` (super-resolution), with the official
arguments and names, and :class:`LAATransformer`, face super-resolution with region selection
attention (a reconstruction)."""
from .alformer import ALformer
from .drsformer import DRSformer
from .dsgformer import DSGformer
from .laa_transformer import LAATransformer
from .panet import PAEDSR, PANet
from .restormer import Restormer

__all__ = ["DRSformer", "Restormer", "DSGformer", "ALformer", "PANet", "PAEDSR", "LAATransformer"]
