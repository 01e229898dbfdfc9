"""The PKM layer on its own: exact product-key search, gradients, padding, XLM semantics."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from model.config import PKMConfig
from model.pkm import cpu_kernels
from model.pkm.memory import MaskedBatchNorm, ProductKeyMemory
from model.pkm.product_keys import _candidate_pairs, brute_force_topk, product_key_topk
from model.pkm.value_table import ValueTable, weighted_bag


def _layer(dim=16, dtype=torch.float64, seed=0, **pkm) -> ProductKeyMemory:
    """A tiny PKM layer in `dtype` whose value table is still a leaf tensor requiring grad."""
    torch.manual_seed(seed)
    cfg = PKMConfig(**{"n_keys": 8, "heads": 2, "knn": 3, "k_dim": 8, **pkm})
    layer = ProductKeyMemory(dim, cfg, init_seed=seed).to(dtype)
    assert layer.values.weight.is_leaf  # see test_value_table_stays_leaf_after_to
    return layer


@pytest.fixture
def one_thread():
    """Finite-difference tests run hundreds of forwards on tiny tensors: intra-op threads only add
    barrier waits there (tens of ms per op on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(params=["numba", "torch"])
def cpu_path(request, monkeypatch):
    """Run on the numba kernels (the CPU default) and on the torch ops (the GPU / bf16 path)."""
    if request.param == "torch":
        monkeypatch.setattr(cpu_kernels, "available", lambda *tensors: False)
    else:
        assert cpu_kernels.numba is not None, "numba is a dependency (pyproject.toml)"
    return request.param


# ---------------------------------------------------------------------------------------------
# Product-key top-k


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("n_keys,heads,knn,k_dim,n", [(16, 1, 4, 8, 50), (64, 4, 16, 32, 40), (128, 2, 32, 16, 30)])
def test_product_key_topk_equals_brute_force(dtype, n_keys, heads, knn, k_dim, n, cpu_path):
    """Same indices (in the same order) and scores within 1e-6 as scoring all n_keys**2 full keys."""
    gen = torch.Generator().manual_seed(n_keys * 31 + knn)
    query = torch.randn(n, heads, k_dim, generator=gen, dtype=dtype)
    keys = torch.randn(heads, 2, n_keys, k_dim // 2, generator=gen, dtype=dtype)
    scores, indices = product_key_topk(query, keys, knn)
    ref_scores, ref_indices = brute_force_topk(query, keys, knn)
    assert scores.shape == indices.shape == (n, heads, knn)
    assert torch.equal(indices, ref_indices)
    torch.testing.assert_close(scores, ref_scores, rtol=0, atol=1e-6 if dtype == torch.float64 else 1e-5)
    assert (scores[..., :-1] >= scores[..., 1:]).all(), "scores come sorted, best first"


def test_product_key_topk_exact_with_large_knn():
    """knn close to n_keys (the product candidates then cover most of the table)."""
    gen = torch.Generator().manual_seed(3)
    query = torch.randn(20, 2, 8, generator=gen, dtype=torch.float64)
    keys = torch.randn(2, 2, 10, 4, generator=gen, dtype=torch.float64)
    scores, indices = product_key_topk(query, keys, 10)
    ref_scores, ref_indices = brute_force_topk(query, keys, 10)
    assert torch.equal(indices, ref_indices)
    torch.testing.assert_close(scores, ref_scores, rtol=0, atol=1e-6)


def test_product_key_topk_gradient_matches_brute_force():
    gen = torch.Generator().manual_seed(4)
    q = torch.randn(12, 2, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 2, 16, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(12, 2, 5, generator=gen, dtype=torch.float64)
    (product_key_topk(q, k, 5)[0] * w).sum().backward()
    gq, gk = q.grad.clone(), k.grad.clone()
    q.grad = k.grad = None
    (brute_force_topk(q, k, 5)[0] * w).sum().backward()
    torch.testing.assert_close(gq, q.grad, rtol=0, atol=1e-12)
    torch.testing.assert_close(gk, k.grad, rtol=0, atol=1e-12)


def test_product_key_topk_with_ties_returns_best_scores_and_consistent_indices():
    """Repeated sub-keys make tied scores: the indices may differ from brute force, but the scores are
    the best ones, and each returned index scores exactly its returned score."""
    gen = torch.Generator().manual_seed(5)
    keys = torch.randn(2, 2, 6, 4, generator=gen, dtype=torch.float64).repeat(1, 1, 3, 1)  # 18 keys, 3 copies
    query = torch.randn(9, 2, 8, generator=gen, dtype=torch.float64)
    scores, indices = product_key_topk(query, keys, 7)
    ref_scores, _ = brute_force_topk(query, keys, 7)
    torch.testing.assert_close(scores, ref_scores, rtol=0, atol=1e-12)
    i1, i2 = indices // 18, indices % 18
    h = torch.arange(2).view(1, 2, 1)
    again = (query[:, :, None, :4] * keys[h, 0, i1]).sum(-1) + (query[:, :, None, 4:] * keys[h, 1, i2]).sum(-1)
    torch.testing.assert_close(again, scores, rtol=0, atol=1e-12)
    assert (indices.sort(-1).values.diff(dim=-1) > 0).all()


def test_cpu_kernels_leave_torch_thread_count_alone():
    """A kernel call must not change torch's intra-op threads (numba's OpenMP layer did: 1 -> 2)."""
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            product_key_topk(torch.randn(64, 2, 16), torch.randn(2, 2, 32, 8), 8)
            assert torch.get_num_threads() == n
    finally:
        torch.set_num_threads(threads)


def test_candidate_pairs_are_those_that_can_reach_the_top():
    a, b = _candidate_pairs(32)
    assert len(a) == 119 and ((a + 1) * (b + 1) <= 32).all()
    assert len(_candidate_pairs(1)[0]) == 1


def test_product_key_topk_gradcheck(one_thread, cpu_path):
    gen = torch.Generator().manual_seed(6)
    q = torch.randn(6, 2, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 2, 5, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda q, k: product_key_topk(q, k, 4)[0], (q, k), eps=1e-6, atol=1e-7)


# ---------------------------------------------------------------------------------------------
# Gradients


@pytest.mark.parametrize("batchnorm", [True, False])
def test_gradcheck_float64(batchnorm, one_thread, cpu_path):
    """Finite differences vs autograd w.r.t. the input, the query network and the keys (float64).
    The value table is checked separately below: its gradient takes the sparse path."""
    layer = _layer(dim=6, n_keys=4, heads=2, knn=3, k_dim=4, query_batchnorm=batchnorm)
    x = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    names = ["query_proj.weight", "query_proj.bias", "keys"]
    params = dict(layer.named_parameters())

    def f(x, w, b, keys):
        return torch.func.functional_call(layer, {"query_proj.weight": w, "query_proj.bias": b, "keys": keys}, (x,))

    inputs = (x,) + tuple(params[n].detach().clone().requires_grad_(True) for n in names)
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-6, rtol=1e-4)


def test_value_gradient_matches_finite_differences(one_thread):
    """The sparse gradient of the value table equals central differences on table entries (float64)."""
    layer = _layer(dim=6, n_keys=4, heads=2, knn=3, k_dim=4)
    x = torch.randn(5, 6, dtype=torch.float64)
    g = torch.randn(5, 6, dtype=torch.float64)
    (layer(x) * g).sum().backward()
    grad = layer.values.weight.grad
    assert grad.is_sparse
    dense = grad.to_dense()
    touched = torch.unique(layer.lookup(x)[0])
    untouched = [s for s in range(16) if s not in set(touched.tolist())]
    rows = touched[:3].tolist() + untouched[:1]
    eps = 1e-6
    with torch.no_grad():
        for r in rows:
            for c in range(6):
                w = layer.values.weight
                w[r, c] += eps
                up = (layer(x) * g).sum()
                w[r, c] -= 2 * eps
                down = (layer(x) * g).sum()
                w[r, c] += eps
                assert abs((up - down).item() / (2 * eps) - dense[r, c].item()) < 1e-7, (r, c)
    assert untouched and dense[untouched].abs().max() == 0


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-6)])
def test_sparse_value_gradient_equals_dense_embedding_bag(dtype, tol):
    """The ValueTable's sparse COO gradient equals the dense gradient of an nn.EmbeddingBag holding the
    same table: same rows (exactly the slots read), same values within `tol`."""
    torch.manual_seed(0)
    table = ValueTable(300, 24, dtype=dtype)
    bag = nn.EmbeddingBag(300, 24, mode="sum", sparse=False, dtype=dtype)
    with torch.no_grad():
        bag.weight.copy_(table.weight)
    idx = torch.randint(0, 300, (40, 12))
    idx[:, 1] = idx[:, 0]  # repeated slots inside a bag and across bags must accumulate
    w = torch.rand(40, 12, dtype=dtype)
    g = torch.randn(40, 24, dtype=dtype)
    out = table(idx, w)
    ref = bag(idx, per_sample_weights=w)
    torch.testing.assert_close(out, ref, rtol=0, atol=tol)
    (out * g).sum().backward()
    (ref * g).sum().backward()
    sparse = table.weight.grad.coalesce()
    assert sparse.is_sparse
    assert torch.equal(sparse.indices()[0], torch.unique(idx))
    torch.testing.assert_close(sparse.to_dense(), bag.weight.grad, rtol=0, atol=tol)


