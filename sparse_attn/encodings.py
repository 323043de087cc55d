"""Numbers that cross languages: the one Python source of each, read by the ops and the Triton
launchers. The C++ kernels keep their own copies (C++ cannot import these); the C++ op
``sparse_attn::encoding`` reports them and tests/test_library.py fails if the two disagree.
"""

# sparse_channel_attention's activation codes: the `activation` argument of its kernels.
ACTIVATION_CODES = {"softmax": 0, "relu2": 1}
ACTIVATION_NAMES = {code: name for name, code in ACTIVATION_CODES.items()}

# mixed_scale_dwconv's backward writes every weight and bias gradient of a (batch, tile) into one
# row of a partial-sum table: each entry's start as a multiple of the channels C = 2h plus a
# multiple of h, in this order, and "total" the row length.
MSFN_GRAD_LAYOUT = {
    "w3": (0, 0), "w5": (9, 0), "w3_1": (34, 0), "w5_1": (34, 18),
    "b3": (34, 68), "b5": (35, 68), "b3_1": (36, 68), "b5_1": (36, 69), "total": (36, 70),
}


def msfn_grad_offsets(hidden):
    """{name: start} of the gradient table's row for h = ``hidden`` (C = 2h), plus "total"."""
    return {name: per_c * 2 * hidden + per_h * hidden for name, (per_c, per_h) in MSFN_GRAD_LAYOUT.items()}

# gated_dwconv's activation codes: the `activation` argument of its kernels.
GATE_ACTIVATION_CODES = {"gelu": 0, "prelu": 1, "relu2": 2, "identity": 3}
GATE_ACTIVATION_NAMES = {code: name for name, code in GATE_ACTIVATION_CODES.items()}

# gated_dwconv's backward writes the weight, bias and (prelu) slope gradients of a (batch, tile)
# into one row of a partial-sum table: each entry's start as a multiple of h (2h channels, one
# slope partial per group), and "total" the row length.
GATED_GRAD_LAYOUT = {"weight": 0, "bias": 18, "slope": 20, "total": 21}


def gated_grad_offsets(hidden):
    """{name: start} of the gradient table's row for h = ``hidden``, plus "total"."""
    return {name: per_h * hidden for name, per_h in GATED_GRAD_LAYOUT.items()}


def cuda_grid(op_name):
    """(tile height, tile width, grid bound) of an op's CUDA kernels, read from the extension
    (their one source: ``<op_name>_cuda_grid`` in csrc/encodings.cpp); None without the extension."""
    import torch

    try:
        return tuple(torch.ops.sparse_attn.encoding(f"{op_name}_cuda_grid", 0))
    except (AttributeError, RuntimeError):
        return None
