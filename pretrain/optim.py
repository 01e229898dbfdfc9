"""Optimisers: dense weights on the usual schedule (inside the DeepSpeed engine), PKM value tables on
a constant-lr lazy Adam beside it, stepping only the rows that were read (XLM's `mem_sparse`).

Why beside the engine: the engine (and ZeRO) flattens parameters and their gradients into dense
buffers; a value table's gradient touches ~N*heads*knn of n_keys**2 rows, so inside the engine every
step would materialise and update the whole table. benchmarks/pkm_layer.py measures both.
"""
from __future__ import annotations

import math

import torch

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


class SparseValueOptimizer:
    """Lazy Adam over the PKM value tables (torch.optim.SparseAdam): only rows with a gradient move,
    the moments of all other rows stay as they were."""

    def __init__(self, tables: list[ValueTable], lr: float, betas=(0.9, 0.98), eps: float = 1e-8,
                 memory: MemoryParallel = MemoryParallel()):
        self.tables, self.memory = tables, memory
        self.weights = [t.weight for t in tables]
        self.optimizer = torch.optim.SparseAdam(self.weights, lr=lr, betas=betas, eps=eps) if tables else None

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
            w.grad = g * m.grad_scale if m.grad_scale != 1.0 else g
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