def test_layer_value_gradient_equals_dense_embedding_bag():
    """Through the whole layer (float32): sparse value gradient == dense EmbeddingBag gradient, 1e-6."""
    layer = _layer(dim=32, dtype=torch.float32, n_keys=16, heads=4, knn=4, k_dim=16)
    x = torch.randn(64, 32)
    g = torch.randn(64, 32)
    (layer(x) * g).sum().backward()
    indices, weights = layer.lookup(x)
    bag = nn.EmbeddingBag(256, 32, mode="sum")
    with torch.no_grad():
        bag.weight.copy_(layer.values.weight)
    (bag(indices, per_sample_weights=weights.detach()) * g).sum().backward()
    sparse = layer.values.weight.grad.coalesce()
    assert torch.equal(sparse.indices()[0], torch.unique(indices))
    torch.testing.assert_close(sparse.to_dense(), bag.weight.grad, rtol=0, atol=1e-6)


def test_weighted_bag_matches_native_sparse_embedding_bag(cpu_path):
    """weighted_bag == F.embedding_bag(sparse=True): output, per-sample-weight gradient, and the table
    gradient; a SparseAdam step from either gradient moves the table alike."""
    torch.manual_seed(1)
    table = torch.randn(500, 16)
    idx = torch.randint(0, 500, (64, 24))
    idx[:, :3] = 7  # a slot read several times by every token
    w = torch.rand(64, 24)
    g = torch.randn(64, 16)
    results = []
    for fn in (weighted_bag, lambda i, w, t: F.embedding_bag(i, t, per_sample_weights=w, mode="sum", sparse=True)):
        t = table.clone().requires_grad_(True)
        ww = w.clone().requires_grad_(True)
        out = fn(idx, ww, t)
        (out * g).sum().backward()
        results.append((out.detach(), ww.grad, t.grad, t))
    (out_a, gw_a, gt_a, t_a), (out_b, gw_b, gt_b, t_b) = results
    torch.testing.assert_close(out_a, out_b, rtol=0, atol=1e-6)
    torch.testing.assert_close(gw_a, gw_b, rtol=0, atol=1e-5)
    assert gt_a.is_sparse
    assert torch.equal(gt_a._indices(), gt_b.coalesce().indices()), "one row per slot read, in slot order"
    # slot 7 sums 192 reads: fp32 summation order differs, hence a relative tolerance
    torch.testing.assert_close(gt_a.to_dense(), gt_b.to_dense(), rtol=1e-5, atol=1e-5)
    for t in (t_a, t_b):
        torch.optim.SparseAdam([t], lr=0.1).step()
    torch.testing.assert_close(t_a, t_b, rtol=0, atol=1e-5)


