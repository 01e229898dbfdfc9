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
