"""The value-table kernel (model/pkm/value_table.py `weighted_bag`) against fbgemm's table-batched
embedding bags, and on bf16 tables."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from model.pkm.value_table import weighted_bag


def _reads(slots=64, n=12, k=6, seed=0):
    """Slot ids with repeats within and across tokens, and softmax weights per token."""
    gen = torch.Generator().manual_seed(seed)
    indices = torch.randint(0, slots // 4, (n, k), generator=gen)  # few distinct slots: many repeats
    weights = torch.softmax(torch.randn(n, k, generator=gen), dim=-1)
    return indices, weights


def test_weighted_bag_matches_fbgemm_rowwise_adagrad():
    """Same ids, weights and table: fbgemm's SplitTableBatchedEmbeddingBagsCodegen (HOST, CPU, fused
    EXACT_ROWWISE_ADAGRAD) and our kernel give the same output and per-read weight gradients, and one
    fbgemm update equals row-wise Adagrad applied to our coalesced table gradient. fp32 sums in another
    order: tolerance 1e-6 (values ~1), 1e-5 for the weight gradients (dot products of dim terms)."""
    try:
        from fbgemm_gpu.split_table_batched_embeddings_ops_common import EmbeddingLocation, PoolingMode
        from fbgemm_gpu.split_table_batched_embeddings_ops_training import (
            ComputeDevice,
            OptimType,
            SplitTableBatchedEmbeddingBagsCodegen,
        )
    except ImportError as e:
        pytest.skip(f"fbgemm-gpu-cpu not installed (`pip install fbgemm-gpu-cpu==1.8.0`, the test extra): {e}")
    slots, dim, lr, eps = 64, 16, 0.05, 1e-8
    indices, weights = _reads(slots)
    n, k = indices.shape
    table0 = torch.randn(slots, dim, generator=torch.Generator().manual_seed(1))
    grad_out = torch.randn(n, dim, generator=torch.Generator().manual_seed(2))

    fb = SplitTableBatchedEmbeddingBagsCodegen(
        [(slots, dim, EmbeddingLocation.HOST, ComputeDevice.CPU)],
        optimizer=OptimType.EXACT_ROWWISE_ADAGRAD,
        learning_rate=lr,
        eps=eps,
        pooling_mode=PoolingMode.SUM,
    )
    with torch.no_grad():
        fb.weights_host.copy_(table0.reshape(-1))
    w_fb = weights.clone().requires_grad_(True)
    out_fb = fb(indices.reshape(-1), torch.arange(0, n * k + 1, k), per_sample_weights=w_fb.reshape(-1))
    out_fb.backward(grad_out)  # fbgemm updates its table here

    table = table0.clone().requires_grad_(True)
    w = weights.clone().requires_grad_(True)
    out = weighted_bag(indices, w, table)
    out.backward(grad_out)
    grad = table.grad.coalesce()
    rows, g = grad.indices()[0], grad.values()
    statistic = torch.zeros(slots).index_add_(0, rows, g.pow(2).mean(1))
    updated = table0.clone().index_add_(0, rows, g / (statistic[rows].sqrt() + eps).unsqueeze(1), alpha=-lr)

    torch.testing.assert_close(out_fb, out, rtol=0, atol=1e-6)
    torch.testing.assert_close(w_fb.grad, w.grad, rtol=0, atol=1e-5)
    torch.testing.assert_close(fb.momentum1_host, statistic, rtol=0, atol=1e-6)
    torch.testing.assert_close(fb.weights_host.view(slots, dim), updated, rtol=0, atol=1e-6)
    assert set(rows.tolist()) == set(indices.reshape(-1).tolist())  # exactly the rows read moved


def test_weighted_bag_reads_bf16_tables():
    """A bf16 table (model.pkm.value_dtype=bf16) read with bf16 weights: the output is the fp32 read's
    within bf16 rounding (inputs and result rounded: 2e-2 relative), the table gradient is a
    coalesced sparse bf16 tensor on the same rows, the weight gradient matches within bf16 rounding."""
    slots, dim = 64, 16
    indices, weights = _reads(slots)
    table32 = torch.randn(slots, dim, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
    table16 = table32.detach().bfloat16().requires_grad_(True)
    w32, w16 = weights.clone().requires_grad_(True), weights.bfloat16().requires_grad_(True)
    grad_out = torch.randn(indices.shape[0], dim, generator=torch.Generator().manual_seed(2))
    out32, out16 = weighted_bag(indices, w32, table32), weighted_bag(indices, w16, table16)
    assert out16.dtype == torch.bfloat16
    out32.backward(grad_out)
    out16.backward(grad_out.bfloat16())
    torch.testing.assert_close(out16.float(), out32.detach(), rtol=2e-2, atol=2e-2)
    g16, g32 = table16.grad.coalesce(), table32.grad.coalesce()
    assert g16.dtype == torch.bfloat16 and g16.is_sparse
    assert torch.equal(g16.indices(), g32.indices())
    torch.testing.assert_close(g16.values().float(), g32.values(), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(w16.grad.float(), w32.grad, rtol=2e-2, atol=5e-2)
    ref = F.embedding_bag(indices, table32.detach(), per_sample_weights=weights, mode="sum")
    torch.testing.assert_close(out32.detach(), ref, rtol=0, atol=1e-6)