def test_layer_value_gradient_arrives_coalesced_and_accumulates():
    """One backward: the table's gradient is flagged coalesced (the optimizer's coalesce is free). Two
    backward passes (gradient accumulation): the sum is correct and not wrongly flagged."""
    layer = _layer(dim=16, dtype=torch.float32, n_keys=8, heads=2, knn=3, k_dim=8)
    xs = [torch.randn(10, 16) for _ in range(2)]
    grads = []
    for x in xs:
        layer(x).pow(2).sum().backward()
        grads.append(layer.values.weight.grad)
        layer.values.weight.grad = None
    assert all(g.is_coalesced() for g in grads)
    for x in xs:
        layer(x).pow(2).sum().backward()
    total = layer.values.weight.grad
    torch.testing.assert_close(total.to_dense(), grads[0].to_dense() + grads[1].to_dense(), rtol=0, atol=1e-6)
    if total.is_coalesced():
        rows = total._indices()[0]
        assert (rows[1:] > rows[:-1]).all()


def test_value_table_stays_leaf_after_to():
    """Module.to()/.double()/.cuda() rebuild buffers through autograd; the table must stay a leaf that
    requires grad (else its gradient is silently lost)."""
    layer = ProductKeyMemory(8, PKMConfig(n_keys=4, heads=2, knn=3, k_dim=4)).double()
    assert layer.values.weight.is_leaf and layer.values.weight.requires_grad
    assert layer.values.weight.dtype == torch.float64
    layer(torch.randn(5, 8, dtype=torch.float64)).sum().backward()
    assert layer.values.weight.grad is not None and layer.values.weight.grad.is_sparse
    assert layer.values.weight.grad.is_coalesced(), "the coalesced-flag hook follows the new tensor"


