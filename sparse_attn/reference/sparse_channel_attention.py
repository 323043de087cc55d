"""Pure-PyTorch reference of the top-k channel attention (DESIGN.md §1): the ground truth.

Written for clarity, not speed; autograd differentiates it. (The official DRSformer formula,
which leaves ties to ``torch.topk``, is a baseline of the tests and benchmarks:
``benchmarks/official.py``.)
"""
import torch
import torch.nn.functional as F

NORM_EPS = 1e-12  # F.normalize's default


def stable_descending_ranks(scores):
    """rank[..., i, j] = position of scores[..., i, j] in a stable descending sort of its row:
    ties go to the lower column index."""
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    positions = torch.arange(scores.shape[-1], device=scores.device).expand_as(order)
    return torch.empty_like(order).scatter_(-1, order, positions)


def sparse_channel_attention(q, k, v, temperature, weights, topk, activation):
    """out = (Σ_r weights[r] · φ_r(S)) v with S = τ q̂k̂ᵀ, branch r keeping the topk[r] largest
    entries of each row. ``activation`` holds one of "softmax"/"relu2" per branch."""
    qn = F.normalize(q, dim=-1, eps=NORM_EPS)
    kn = F.normalize(k, dim=-1, eps=NORM_EPS)
    scores = (qn @ kn.transpose(-2, -1)) * temperature.reshape(-1, 1, 1)
    ranks = stable_descending_ranks(scores.detach())
    p = torch.zeros_like(scores)
    for r, (kept_count, act) in enumerate(zip(topk, activation)):
        kept = ranks < kept_count
        if act == "softmax":
            phi = scores.masked_fill(~kept, float("-inf")).softmax(dim=-1)
        else:
            phi = torch.relu(scores).square() * kept
        p = p + weights[r] * phi
    return p @ v
