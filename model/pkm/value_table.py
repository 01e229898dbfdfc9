"""The PKM value table: n_slots x dim rows read with weighted EmbeddingBag sums, updated row-sparsely.

Layout. The table can be split by *columns* over a memory-parallel group made of a TP part (ranks that
see the same tokens) and a DP part (ranks that see different tokens); shard s = tp_rank * dp_size +
dp_rank holds columns [s * d/P, (s + 1) * d/P) of every row. A lookup:
  1. gathers the (indices, weights) of all tokens of the DP part          (all_to_all, tiny: N x K)
  2. sums the weighted rows of its own columns for all those tokens        (EmbeddingBag, N_dp x d/P)
  3. returns each DP peer the columns of its own tokens                    (all_to_all, N x d/P_tp)
  4. all-gathers the columns of the TP part (same tokens)                  (all_gather, N x d)
Why columns and not rows (an all-to-all of indices to row owners): with rows, each rank must send back
one partial sum of the full width d per token to every owner (P x N x d per rank, and hot slots load
one owner); with columns every rank does exactly 1/P of the work and moves N x d in total, and the
gradient of a row shard is still row-sparse. Meta's ColwiseEmbeddingBag makes the same choice but
only over one group; here the group may span TP and DP.

Gradients never materialise densely: the table is a buffer (not a Parameter: DeepSpeed must neither
broadcast, reduce nor optimise it) that requires grad and receives a sparse COO gradient from
`embedding_bag(sparse=True)`; `pretrain` steps it with a lazy (sparse) Adam.
"""
from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from model.errors import ModelError
from model.precision import TABLE_DTYPE, keep_at_least_fp32


@dataclass(frozen=True)
class MemoryParallel:
    """Process groups of the memory-parallel layout (all None / size 1 in a single process)."""

    tp_group: Optional[dist.ProcessGroup] = None
    tp_size: int = 1
    tp_rank: int = 0
    dp_group: Optional[dist.ProcessGroup] = None
    dp_size: int = 1
    dp_rank: int = 0
    # Ranks holding the same shard but reading different tokens (the DP ranks outside the memory
    # group): their sparse gradients are summed before the update.
    replica_group: Optional[dist.ProcessGroup] = None
    replica_size: int = 1
    # 1 / data-parallel world size: the DP engine averages dense gradients, values must match.
    grad_scale: float = 1.0
    # Position among the ranks holding this same shard (checkpoints: only replica (0, 0) writes).
    replica_id: tuple = (0, 0)

    @property
    def size(self) -> int:
        return self.tp_size * self.dp_size

    @property
    def shard(self) -> int:
        return self.tp_rank * self.dp_size + self.dp_rank


# ---------------------------------------------------------------------------------------------
# Differentiable collectives


def _split_sizes(counts: list[int]) -> list[int]:
    return [int(c) for c in counts]