# ---------------------------------------------------------------------------------------------
# Padding


def test_padding_leaves_batchnorm_stats_outputs_and_usage_untouched():
    """Padded positions neither enter the BatchNorm statistics nor change the outputs of real tokens,
    and the usage record marks them as not kept."""
    layer = _layer(dim=16, dtype=torch.float32, n_keys=8, heads=2, knn=3, k_dim=8)
    layer.record_lookups = True
    ref = _layer(dim=16, dtype=torch.float32, n_keys=8, heads=2, knn=3, k_dim=8)
    real = torch.randn(3, 5, 16)
    pad = torch.zeros(3, 7, dtype=torch.bool)
    pad[:, 5:] = True
    pad[1, 4] = True  # padding in the middle is allowed too
    outs = []
    states = []
    for junk_scale in (1.0, 100.0):
        layer.load_state_dict(ref.state_dict())
        x = torch.cat([real, junk_scale * torch.randn(3, 2, 16)], dim=1)
        x[1, 4] = junk_scale * torch.randn(16)
        outs.append(layer(x, pad))
        states.append({k: v.clone() for k, v in layer.query_batchnorm.state_dict().items()})
        assert torch.equal(layer.last_lookup.keep, ~pad.reshape(-1))
    keep = ~pad
    torch.testing.assert_close(outs[0][keep], outs[1][keep], rtol=0, atol=1e-6)
    for name in ("running_mean", "running_var"):
        torch.testing.assert_close(states[0][name], states[1][name], rtol=0, atol=1e-6)
    # ... and equal the statistics of a forward over the real tokens alone (no mask).
    ref(x[keep])
    for name in ("running_mean", "running_var"):
        torch.testing.assert_close(states[0][name], getattr(ref.query_batchnorm, name), rtol=0, atol=1e-6)


def test_masked_batchnorm_matches_batchnorm1d_without_padding():
    torch.manual_seed(0)
    ours, theirs = MaskedBatchNorm(10), nn.BatchNorm1d(10)
    x = torch.randn(33, 10) * 3 + 1
    torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=1e-5)
    torch.testing.assert_close(ours.running_mean, theirs.running_mean, rtol=0, atol=1e-6)
    torch.testing.assert_close(ours.running_var, theirs.running_var, rtol=0, atol=1e-5)
    ours.eval(), theirs.eval()
    torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=1e-5)
    # The masked path (used whenever a padding mask is given) agrees with the fused one.
    masked = MaskedBatchNorm(10)
    all_real = torch.ones(33, dtype=torch.bool)
    fresh = nn.BatchNorm1d(10)
    torch.testing.assert_close(masked(x, all_real), fresh(x), rtol=0, atol=1e-5)
    torch.testing.assert_close(masked.running_mean, fresh.running_mean, rtol=0, atol=1e-6)
    torch.testing.assert_close(masked.running_var, fresh.running_var, rtol=0, atol=1e-5)
    # In eval mode too, padded rows come out zero.
    masked.eval()
    keep = all_real.clone()
    keep[3] = False
    y = masked(x, keep)
    assert (y[3] == 0).all() and (y[keep] != 0).any()


