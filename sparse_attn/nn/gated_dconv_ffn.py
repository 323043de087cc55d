"""Restormer's gated-Dconv feed-forward network with the official parameter names."""
from torch import nn

from ..backends import requested
from ..ops import gated_dwconv
from .bands import inference_band_rows, map_rows
from .input_checks import autocast_parameters, check_feature_map
from .pointwise import PointwiseConv2d
from .recompute import saved_as_recipe


def gate_and_project(hidden, weight, bias, activation, gate_weight, backend, project_out):
    """``project_out(gated_dwconv(hidden, ...))``, saving less for backward: the gate's backward
    keeps ``hidden`` (2h channels), and project_out would keep the gate's output (h more) for its
    weight's gradient; backward makes that output again from ``hidden`` instead (one gate
    forward, a few % of the FFN's time)."""
    backend = requested(backend)  # "auto" under use_backend: the recipe must run where the forward ran
    gated = gated_dwconv(hidden, weight, bias, activation, gate_weight, backend=backend)
    if backend == "reference":  # the reference backend keeps what the official code keeps
        return project_out(gated)
    kept = [None if t is None else t.detach() for t in (hidden, weight, bias, gate_weight)]
    with saved_as_recipe(gated, lambda: gated_dwconv(*kept[:3], activation, kept[3], backend=backend)):
        return project_out(gated)


class GatedDconvFFN(nn.Module):
    """Restormer's GDFN (the official ``FeedForward`` of restormer_arch.py).

    project_in (1x1, dim -> 2h) -> depthwise 3x3 -> split into x1, x2 -> gelu(x1) * x2 ->
    project_out (1x1, h -> dim), with h = int(dim * ffn_expansion_factor). The 1x1 projections
    are plain convolutions; the depthwise convolution and the gate are the fused
    :func:`sparse_attn.gated_dwconv` on ``backend`` ("auto" follows ``use_backend``).
    """

    def __init__(self, dim, ffn_expansion_factor, bias, backend="auto"):
        super().__init__()
        hidden = int(dim * ffn_expansion_factor)
        self.dim, self.hidden_features, self.backend = dim, hidden, backend
        self.project_in = PointwiseConv2d(dim, hidden * 2, bias=bias, backend=backend)
        self.dwconv = nn.Conv2d(hidden * 2, hidden * 2, kernel_size=3, stride=1, padding=1,
                                groups=hidden * 2, bias=bias)
        self.project_out = PointwiseConv2d(hidden, dim, bias=bias, backend=backend)

    activation = "gelu"  # the gate of gated_dwconv

    def gate_weight(self):
        """The gate's learnable parameter (a PReLU slope), or None."""
        return None

    def forward(self, x):
        """(B, dim, H, W) -> (B, dim, H, W). Without gradients, on large maps, it runs in row bands
        with a one-row halo for the depthwise convolution (see
        :func:`sparse_attn.nn.bands.banded_inference`), so the 2h hidden channels never exist
        for the whole map; the arithmetic per pixel is the same."""
        check_feature_map(self, x, self.dim)
        if x.shape[0] == 0:  # the op takes no empty tensor; an empty batch has h channels here
            return self.project_out(self.project_in(x)[:, :self.hidden_features])
        halo = self.dwconv.kernel_size[0] // 2
        rows = inference_band_rows(x, self.backend, halo)
        if rows is None:
            return self._rows(x, 0, x.shape[-2])
        return map_rows(x, self._rows, halo, rows)

    def _rows(self, x, first, last):
        """Rows [first, last) of the output, computed from the rows of ``x`` (which hold every row
        the depthwise convolution reads for them; the slice's edges are taken as the map's)."""
        hidden = self.project_in(x)
        weight, bias, gate_weight = autocast_parameters(hidden, self.dwconv.weight, self.dwconv.bias, self.gate_weight())
        project_out = self.project_out
        if (first, last) != (0, x.shape[-2]):
            project_out = lambda gated: self.project_out(gated[..., first:last, :])  # noqa: E731
        return gate_and_project(hidden, weight, bias, self.activation, gate_weight, self.backend, project_out)
