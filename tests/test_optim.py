"""The value tables' lazy Adam (pretrain.optim.LazyRowAdam) against torch.optim.SparseAdam."""

import copy

import pytest
import torch
import torch.nn.functional as F

from model.pkm import cpu_kernels
from pretrain.optim import LazyRowAdam

PATHS = [pytest.param(True, id="numba-kernel"), pytest.param(False, id="torch-ops")]


def _steps(make_opt, w, n_steps=4):
    opt = make_opt([w])
    gen = torch.Generator().manual_seed(1)
    for _ in range(n_steps):
        ids = torch.randint(0, 40, (12, 5), generator=gen)  # repeats within and across bags
        F.embedding_bag(ids, w, mode="sum", sparse=True).pow(2).sum().backward()
        w.grad = w.grad.coalesce()
        opt.step()
        w.grad = None
    return opt


def _lazy(use_kernel):
    return lambda params: LazyRowAdam(params, lr=1e-2, betas=(0.9, 0.98), use_kernel=use_kernel)


@pytest.mark.parametrize("use_kernel", PATHS)
def test_lazy_row_adam_matches_sparse_adam(use_kernel):
    """Same update as SparseAdam (tolerance 1e-6 absolute on the table, 1e-6 relative on the moments:
    the float ops are ordered differently); rows never read keep their values and zero moments."""
    torch.manual_seed(0)
    init = torch.randn(100, 16)  # ids < 40: rows 40.. are never read
    a, b = init.clone().requires_grad_(), init.clone().requires_grad_()
    oa = _steps(lambda ps: torch.optim.SparseAdam(ps, lr=1e-2, betas=(0.9, 0.98)), a)
    ob = _steps(_lazy(use_kernel), b)
    assert cpu_kernels.available(b) == use_kernel or not use_kernel
    torch.testing.assert_close(b, a, rtol=0, atol=1e-6)
    for k in ("exp_avg", "exp_avg_sq"):
        torch.testing.assert_close(ob.state[b][k], oa.state[a][k], rtol=1e-6, atol=1e-6)
    assert ob.state[b]["step"] == oa.state[a]["step"] == 4
    assert torch.equal(b[40:], init[40:]) and not ob.state[b]["exp_avg"][40:].any()


@pytest.mark.parametrize("use_kernel", PATHS)
def test_lazy_row_adam_state_dict_round_trip(use_kernel):
    """A copy loaded from state_dict continues bit for bit like the original."""
    torch.manual_seed(0)
    a = torch.randn(60, 8).requires_grad_()
    oa = _steps(_lazy(use_kernel), a, n_steps=2)
    b = a.detach().clone().requires_grad_()
    ob = _lazy(use_kernel)([b])
    ob.load_state_dict(copy.deepcopy(oa.state_dict()))  # torch shares same-dtype tensors
    for w, o in ((a, oa), (b, ob)):
        F.embedding_bag(torch.tensor([[1, 2, 3], [3, 50, 7]]), w, mode="sum", sparse=True).sum().backward()
        o.step()
    assert torch.equal(a, b) and ob.state[b]["step"] == 3


def _rowwise_steps(make_opt, w, n_steps=4):
    """Sparse steps of `w` on a fixed stream of bags; returns the float64 reference inputs too."""
    opt = make_opt([{"params": [w], "dim": w.shape[1], "column_start": 0}])
    gen = torch.Generator().manual_seed(1)
    grads = []
    for _ in range(n_steps):
        ids = torch.randint(0, 40, (12, 5), generator=gen)
        F.embedding_bag(ids, w, mode="sum", sparse=True).float().pow(2).sum().backward()
        grads.append(w.grad.coalesce().to_dense().double())
        w.grad = w.grad.coalesce()
        opt.step()
        w.grad = None
    return opt, grads


def _reference(init: torch.Tensor, grads, kind: str, lr=1e-2, b1=0.9, b2=0.98, eps=1e-8):
    """The row-wise updates written out row by row in float64, from the same gradient stream (the
    gradients were recorded from the optimised table itself, so they are the ones it saw)."""
    w = init.double().clone()
    state = torch.zeros(w.shape[0], dtype=torch.float64)
    m = torch.zeros_like(w)
    for t, g in enumerate(grads, 1):
        for r in range(w.shape[0]):
            if not g[r].any():
                continue  # rows not read: no update, state unchanged
            mean_sq = (g[r] ** 2).mean()
            if kind == "rowwise_adagrad":
                state[r] += mean_sq
                w[r] -= lr * g[r] / (state[r].sqrt() + eps)
            else:
                m[r] = b1 * m[r] + (1 - b1) * g[r]
                state[r] = b2 * state[r] + (1 - b2) * mean_sq
                w[r] -= lr * (m[r] / (1 - b1**t)) / ((state[r] / (1 - b2**t)).sqrt() + eps)
    return w, state, m


