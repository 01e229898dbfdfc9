"""Product-key search: exact top-k over n_keys**2 full keys from two top-k searches over n_keys sub-keys."""
from __future__ import annotations

import torch


def product_key_topk(query: torch.Tensor, keys: torch.Tensor, knn: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-`knn` product keys for each query head.

    query: [N, heads, k_dim]; keys: [heads, 2, n_keys, k_dim // 2].
    Returns (scores [N, heads, knn], indices [N, heads, knn]) with indices in [0, n_keys**2):
    slot = i1 * n_keys + i2 scores q1·k1[i1] + q2·k2[i2]. Taking the top-knn per half first is exact:
    any full key in the overall top-knn has both halves within their half's top-knn.
    """
    n, heads, k_dim = query.shape
    half = k_dim // 2
    n_keys = keys.shape[2]
    # [heads*2, N, half] @ [heads*2, half, n_keys] -> [heads*2, N, n_keys]: one batched GEMM.
    q = query.reshape(n, heads * 2, half).transpose(0, 1)
    k = keys.reshape(heads * 2, n_keys, half).transpose(1, 2)
    sub_scores = torch.bmm(q, k).view(heads, 2, n, n_keys)
    s1, i1 = sub_scores[:, 0].topk(knn, dim=-1)  # [heads, N, knn]
    s2, i2 = sub_scores[:, 1].topk(knn, dim=-1)
    all_scores = (s1.unsqueeze(-1) + s2.unsqueeze(-2)).view(heads, n, knn * knn)
    all_indices = (i1.unsqueeze(-1) * n_keys + i2.unsqueeze(-2)).view(heads, n, knn * knn)
    scores, best = all_scores.topk(knn, dim=-1)
    indices = all_indices.gather(-1, best)
    return scores.transpose(0, 1), indices.transpose(0, 1)


def brute_force_topk(query: torch.Tensor, keys: torch.Tensor, knn: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference: score all n_keys**2 concatenated keys explicitly (tests only; O(n_keys**2) memory)."""
    n, heads, k_dim = query.shape
    n_keys = keys.shape[2]
    full = torch.cat(
        [keys[:, 0].unsqueeze(2).expand(-1, -1, n_keys, -1), keys[:, 1].unsqueeze(1).expand(-1, n_keys, -1, -1)],
        dim=-1,
    ).reshape(heads, n_keys * n_keys, k_dim)
    scores = torch.einsum("nhd,hsd->nhs", query, full)
    return scores.topk(knn, dim=-1)