class _GatherTokens(torch.autograd.Function):
    """Forward: every rank of `group` gets all ranks' rows (in rank order). Backward: sum the partial
    gradients each rank computed for my rows."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, counts: list[int], group) -> torch.Tensor:
        size = len(counts)
        ctx.counts, ctx.group, ctx.n = counts, group, x.shape[0]
        out = x.new_empty((sum(counts),) + x.shape[1:])
        dist.all_to_all_single(out, x.repeat((size,) + (1,) * (x.dim() - 1)),
                               output_split_sizes=_split_sizes(counts),
                               input_split_sizes=[x.shape[0]] * size, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        size = len(ctx.counts)
        out = grad.new_empty((size * ctx.n,) + grad.shape[1:])
        dist.all_to_all_single(out, grad.contiguous(), output_split_sizes=[ctx.n] * size,
                               input_split_sizes=_split_sizes(ctx.counts), group=ctx.group)
        return out.view((size, ctx.n) + grad.shape[1:]).sum(0), None, None


class _ReturnColumns(torch.autograd.Function):
    """Forward: [N_all, c] rows of all DP peers -> [N_mine, size * c] (my rows, every peer's columns)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, counts: list[int], rank: int, group) -> torch.Tensor:
        size = len(counts)
        n, c = counts[rank], x.shape[1]
        ctx.counts, ctx.group, ctx.n, ctx.c = counts, group, n, c
        out = x.new_empty((size * n, c))
        dist.all_to_all_single(out, x.contiguous(), output_split_sizes=[n] * size,
                               input_split_sizes=_split_sizes(counts), group=group)
        return out.view(size, n, c).transpose(0, 1).reshape(n, size * c)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        size = len(ctx.counts)
        send = grad.reshape(ctx.n, size, ctx.c).transpose(0, 1).contiguous().view(size * ctx.n, ctx.c)
        out = grad.new_empty((sum(ctx.counts), ctx.c))
        dist.all_to_all_single(out, send, output_split_sizes=_split_sizes(ctx.counts),
                               input_split_sizes=[ctx.n] * size, group=ctx.group)
        return out, None, None, None


class _GatherColumns(torch.autograd.Function):
    """Forward: all-gather along the last dim (same tokens on every rank). Backward: my slice."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, rank: int, size: int, group) -> torch.Tensor:
        ctx.rank, ctx.c = rank, x.shape[-1]
        parts = [torch.empty_like(x) for _ in range(size)]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=-1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad[..., ctx.rank * ctx.c:(ctx.rank + 1) * ctx.c].contiguous(), None, None, None


class _ReduceGrad(torch.autograd.Function):
    """Forward: identity (same values on every rank). Backward: all-reduce the partial gradients."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


# ---------------------------------------------------------------------------------------------
# Layout-independent blocks of the global table (initialisation, checkpoints)

# Part of the definition of the initial table: changing it changes every table a seed gives.
INIT_BLOCK_ROWS = 4096
# Checkpoint blocks hold at most this many bytes of full-width fp32 rows (a rank's shard of a block:
# this / memory-parallel size), and the same rows under every layout, so resharding reads each once.
CHECKPOINT_BLOCK_BYTES = 1 << 27
_MASK64 = (1 << 64) - 1
_shape_only = contextvars.ContextVar("pkm_value_tables_shape_only", default=False)


@contextlib.contextmanager
def shape_only_tables():
    """ValueTables built inside this block hold no storage (meta tensors, nothing drawn): for readers
    that need the rest of a model but stream its tables block by block from a checkpoint (export)."""
    token = _shape_only.set(True)
    try:
        yield
    finally:
        _shape_only.reset(token)


def _stream_seed(seed: int, block: int, column: int) -> int:
    """A well-mixed 63-bit seed for the (block of rows, column) stream of table `seed` (splitmix64)."""
    x = (seed * 0x9E3779B97F4A7C15 + block * 0xD1B54A32D192ED03 + column * 0xABC98388FB8FAC03 + 1) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (x ^ (x >> 31)) >> 1


def checkpoint_row_blocks(n_slots: int, dim: int) -> tuple[int, int]:
    """(rows per block, number of blocks) of a table in checkpoints: equal blocks of at most
    CHECKPOINT_BLOCK_BYTES of full-width fp32 rows (n_slots = n_keys**2, so n_keys rows always divide)."""
    count = max(1, -(-n_slots * dim * 4 // CHECKPOINT_BLOCK_BYTES))
    while n_slots % count:
        count += 1
    return n_slots // count, count


# ---------------------------------------------------------------------------------------------


class ValueTable(nn.Module):
    """`n_slots` value vectors of width `dim`, stored as this rank's column shard (see module doc)."""

    def __init__(self, n_slots: int, dim: int, parallel: MemoryParallel = MemoryParallel(),
                 init_seed: int = 0, dtype: torch.dtype = TABLE_DTYPE, device=None):
        super().__init__()
        if dim % parallel.size:
            raise ModelError(f"PKM value dim {dim} (model.hidden_size) is not divisible by the "
                             f"memory-parallel size {parallel.size}")
        self.n_slots, self.dim, self.parallel = n_slots, dim, parallel
        self.storage_dtype = dtype  # fp32 (TABLE_DTYPE), or bf16 by choice (model/precision.py)
        self.shard_dim = dim // parallel.size
        self.column_start = parallel.shard * self.shard_dim
        weight = torch.empty(n_slots, self.shard_dim, dtype=dtype, device="meta" if _shape_only.get() else device)
        self.reset_parameters(weight, init_seed)
        self.register_buffer("weight", weight.requires_grad_(True))

    @torch.no_grad()
    def reset_parameters(self, weight: torch.Tensor, seed: int) -> None:
        """N(0, dim^-0.5) like XLM. Every (block of INIT_BLOCK_ROWS rows, column) of the global table has
        its own seeded stream, so a rank draws only its own columns, yet every layout holds exactly the
        numbers of the single-process table. Memory and time are proportional to the shard."""
        if weight.is_meta:
            return
        gen = torch.Generator(device="cpu")
        std = self.dim ** -0.5
        buf = torch.empty(self.shard_dim, min(INIT_BLOCK_ROWS, self.n_slots), dtype=torch.float32)
        for block, start in enumerate(range(0, self.n_slots, INIT_BLOCK_ROWS)):
            cols = buf[:, :min(INIT_BLOCK_ROWS, self.n_slots - start)]
            for j in range(self.shard_dim):
                gen.manual_seed(_stream_seed(seed, block, self.column_start + j))
                cols[j].normal_(0.0, std, generator=gen)
            weight[start:start + cols.shape[1]].copy_(cols.t())

    def forward(self, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """indices, weights: [N, K] -> [N, dim] = sum_k weights[:, k] * table[indices[:, k]]."""
        p = self.parallel
        if weights.dtype != self.weight.dtype:  # a bf16 table (model.pkm.value_dtype) reads bf16 weights
            return self(indices, weights.to(self.weight.dtype)).to(weights.dtype)
        if p.size == 1:
            return F.embedding_bag(indices, self.weight, per_sample_weights=weights, mode="sum", sparse=True)
        if p.tp_size > 1:
            weights = _ReduceGrad.apply(weights, p.tp_group)
        counts = [indices.shape[0]]
        if p.dp_size > 1:
            counts = _all_counts(indices.shape[0], p.dp_size, p.dp_group, indices.device)
            indices = _GatherTokens.apply(indices, counts, p.dp_group)
            weights = _GatherTokens.apply(weights, counts, p.dp_group)
        out = F.embedding_bag(indices, self.weight, per_sample_weights=weights, mode="sum", sparse=True)
        if p.dp_size > 1:
            out = _ReturnColumns.apply(out, counts, p.dp_rank, p.dp_group)
        if p.tp_size > 1:
            out = _GatherColumns.apply(out, p.tp_rank, p.tp_size, p.tp_group)
        return out

    def _apply(self, fn, recurse=True):
        # Module.to()/.cuda()/.double() rebuild buffers through autograd, which would leave the table a
        # non-leaf (its gradient lost): keep it a leaf that requires grad. Casts to bf16/fp16 leave it
        # fp32 (model/precision.py); a table stored in bf16 by choice (model.pkm.value_dtype) stays bf16.
        weight = self._buffers.pop("weight")
        super()._apply(fn, recurse)
        moved = (weight.detach().to(fn(torch.empty(0, device=weight.device)).device) if weight.dtype == torch.bfloat16
                 else keep_at_least_fp32(fn, weight.detach()))
        self._buffers["weight"] = moved.detach().requires_grad_(True)
        return self

    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata=None) -> dict:
        """megatron dist_checkpointing entry: this rank's column shard of the [n_slots, dim] table, as a
        list of row blocks (`checkpoint_row_blocks`), so a checkpoint written under one layout loads
        under any other and no reader ever holds more than one block of rows of a saved shard."""
        from megatron.core.dist_checkpointing import ShardedTensor

        key = f"{prefix}weight"
        p = self.parallel
        rows, n = checkpoint_row_blocks(self.n_slots, self.dim)
        w = self.weight.detach()
        return {key: [ShardedTensor.from_rank_offsets(key, w[b * rows:(b + 1) * rows], (0, b, n),
                                                      (1, p.shard, p.size), replica_id=p.replica_id)
                      for b in range(n)]}

    def extra_repr(self) -> str:
        p = self.parallel
        return (f"slots={self.n_slots}, dim={self.dim}, shard=columns[{self.column_start}:"
                f"{self.column_start + self.shard_dim}] ({p.shard + 1}/{p.size})")


def _all_counts(n: int, size: int, group, device) -> list[int]:
    t = torch.tensor([n], dtype=torch.int64, device=device)
    parts = [torch.empty_like(t) for _ in range(size)]
    dist.all_gather(parts, t, group=group)
    return [int(x) for x in parts]


def reduce_sparse_grad(grad: torch.Tensor, group, size: int) -> torch.Tensor:
    """Sum a sparse COO gradient over `group` (replicas of one shard) without densifying it."""
    grad = grad.coalesce()
    idx, val = grad.indices()[0], grad.values()
    counts = _all_counts(idx.numel(), size, group, idx.device)
    width = max(counts)
    pad_idx = idx.new_zeros(width)
    pad_val = val.new_zeros((width,) + val.shape[1:])
    pad_idx[: idx.numel()] = idx
    pad_val[: idx.numel()] = val
    all_idx = [torch.empty_like(pad_idx) for _ in range(size)]
    all_val = [torch.empty_like(pad_val) for _ in range(size)]
    dist.all_gather(all_idx, pad_idx, group=group)
    dist.all_gather(all_val, pad_val, group=group)
    idx = torch.cat([t[:c] for t, c in zip(all_idx, counts)])
    val = torch.cat([t[:c] for t, c in zip(all_val, counts)])
    return torch.sparse_coo_tensor(idx.unsqueeze(0), val, grad.shape).coalesce()
