"""Pure-PyTorch reference of block-sparse region attention (DESIGN.md §4).

The image is cut into p_h × p_w regions (row-major, R of them); every query region attends to the
pixels of the t key regions that ``key_blocks`` names for it. Written for clarity: the selected
key and value regions are gathered into one sequence per query region, and dense attention runs
on it. It holds the t·p_h·p_w scores of every query pixel at once; the kernels do not.
"""
import torch


def to_regions(x, region_h, region_w):
    """(B, heads, d, H, W) -> (B, heads, R, P, d): the P = region_h·region_w pixels of every
    region (regions and their pixels in row-major order), channels last."""
    batch, heads, d, height, width = x.shape
    x = x.reshape(batch, heads, d, height // region_h, region_h, width // region_w, region_w)
    x = x.permute(0, 1, 3, 5, 4, 6, 2)  # B, heads, rows, cols, region_h, region_w, d
    return x.reshape(batch, heads, -1, region_h * region_w, d)


def from_regions(x, height, width, region_h, region_w):
    """The inverse of :func:`to_regions`: (B, heads, R, P, d) -> (B, heads, d, H, W)."""
    batch, heads, _, _, d = x.shape
    x = x.reshape(batch, heads, height // region_h, width // region_w, region_h, region_w, d)
    x = x.permute(0, 1, 6, 2, 4, 3, 5)  # B, heads, d, rows, region_h, cols, region_w
    return x.reshape(batch, heads, d, height, width)


def gather_regions(x_regions, key_blocks):
    """(B, heads, R, P, d) and indices (B, heads, R, t) -> (B, heads, R, t·P, d): for every query
    region, the pixels of its t key regions in the order of its row of ``key_blocks``."""
    batch, heads, _, pixels, d = x_regions.shape
    rows = key_blocks.shape[2]
    index = key_blocks.reshape(batch, heads, -1, 1, 1).expand(-1, -1, -1, pixels, d)
    picked = torch.gather(x_regions, 2, index)  # B, heads, R·t, P, d
    return picked.reshape(batch, heads, rows, -1, d)


def block_sparse_attention(q, k, v, key_blocks, region_h, region_w, scale):
    """out[b, h, :, i] = Σ_j softmax_j(scale·⟨q_i, k_j⟩) v_j over the pixels j of the regions
    ``key_blocks[b, h, r, :]``, for every pixel i of query region r.

    q, k, v: (B, heads, d, H, W), H and W multiples of region_h and region_w; key_blocks:
    (B, heads, R, t) int64, distinct within a row; scale: a float. Returns (B, heads, d, H, W).
    """
    height, width = q.shape[-2:]
    q_regions = to_regions(q, region_h, region_w)                                   # B, h, R, P, d
    k_selected = gather_regions(to_regions(k, region_h, region_w), key_blocks)      # B, h, R, tP, d
    v_selected = gather_regions(to_regions(v, region_h, region_w), key_blocks)
    scores = scale * q_regions @ k_selected.transpose(-1, -2)                        # B, h, R, P, tP
    out = torch.softmax(scores, dim=-1) @ v_selected                                 # B, h, R, P, d
    return from_regions(out, height, width, region_h, region_w)
