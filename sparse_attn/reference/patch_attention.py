"""Pure-PyTorch reference of patch attention, PANet's pyramid attention core (DESIGN.md §3).

Written for clarity: the 3×3 patches are unfolded, the keys normalised, and the scores of a chunk
of queries against every key are materialised (never all N×M at once); autograd differentiates it.
"""
import torch
import torch.nn.functional as F

# Scores held at once: a chunk of queries × every key, at most this many entries per image.
SCORES_PER_CHUNK = 1 << 22


def unfold_patches(x):
    """The 3×3 patches (zero padding 1, stride 1) of x (B, C, H, W) centred on every pixel:
    (B, 9C, H·W), channel-major (c·9 + 3·dy + dx), pixels row-major."""
    return F.unfold(x, kernel_size=3, padding=1)


def keep_top(scores, topk):
    """Boolean mask of the ``topk`` largest scores of every row (last dim); among equal scores
    the lower column wins (a stable descending sort puts it first)."""
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :topk]
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, order, True)


def patch_attention(q, keys, values, scale=10.0, topk=None, key_eps=1e-4):
    """Softmax attention between 3×3 patches of ``q`` and of every level of ``keys``/``values``.

    q: (B, Cq, H, W); keys[l]: (B, Cq, H_l, W_l); values[l]: (B, Cv, H_l, W_l). Keys run over
    every position of every level (level order, then row-major). A key patch is divided by
    max(‖K_m‖, key_eps); the query is not normalised. ``topk``: None (all keys) or the number of
    largest scores each query keeps. Returns the fold of the attended value patches: (B, Cv, H, W).
    """
    batch, _, height, width = q.shape
    query_patches = unfold_patches(q).transpose(1, 2)                      # (B, N, 9Cq)
    key_patches = torch.cat([unfold_patches(k) for k in keys], dim=2)      # (B, 9Cq, M)
    key_patches = key_patches / key_patches.norm(dim=1, keepdim=True).clamp_min(key_eps)
    value_patches = torch.cat([unfold_patches(v) for v in values], dim=2).transpose(1, 2)  # (B, M, 9Cv)

    n_queries, n_keys = query_patches.shape[1], key_patches.shape[2]
    chunk = max(1, SCORES_PER_CHUNK // n_keys)
    attended = []
    for start in range(0, n_queries, chunk):
        scores = scale * (query_patches[:, start:start + chunk] @ key_patches)   # (B, n, M)
        if topk is not None:
            with torch.no_grad():
                kept = keep_top(scores, topk)
            scores = scores.masked_fill(~kept, float("-inf"))
        attended.append(torch.softmax(scores, dim=-1) @ value_patches)           # (B, n, 9Cv)
    patches_out = torch.cat(attended, dim=1).transpose(1, 2)                     # (B, 9Cv, N)
    return F.fold(patches_out, (height, width), kernel_size=3, padding=1)
