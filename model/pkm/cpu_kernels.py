"""numba kernels for the CPU hot spots of a PKM layer and its optimizer.

torch runs these steps as chains of generic ops, each a full pass over memory; on CPU the chain,
not the arithmetic, is the cost (benchmarks/pkm_layer.py). Each kernel here is one parallel pass.
Every caller keeps a torch path (GPU, bf16, or numba missing) and tests check both give the same
result. Compiled on first use and cached on disk (numba `cache=True`): ~1 s once per machine.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch

try:
    import numba
    import numpy as np
except ImportError:  # pragma: no cover - numba is a dependency; callers fall back to torch ops
    numba = None


def available(*tensors: torch.Tensor) -> bool:
    """Whether the kernels can run on these tensors: numba present, CPU, contiguous, all fp32 or all
    fp64 (a kernel computes in its inputs' one dtype)."""
    return (
        numba is not None
        and len({t.dtype for t in tensors}) == 1
        and tensors[0].dtype in (torch.float32, torch.float64)
        and all(t.device.type == "cpu" and t.is_contiguous() for t in tensors)
    )


@contextmanager
def _torch_threads():
    """Run a kernel on torch's intra-op thread count, and leave that count as it was: numba's OpenMP
    layer shares libgomp with torch and resets its count when it starts its pool (1 became 2 after
    one call: oversubscribed ranks). numba's own pool (workqueue) would not, but its threads and
    torch's spin-waiting OpenMP threads then compete for the cores (the layer ran 1.1x slower)."""
    threads = torch.get_num_threads()
    numba.set_num_threads(max(1, min(threads, numba.config.NUMBA_NUM_THREADS)))
    try:
        yield
    finally:
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)


if numba is not None:

    @numba.njit(inline="always")
    def _insert(vals, ids, k, v, i):  # pragma: no cover - compiled
        """Insert (v, i) into the descending list vals[:k] (dropping its last entry)."""
        p = k - 1
        while p > 0 and vals[p - 1] < v:
            vals[p] = vals[p - 1]
            ids[p] = ids[p - 1]
            p -= 1
        vals[p] = v
        ids[p] = i

    @numba.njit(inline="always")
    def _row_topk(row, k, vals, ids):  # pragma: no cover - compiled
        """Top-k of one row, best first; ties keep the lower index first."""
        for j in range(k):
            vals[j] = -np.inf
            ids[j] = -1
        for j in range(row.shape[0]):
            if row[j] > vals[k - 1]:
                _insert(vals, ids, k, row[j], j)

    @numba.njit(parallel=True, cache=True)
    def _product_topk(sub_scores, knn, ra, rb, out_scores, out_ids):  # pragma: no cover - compiled
        heads, _, n, _ = sub_scores.shape
        for job in numba.prange(heads * n):
            h, t = job // n, job % n
            v0 = np.empty(knn, sub_scores.dtype)
            v1 = np.empty(knn, sub_scores.dtype)
            i0 = np.empty(knn, np.int64)
            i1 = np.empty(knn, np.int64)
            _row_topk(sub_scores[h, 0, t], knn, v0, i0)
            _row_topk(sub_scores[h, 1, t], knn, v1, i1)
            best = out_scores[h, t]
            pick = np.empty(knn, np.int64)
            for j in range(knn):
                best[j] = -np.inf
                pick[j] = -1
            for c in range(ra.shape[0]):
                v = v0[ra[c]] + v1[rb[c]]
                if v > best[knn - 1]:
                    _insert(best, pick, knn, v, c)
            for j in range(knn):
                out_ids[h, 0, t, j] = i0[ra[pick[j]]]
                out_ids[h, 1, t, j] = i1[rb[pick[j]]]

    @numba.njit(parallel=True, cache=True, fastmath={"reassoc", "contract"})
    def _weighted_bag_backward(grad, table, weights, order, starts, slots, k, grad_weights, rows):  # pragma: no cover
        d = grad.shape[1]
        zero = np.zeros(1, grad.dtype)[0]  # accumulate in the tables' dtype (a 0 literal would be float64)
        for s in numba.prange(slots.shape[0]):
            t = table[slots[s]]
            acc = rows[s]
            for j in range(d):
                acc[j] = 0
            for r in range(starts[s], starts[s + 1]):
                read = order[r]
                g = grad[read // k]  # the output-gradient rows ([N, dim]) stay in cache
                dot = zero
                for j in range(d):
                    dot += g[j] * t[j]
                grad_weights[read] = dot
                w = weights[read]
                for j in range(d):
                    acc[j] += w * g[j]

    @numba.njit(parallel=True, cache=True)
    def _lazy_adam_rows(p, m, v, rows, g, b1, b2, eps, step_size):  # pragma: no cover - compiled
        for i in numba.prange(rows.shape[0]):
            r = rows[i]
            for j in range(p.shape[1]):
                gj = g[i, j]
                mj = m[r, j] + (1 - b1) * (gj - m[r, j])  # SparseAdam's form of b1*m + (1-b1)*g
                vj = v[r, j] + (1 - b2) * (gj * gj - v[r, j])
                m[r, j] = mj
                v[r, j] = vj
                p[r, j] -= step_size * mj / (math.sqrt(vj) + eps)


def product_topk(sub_scores: torch.Tensor, knn: int, ra: torch.Tensor, rb: torch.Tensor):
    """sub_scores [heads, 2, N, n_keys] -> (scores [heads, N, knn], sub-key ids [heads, 2, N, knn]):
    top-knn per half, then the top-knn of the candidate pairs (ra[c], rb[c]) of the two sorted lists.
    The same result as product_keys._search's torch ops, in one pass."""
    heads, _, n, _ = sub_scores.shape
    scores = sub_scores.new_empty(heads, n, knn)
    ids = torch.empty(heads, 2, n, knn, dtype=torch.long, device=sub_scores.device)
    with _torch_threads():
        _product_topk(sub_scores.numpy(), knn, ra.numpy(), rb.numpy(), scores.numpy(), ids.numpy())
    return scores, ids


def weighted_bag_backward(
    grad: torch.Tensor, table: torch.Tensor, weights: torch.Tensor, flat: torch.Tensor, order: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward of out[n] = sum_k weights[n, k] * table[indices[n, k]], given the reads sorted by slot
    (`flat`, `order` = indices.reshape(-1).sort()). One pass over the distinct slots: each table row
    is read once (in address order) for the per-read weight gradients, and its gradient row (a
    weighted sum of output-gradient rows) written once. Returns (grad weights [N, k], slots, rows)."""
    n, k = weights.shape
    slots, counts = torch.unique_consecutive(flat, return_counts=True)
    starts = torch.zeros(slots.numel() + 1, dtype=torch.long, device=slots.device)
    torch.cumsum(counts, 0, out=starts[1:])
    grad_weights = weights.new_empty(n * k)
    rows = table.new_empty(slots.numel(), table.shape[1])
    with _torch_threads():
        _weighted_bag_backward(
            grad.numpy(),
            table.detach().numpy(),
            weights.reshape(-1).numpy(),
            order.numpy(),
            starts.numpy(),
            slots.numpy(),
            k,
            grad_weights.numpy(),
            rows.numpy(),
        )
    return grad_weights.view(n, k), slots, rows


def lazy_adam_rows(p, m, v, rows, g, b1: float, b2: float, eps: float, step_size: float) -> None:
    """SparseAdam's update of the (unique) `rows` of p, m, v from their gradient rows g, in place."""
    with _torch_threads():
        _lazy_adam_rows(p.detach().numpy(), m.numpy(), v.numpy(), rows.numpy(), g.numpy(), b1, b2, eps, step_size)
