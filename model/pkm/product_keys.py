"""Product-key search: exact top-k over n_keys**2 full keys from two top-k searches over n_keys sub-keys.

Speed (CPU profile, dim 512, n_keys 512, heads 4, knn 32, 1024 tokens): autograd through
bmm -> topk -> outer sum -> topk -> gather scatters the gradient into dense [heads, 2, N, n_keys] and
[heads, N, knn**2] zero tensors and runs two more dense bmm in the backward. Here the backward is
written directly: each selected score is q1·k1[a] + q2·k2[b], so the query gradient is a weighted sum
of knn sub-key rows (one EmbeddingBag) and the key gradient a weighted sum of query rows per sub-key
(sort by sub-key, one EmbeddingBag with offsets). The outer sum only scores the pairs (a, b) of the
two sorted half lists with (a + 1) * (b + 1) <= knn (119 instead of 1024 for knn = 32): any other
pair is beaten by at least knn pairs that are better in both halves.
"""

from __future__ import annotations

from functools import cache

import torch
import torch.nn.functional as F

from model.pkm import cpu_kernels


def product_key_topk(query: torch.Tensor, keys: torch.Tensor, knn: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-`knn` product keys for each query head.

    query: [N, heads, k_dim]; keys: [heads, 2, n_keys, k_dim // 2].
    Returns (scores [N, heads, knn], indices [N, heads, knn]), best first, with indices in
    [0, n_keys**2): slot = i1 * n_keys + i2 scores q1·k1[i1] + q2·k2[i2]. Taking the top-knn per half
    first is exact: any full key in the overall top-knn has both halves within their half's top-knn.
    `scores` is differentiable w.r.t. query and keys.
    """
    return _ProductKeyTopK.apply(query, keys, knn)


def sort_ids(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`ids.sort()` of a 1-D integer tensor. On CPU it runs single-threaded: torch's multi-threaded
    1-D sort takes ~20x the CPU time of the single-threaded one here (131k ids: 48 ms vs 2.8 ms at
    2 threads, worse still on a busy machine)."""
    if ids.device.type != "cpu" or torch.get_num_threads() == 1:
        return ids.sort()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return ids.sort()
    finally:
        torch.set_num_threads(threads)


@cache
def _candidate_pairs(knn: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Ranks (a, b) in the two sorted half lists that can reach the overall top-knn: (a+1)(b+1) <= knn."""
    a = torch.arange(knn).repeat_interleave(knn)
    b = torch.arange(knn).repeat(knn)
    keep = (a + 1) * (b + 1) <= knn
    return a[keep], b[keep]


def _search(query: torch.Tensor, keys: torch.Tensor, knn: int):
    """-> scores [heads, N, knn], sub-key ids per half [heads, 2, N, knn]."""
    n, heads, k_dim = query.shape
    half, n_keys = k_dim // 2, keys.shape[2]
    # [heads*2, N, half] @ [heads*2, half, n_keys] -> [heads*2, N, n_keys]: one batched GEMM (a third
    # faster with the query halves made contiguous first).
    q = query.reshape(n, heads * 2, half).transpose(0, 1).contiguous()
    k = keys.reshape(heads * 2, n_keys, half).transpose(1, 2)
    all_scores = torch.bmm(q, k)
    ra, rb = (t.to(query.device) for t in _candidate_pairs(knn))
    if cpu_kernels.available(all_scores):  # the same steps as below, in one pass (3x faster on CPU)
        return cpu_kernels.product_topk(all_scores.view(heads, 2, n, n_keys), knn, ra, rb)
    sub_scores, sub_ids = all_scores.topk(knn, dim=-1)  # sorted, best first
    sub_scores = sub_scores.view(heads, 2, n, knn)
    sub_ids = sub_ids.view(heads, 2, n, knn)
    pair_scores = sub_scores[:, 0].index_select(-1, ra) + sub_scores[:, 1].index_select(-1, rb)
    scores, best = pair_scores.topk(knn, dim=-1)  # [heads, N, knn]
    ids = torch.stack([sub_ids[:, 0].gather(-1, ra[best]), sub_ids[:, 1].gather(-1, rb[best])], dim=1)
    return scores, ids


class _ProductKeyTopK(torch.autograd.Function):
    @staticmethod
    def forward(ctx, query, keys, knn):
        with torch.no_grad():
            scores, ids = _search(query, keys, knn)
        n_keys = keys.shape[2]
        indices = ids[:, 0] * n_keys + ids[:, 1]
        ctx.save_for_backward(query, keys, ids)
        ctx.mark_non_differentiable(indices)
        return scores.transpose(0, 1), indices.transpose(0, 1)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_scores, _grad_indices):
        query, keys, ids = ctx.saved_tensors
        n, heads, k_dim = query.shape
        half, n_keys, knn = k_dim // 2, keys.shape[2], ids.shape[-1]
        h2 = heads * 2
        # Row of the flattened sub-key table [heads*2*n_keys, half] each selected score read, laid out as
        # bags [N, heads, 2, knn]: bag (n, h, p) is the half p of query head h of token n.
        rows = ids + (torch.arange(h2, device=ids.device) * n_keys).view(heads, 2, 1, 1)
        rows = rows.permute(2, 0, 1, 3).reshape(n * h2, knn)
        weights = grad_scores.unsqueeze(2).expand(n, heads, 2, knn).reshape(n * h2, knn)
        grad_query = grad_keys = None
        if ctx.needs_input_grad[0]:
            table = keys.reshape(h2 * n_keys, half)
            grad_query = F.embedding_bag(rows, table, per_sample_weights=weights, mode="sum").view(n, heads, k_dim)
        if ctx.needs_input_grad[1]:
            # Group the (bag, sub-key) reads by sub-key; each sub-key's gradient is a weighted bag of the
            # query halves that read it (sub-keys nobody read get an empty bag: zero).
            flat = rows.reshape(-1)
            flat_sorted, order = sort_ids(flat)
            counts = torch.bincount(flat_sorted, minlength=h2 * n_keys)
            offsets = counts.cumsum(0) - counts
            q_rows = query.reshape(n * h2, half)
            grad_keys = F.embedding_bag(
                order // knn, q_rows, offsets, per_sample_weights=weights.reshape(-1)[order], mode="sum"
            ).view(keys.shape)
        return grad_query, grad_keys, None


def brute_force_topk(query: torch.Tensor, keys: torch.Tensor, knn: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference: score all n_keys**2 concatenated keys explicitly (tests only; O(n_keys**2) memory)."""
    n, heads, k_dim = query.shape
    n_keys = keys.shape[2]
    full = torch.cat(
        [keys[:, 0].unsqueeze(2).expand(-1, -1, n_keys, -1), keys[:, 1].unsqueeze(1).expand(-1, n_keys, -1, -1)], dim=-1
    ).reshape(heads, n_keys * n_keys, k_dim)
    scores = torch.einsum("nhd,hsd->nhs", query, full)
    return scores.topk(knn, dim=-1)