# ---------------------------------------------------------------------------------------------
# XLM semantics


def test_xlm_shapes_and_initialisation():
    dim, cfg = 64, PKMConfig(n_keys=64, heads=4, knn=8, k_dim=32)
    torch.manual_seed(0)
    layer = ProductKeyMemory(dim, cfg)
    half = cfg.k_dim // 2
    assert layer.keys.shape == (cfg.heads, 2, cfg.n_keys, half)
    bound = 1 / math.sqrt(half)
    assert layer.keys.abs().max() <= bound and layer.keys.abs().max() > 0.99 * bound  # U(-b, b)
    assert abs(layer.keys.mean().item()) < 0.02 * bound
    assert layer.query_proj.in_features == dim and layer.query_proj.out_features == cfg.heads * cfg.k_dim
    assert layer.query_proj.bias is not None
    w = layer.values.weight
    assert w.shape == (cfg.n_keys**2, dim) and w.requires_grad and w.is_leaf
    assert not any(p is w for p in layer.parameters()), "the table is a buffer: the DP engine must not see it"
    # 262,144 N(0, dim^-0.5) draws: the sample std is within 1% of dim^-0.5 (its own sd is ~0.14%).
    assert abs(w.std().item() / dim**-0.5 - 1) < 0.01
    assert abs(w.mean().item()) < 0.01 * dim**-0.5


def test_value_init_is_seeded_and_depends_on_seed():
    cfg = PKMConfig(n_keys=8, heads=2, knn=2, k_dim=8)
    a, b, c = (ProductKeyMemory(16, cfg, init_seed=s).values.weight for s in (5, 5, 6))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_softmax_weights_sum_to_one_per_head_and_slots_are_distinct():
    cfg = PKMConfig(n_keys=16, heads=4, knn=8, k_dim=16)
    torch.manual_seed(0)
    layer = ProductKeyMemory(32, cfg)
    x = torch.randn(50, 32)
    indices, weights = layer.lookup(x)
    assert indices.shape == weights.shape == (50, cfg.heads * cfg.knn)
    per_head_w = weights.view(50, cfg.heads, cfg.knn)
    torch.testing.assert_close(per_head_w.sum(-1), torch.ones(50, cfg.heads), rtol=0, atol=1e-6)
    assert (per_head_w > 0).all()
    per_head_i = indices.view(50, cfg.heads, cfg.knn)
    assert per_head_i.min() >= 0 and per_head_i.max() < cfg.n_keys**2
    assert (per_head_i.sort(-1).values.diff(dim=-1) > 0).all(), "knn distinct slots per head"
    # The output is sum over heads and knn of weight * value row (one shared table for all heads).
    out = layer(x)
    ref = (weights.unsqueeze(-1) * layer.values.weight[indices]).sum(1)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)


def test_weights_are_softmax_of_product_key_scores():
    layer = _layer(dim=16, n_keys=8, heads=2, knn=4, k_dim=8, query_batchnorm=False)
    x = torch.randn(7, 16, dtype=torch.float64)
    indices, weights = layer.lookup(x)
    q = layer.query_proj(x).view(7, 2, 8)
    scores, ref_idx = brute_force_topk(q, layer.keys, 4)
    assert torch.equal(indices, ref_idx.reshape(7, -1))
    torch.testing.assert_close(weights, F.softmax(scores, -1).reshape(7, -1), rtol=0, atol=1e-12)


def test_eval_mode_uses_running_stats_and_is_deterministic():
    layer = _layer(dim=16, dtype=torch.float32)
    x = torch.randn(20, 16)
    layer(x)
    layer.eval()
    a, b = layer(x[:3]), layer(x)[:3]
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)  # no batch statistics in eval