@pytest.mark.parametrize("kind", ["rowwise_adagrad", "rowwise_adam"])
def test_rowwise_optimizers_match_their_definition(kind):
    """RowwiseAdagrad / RowwiseAdam against their docstring formulas (fbgemm's EXACT_ROWWISE_ADAGRAD and
    PARTIAL_ROWWISE_ADAM) in float64: table within 1e-6 absolute, row state within 1e-5 relative (fp32
    arithmetic); one fp32 scalar per row; rows never read keep their values and a zero state."""
    from pretrain.optim import RowwiseAdagrad, RowwiseAdam

    torch.manual_seed(0)
    init = torch.randn(100, 16)
    w = init.clone().requires_grad_()
    make = (
        (lambda g: RowwiseAdagrad(g, lr=1e-2))
        if kind == "rowwise_adagrad"
        else (lambda g: RowwiseAdam(g, lr=1e-2, betas=(0.9, 0.98)))
    )
    opt, grads = _rowwise_steps(make, w)
    ref_w, ref_state, ref_m = _reference(init, grads, kind)
    torch.testing.assert_close(w.detach().double(), ref_w, rtol=0, atol=1e-6)
    st = opt.state[w]
    row_state = st["sum"] if kind == "rowwise_adagrad" else st["exp_avg_sq"]
    assert row_state.shape == (100,) and row_state.dtype == torch.float32
    torch.testing.assert_close(row_state.double(), ref_state, rtol=1e-5, atol=1e-9)
    if kind == "rowwise_adam":
        torch.testing.assert_close(st["exp_avg"].double(), ref_m, rtol=1e-5, atol=1e-7)
    assert st["step"] == 4 and torch.equal(w.detach()[40:], init[40:]) and not row_state[40:].any()


def test_stochastic_round_bf16_is_unbiased_and_layout_free():
    """Each result is one of the two bf16 neighbours of x; over 4,000 salts the mean is x within 2% of a
    bf16 step (round-to-nearest is off by up to half a step); the same (element, salt) rounds the same."""
    from pretrain.optim import stochastic_round_bf16

    x = torch.tensor([1.0 + 2**-9, -0.3, 0.0625 + 1e-5, 1e-3])  # between bf16 neighbours
    element = torch.tensor([5, 6, 7, 1 << 33])
    runs = torch.stack([stochastic_round_bf16(x, element, salt).float() for salt in range(4000)])
    step = (
        torch.nextafter(x.to(torch.bfloat16), torch.full_like(x, float("inf")).to(torch.bfloat16)).float()
        - x.to(torch.bfloat16).float()
    ).abs()
    assert ((runs - x).abs() <= step * 1.001).all()
    assert ((runs.mean(0) - x).abs() <= 0.02 * step).all(), (runs.mean(0) - x) / step
    assert not torch.equal(runs[:, 0], runs[:, 0].roll(1))  # both neighbours occur
    assert torch.equal(stochastic_round_bf16(x, element, 3), stochastic_round_bf16(x, element, 3))


def test_bf16_table_trains_with_rowwise_adagrad():
    """A bf16 table with SparseValueOptimizer(rowwise_adagrad): stays bf16, its read rows move by the
    fp32 update (rounded), a step of 1e-4 of the rows' size still moves them on average (round to
    nearest would leave them as they were), and the only optimizer state is one fp32 per row."""
    from model.pkm.value_table import ValueTable
    from pretrain.optim import SparseValueOptimizer

    table = ValueTable(256, 32, init_seed=3, dtype=torch.bfloat16)
    init = table.weight.detach().clone()
    opt = SparseValueOptimizer([table], lr=1e-4, kind="rowwise_adagrad")
    ids = torch.arange(64).view(16, 4)
    moved = torch.zeros(64, 32)
    for _ in range(20):
        out = table(ids, torch.ones(16, 4))
        assert out.dtype == torch.float32
        out.sum().backward()
        assert table.weight.grad.dtype == torch.bfloat16
        opt.step()
    assert table.weight.dtype == torch.bfloat16 and table.weight.is_leaf
    moved = table.weight.detach()[:64].float() - init[:64].float()
    # every gradient is +1: Adagrad moves each value by -lr * sum_t 1/sqrt(t) ~ -7.0e-4 over 20 steps
    expected = -1e-4 * sum(t**-0.5 for t in range(1, 21))
    assert abs(moved.mean().item() - expected) < 0.1 * abs(expected), (moved.mean().item(), expected)
    assert torch.equal(table.weight.detach()[64:], init[64:])
    assert opt.state_bytes() == 256 * 4
