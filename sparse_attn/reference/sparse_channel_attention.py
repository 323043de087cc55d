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


def scores_from_gram(gram, q_square_norms, k_square_norms, temperature):
    """S = τ q̂k̂ᵀ from sums over the pixels: the raw Gram matrix ``gram = q kᵀ`` (B, heads, d, d)
    and the squared channel norms ``Σ q²``, ``Σ k²`` (B, heads, d). Normalising the d×d matrix
    afterwards is F.normalize's arithmetic (norms clamped at 1e-12) applied once per entry, so
    the sums may come from any partition of the pixels (row bands, tiles of a kernel)."""
    q_norms = q_square_norms.sqrt().clamp_min(NORM_EPS)
    k_norms = k_square_norms.sqrt().clamp_min(NORM_EPS)
    return gram / (q_norms.unsqueeze(-1) * k_norms.unsqueeze(-2)) * temperature.reshape(-1, 1, 1)


def attention_matrix(scores, weights, topk, activation):
    """P = Σ_r weights[r] · φ_r(S) (B, heads, d, d): branch r keeps the topk[r] largest entries
    of each row of ``scores`` (ties: the lower column), φ_r its "softmax" or "relu2" over them."""
    ranks = stable_descending_ranks(scores.detach())
    p = torch.zeros_like(scores)
    for r, (kept_count, act) in enumerate(zip(topk, activation)):
        kept = ranks < kept_count
        if act == "softmax":
            phi = scores.masked_fill(~kept, float("-inf")).softmax(dim=-1)
        else:
            phi = torch.relu(scores).square() * kept
        p = p + weights[r] * phi
    return p


def sparse_channel_attention(q, k, v, temperature, weights, topk, activation):
    """out = (Σ_r weights[r] · φ_r(S)) v with S = τ q̂k̂ᵀ, branch r keeping the topk[r] largest
    entries of each row. ``activation`` holds one of "softmax"/"relu2" per branch."""
    qn = F.normalize(q, dim=-1, eps=NORM_EPS)
    kn = F.normalize(k, dim=-1, eps=NORM_EPS)
    scores = (qn @ kn.transpose(-2, -1)) * temperature.reshape(-1, 1, 1)
    return attention_matrix(scores, weights, topk, activation) @ v