# --- dropouts and the query LayerNorm (issue #16: no test covered them) ------------------------
DROPOUTS = ["input_dropout", "query_dropout", "value_dropout"]


@pytest.mark.parametrize("which", DROPOUTS)
def test_dropout_is_active_in_train_mode_and_gradients_flow(which):
    layer = _layer(dtype=torch.float32, **{which: 0.5}).train()
    x = torch.randn(32, 16, requires_grad=True)
    torch.manual_seed(1)
    a = layer(x)
    torch.manual_seed(2)
    b = layer(x)
    assert not torch.equal(a, b), f"{which}=0.5 changed nothing in train mode"
    b.sum().backward()
    for name, p in [
        ("input", x),
        ("query_proj", layer.query_proj.weight),
        ("keys", layer.keys),
        ("values", layer.values.weight),
    ]:
        assert p.grad is not None and p.grad.to_dense().abs().sum() > 0, f"no gradient reaches {name} with {which}"


def test_value_dropout_zeroes_or_rescales_the_output():
    """Value dropout acts on the memory's output only: each element is 0 or the undropped value / (1-p)."""
    p = 0.25
    plain, dropped = _layer(dtype=torch.float64), _layer(dtype=torch.float64, value_dropout=p)
    x = torch.randn(64, 16, dtype=torch.float64)
    ref, out = plain.train()(x), dropped.train()(x)
    zero = out == 0
    assert 0.1 < zero.double().mean().item() < 0.4, zero.double().mean().item()
    torch.testing.assert_close(out[~zero], ref[~zero] / (1 - p), rtol=1e-12, atol=1e-12)


def test_input_dropout_cuts_the_gradient_of_dropped_inputs():
    layer = _layer(dtype=torch.float64, input_dropout=0.5).train()
    x = torch.randn(64, 16, dtype=torch.float64, requires_grad=True)
    layer(x).pow(2).sum().backward()
    dropped = (x.grad == 0).double().mean().item()
    assert 0.35 < dropped < 0.65, f"{dropped:.2f} of the input gradients are zero with input_dropout=0.5"


def test_dropout_off_in_eval_mode_and_zero_dropout_is_no_dropout():
    x = torch.randn(32, 16)
    plain = _layer(dtype=torch.float32)
    dropped = _layer(dtype=torch.float32, input_dropout=0.3, query_dropout=0.3, value_dropout=0.3)
    zero = _layer(dtype=torch.float32, input_dropout=0.0, query_dropout=0.0, value_dropout=0.0)
    ref = plain.eval()(x)  # fresh running statistics, the same in all three
    torch.manual_seed(1)
    a = dropped.eval()(x)
    torch.manual_seed(2)
    b = dropped(x)
    assert torch.equal(a, b) and torch.equal(a, ref), "eval mode must not drop anything"
    # p = 0 in train mode: deterministic whatever the RNG state, and equal to the layer without dropout
    plain.train(), zero.train()
    torch.manual_seed(3)
    c = zero(x)
    torch.manual_seed(4)
    assert torch.equal(c, zero(x)) and torch.equal(c, plain(x))


def test_query_layernorm_normalises_each_head_and_trains():
    layer = _layer(dtype=torch.float64, query_layernorm=True, query_batchnorm=False)
    assert isinstance(layer.query_layernorm, nn.LayerNorm) and layer.query_layernorm.normalized_shape == (8,)
    x = torch.randn(16, 16, dtype=torch.float64)
    seen = {}
    layer.query_layernorm.register_forward_hook(lambda m, i, o: seen.update(q=i[0], out=o))
    layer(x).sum().backward()
    q = seen["q"]  # [tokens, heads, k_dim]: normalised over each head's k_dim (affine still 1, 0)
    assert q.shape == (16, 2, 8)
    want = (q - q.mean(-1, keepdim=True)) / torch.sqrt(q.var(-1, unbiased=False, keepdim=True) + 1e-5)
    torch.testing.assert_close(seen["out"], want, atol=1e-12, rtol=0)
    assert layer.query_layernorm.weight.grad.abs().sum() > 0 and layer.query_layernorm.bias.grad.abs().sum() > 0
