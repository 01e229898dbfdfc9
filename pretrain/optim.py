"""Optimisers: dense weights on the usual schedule (inside the DeepSpeed engine), PKM value tables on
a constant-lr lazy Adam beside it, stepping only the rows that were read (XLM's `mem_sparse`).

Why beside the engine: the engine (and ZeRO) flattens parameters and their gradients into dense
buffers; a value table's gradient touches ~N*heads*knn of n_keys**2 rows, so inside the engine every
step would materialise and update the whole table. benchmarks/pkm_layer.py measures both.
"""
from __future__ import annotations

import math

import torch

from model.pkm import cpu_kernels
from model.pkm.value_table import MemoryParallel, ValueTable, reduce_sparse_grad
from pretrain.config import TrainConfig


def dense_param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: no weight decay on biases, norms and other 1-D parameters."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.dim() < 2 or name.endswith(".bias") else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_lambda(cfg: TrainConfig):
    """Multiplier of cfg.lr at a step: linear warmup, then cosine/linear decay to min_lr, or constant."""
    floor = cfg.min_lr / cfg.lr if cfg.lr > 0 else 0.0

    def f(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.lr_decay == "constant":
            return 1.0
        span = max(1, cfg.train_steps - cfg.warmup_steps)
        t = min(1.0, (step - cfg.warmup_steps) / span)
        shape = 0.5 * (1 + math.cos(math.pi * t)) if cfg.lr_decay == "cosine" else 1 - t
        return floor + (1 - floor) * shape

    return f


class LazyRowAdam(torch.optim.Optimizer):
    """Lazy Adam for row-sparse gradients: torch.optim.SparseAdam's update (the moments of rows
    without a gradient stay as they were; one step count per table) and its state (`step`,
    `exp_avg`, `exp_avg_sq`), at a third of its time on CPU (benchmarks/pkm_layer.py).

    The update is bound by moving rows: SparseAdam builds five fresh [rows, dim] temporaries and
    sparse tensors per step and makes ~15 passes over them. On CPU (fp32/fp64) one numba kernel
    (model/pkm/cpu_kernels.py) reads each gradient row once and updates the weight and moment rows
    in place (rows are unique: no races). Elsewhere (GPU, bf16) the same update with torch ops:
    gather the moment rows into scratch rows the optimizer keeps, update them in place, scatter them
    back.
    Expects coalesced gradients (SparseValueOptimizer.step coalesces)."""

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, use_kernel: bool = True):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps))
        self._scratch: dict[torch.Tensor, torch.Tensor] = {}
        self.use_kernel = use_kernel

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad if p.grad.is_coalesced() else p.grad.coalesce()
                rows, vals = g._indices()[0], g._values()
                st = self.state[p]
                if not st:
                    st.update(step=0, exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
                st["step"] += 1
                t = st["step"]
                if rows.numel() == 0:
                    continue
                step_size = group["lr"] * math.sqrt(1 - b2 ** t) / (1 - b1 ** t)
                m, v = st["exp_avg"], st["exp_avg_sq"]
                vals = vals.contiguous()
                if self.use_kernel and cpu_kernels.available(p, m, v, vals):
                    cpu_kernels.lazy_adam_rows(p, m, v, rows, vals, b1, b2, group["eps"], step_size)
                else:
                    self._torch_step(p, m, v, rows, vals, b1, b2, group["eps"], step_size)
        return None

    def _torch_step(self, p, m_all, v_all, rows, vals, b1, b2, eps, step_size) -> None:
        n = rows.numel()
        buf = self._scratch.get(p)
        if buf is None or buf.shape[0] < 2 * n:  # grow with headroom: the rows read vary per step
            buf = self._scratch[p] = p.new_empty(2 * int(n * 1.25), p.shape[1])
        m = torch.index_select(m_all, 0, rows, out=buf[:n])
        v = torch.index_select(v_all, 0, rows, out=buf[n:2 * n])
        m.lerp_(vals, 1 - b1)
        v.mul_(b2).addcmul_(vals, vals, value=1 - b2)
        m_all.index_copy_(0, rows, m)
        v_all.index_copy_(0, rows, v)
        p.index_add_(0, rows, m.div_(v.sqrt_().add_(eps)), alpha=-step_size)


class SparseValueOptimizer:
    """Lazy Adam over the PKM value tables (LazyRowAdam): only rows with a gradient move, the
    moments of all other rows stay as they were. Reduces each table's sparse gradient over the
    replicas of its shard first."""

    def __init__(self, tables: list[ValueTable], lr: float, betas=(0.9, 0.98), eps: float = 1e-8,
                 memory: MemoryParallel = MemoryParallel()):
        self.tables, self.memory = tables, memory
        self.weights = [t.weight for t in tables]
        self.optimizer = LazyRowAdam(self.weights, lr=lr, betas=betas, eps=eps) if tables else None

    @torch.no_grad()
    def step(self) -> list[torch.Tensor]:
        """Apply one update; returns, per table, the (local) row ids that were updated."""
        updated = []
        m = self.memory
        for w in self.weights:
            g = w.grad
            if g is None:
                updated.append(torch.empty(0, dtype=torch.long))
                continue
            if m.replica_size > 1:
                g = reduce_sparse_grad(g, m.replica_group, m.replica_size)
            else:
                g = g.coalesce()
            if m.grad_scale != 1.0:
                g._values().mul_(m.grad_scale)  # in place: `g * s` copies indices and values, ~10x the time
            w.grad = g
            updated.append(g.indices()[0])
        if self.optimizer is not None:
            self.optimizer.step()
        self.zero_grad()
        return updated

    def zero_grad(self) -> None:
        for w in self.weights:
            w.grad = None

    def state_dict(self) -> dict:
        return self.optimizer.state_dict() if self.optimizer else {}

    def load_state_dict(self, state: dict) -> None:
        if self.optimizer and state:
            self.optimizer.load_state_dict(state)
