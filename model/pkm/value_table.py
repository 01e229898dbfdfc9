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
one owner); with columns every rank does 1/P of the arithmetic and moves N x d in total, and the
gradient of a row shard is still row-sparse. What columns repeat on every rank is the cost per read and
per row (sorting the DP group's reads, fetching a row): benchmarks/RESULTS.md, sharding. Meta's
ColwiseEmbeddingBag makes the same choice but only over one group; here the group may span TP and DP.

Gradients never materialise densely: the table is a buffer (not a Parameter: DeepSpeed must neither
broadcast, reduce nor optimise it) that requires grad and receives a coalesced sparse COO gradient
from `weighted_bag`; `pretrain` steps it with a row-sparse optimizer. Step 2 is the same kernel at
every memory-parallel size (one process is the size-1 case): the fused backward of
model/pkm/cpu_kernels.py on CPU, torch ops elsewhere. Why not fbgemm's table-batched kernels
(fbgemm-gpu-cpu): the README's Design section, and `fbgemm_vs_ours` in benchmarks/pkm_layer.py.
"""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from model.errors import ModelError
from model.pkm import cpu_kernels
from model.pkm.product_keys import sort_ids
from model.precision import TABLE_DTYPE, keep_at_least_fp32


@dataclass(frozen=True)
class MemoryParallel:
    """Process groups of the memory-parallel layout (all None / size 1 in a single process)."""

    tp_group: dist.ProcessGroup | None = None
    tp_size: int = 1
    tp_rank: int = 0
    dp_group: dist.ProcessGroup | None = None
    dp_size: int = 1
    dp_rank: int = 0
    # Ranks holding the same shard but reading different tokens (the DP ranks outside the memory
    # group): their sparse gradients are summed before the update.
    replica_group: dist.ProcessGroup | None = None
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
        dist.all_to_all_single(
            out,
            x.repeat((size,) + (1,) * (x.dim() - 1)),
            output_split_sizes=_split_sizes(counts),
            input_split_sizes=[x.shape[0]] * size,
            group=group,
        )
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        size = len(ctx.counts)
        out = grad.new_empty((size * ctx.n,) + grad.shape[1:])
        dist.all_to_all_single(
            out,
            grad.contiguous(),
            output_split_sizes=[ctx.n] * size,
            input_split_sizes=_split_sizes(ctx.counts),
            group=ctx.group,
        )
        return out.view((size, ctx.n) + grad.shape[1:]).sum(0), None, None


class _ReturnColumns(torch.autograd.Function):
    """Forward: [N_all, c] rows of all DP peers -> [N_mine, size * c] (my rows, every peer's columns)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, counts: list[int], rank: int, group) -> torch.Tensor:
        size = len(counts)
        n, c = counts[rank], x.shape[1]
        ctx.counts, ctx.group, ctx.n, ctx.c = counts, group, n, c
        out = x.new_empty((size * n, c))
        dist.all_to_all_single(
            out, x.contiguous(), output_split_sizes=[n] * size, input_split_sizes=_split_sizes(counts), group=group
        )
        return out.view(size, n, c).transpose(0, 1).reshape(n, size * c)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        size = len(ctx.counts)
        send = grad.reshape(ctx.n, size, ctx.c).transpose(0, 1).contiguous().view(size * ctx.n, ctx.c)
        out = grad.new_empty((sum(ctx.counts), ctx.c))
        dist.all_to_all_single(
            out, send, output_split_sizes=_split_sizes(ctx.counts), input_split_sizes=[ctx.n] * size, group=ctx.group
        )
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
        return grad[..., ctx.rank * ctx.c : (ctx.rank + 1) * ctx.c].contiguous(), None, None, None


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
# The local read: one kernel at every memory-parallel size


class _WeightedBag(torch.autograd.Function):
    """out[n] = sum_k weights[n, k] * table[indices[n, k]], with the table's gradient a *coalesced*
    sparse COO tensor (one row per distinct slot read).

    Same values as `F.embedding_bag(indices, table, per_sample_weights=weights, mode="sum",
    sparse=True)`, whose backward instead copies one gradient row per read (N x K rows: 268 MB at
    1024 tokens x 128 reads x 512 dims), scales it, and leaves the duplicates for the optimizer's
    coalesce (a sort of all N x K rows). Here the reads are sorted by slot (N x K ints) and each
    slot's row is one weighted bag of output-gradient rows: the [N, dim] gradient stays in cache and
    only the distinct rows are written, already coalesced. The weight gradient (one dot product per
    read) walks the table in the same sorted order.
    """

    @staticmethod
    def forward(ctx, indices, weights, table):
        ctx.save_for_backward(indices, weights, table)
        return F.embedding_bag(indices, table, per_sample_weights=weights, mode="sum")

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        indices, weights, table = ctx.saved_tensors
        n, k = indices.shape
        grad = grad.contiguous()
        # Visit the reads in slot order: the table rows are then read in address order (twice as fast
        # as random order for the weight gradient) and each slot's reads are adjacent.
        flat, order = sort_ids(indices.reshape(-1))
        grad_weights = grad_table = None
        if all(ctx.needs_input_grad[1:]) and cpu_kernels.available(grad, table, weights):
            # the weight gradient and the table rows in one pass (model/pkm/cpu_kernels.py)
            grad_weights, slots, rows = cpu_kernels.weighted_bag_backward(grad, table, weights, flat, order)
        else:
            bags = order // k  # token of each read
            if ctx.needs_input_grad[1]:
                offsets = torch.arange(0, n * k, k, device=grad.device)  # unused: `bags` is given
                dots = torch.ops.aten._embedding_bag_per_sample_weights_backward(
                    grad, table, flat, offsets, bags, 0, -1
                )
                grad_weights = torch.empty_like(dots).index_copy_(0, order, dots).view(n, k)
            if ctx.needs_input_grad[2]:
                slots, counts = torch.unique_consecutive(flat, return_counts=True)
                offsets = counts.cumsum(0) - counts
                rows = F.embedding_bag(bags, grad, offsets, per_sample_weights=weights.reshape(-1)[order], mode="sum")
        if ctx.needs_input_grad[2]:
            grad_table = torch.sparse_coo_tensor(
                slots.unsqueeze(0), rows, table.shape, is_coalesced=True, check_invariants=False
            )
        return None, grad_weights, grad_table


def weighted_bag(indices: torch.Tensor, weights: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """[N, K] slot ids and weights -> [N, dim] weighted sums of `table` rows; sparse coalesced table grad."""
    return _WeightedBag.apply(indices, weights, table)


def _mark_coalesced(table: torch.Tensor) -> None:
    """Post-accumulate-grad hook: autograd's AccumulateGrad re-wraps a sparse gradient without its
    coalesced flag, and the optimizer's `coalesce()` would then sort and copy all rows again (~160 ms
    for 100k rows x 512). Strictly increasing row ids prove the gradient is coalesced (a sum of two
    backward passes is not, and keeps the flag off)."""
    g = table.grad
    if g is None or not g.is_sparse or g.is_coalesced() or g.sparse_dim() != 1:
        return
    rows = g._indices()[0]
    if rows.numel() < 2 or bool((rows[1:] > rows[:-1]).all()):
        g._coalesced_(True)


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

    def __init__(
        self,
        n_slots: int,
        dim: int,
        parallel: MemoryParallel = MemoryParallel(),
        init_seed: int = 0,
        dtype: torch.dtype = TABLE_DTYPE,
        device=None,
    ):
        super().__init__()
        if dim % parallel.size:
            raise ModelError(
                f"PKM value dim {dim} (model.hidden_size) is not divisible by the memory-parallel size {parallel.size}"
            )
        self.n_slots, self.dim, self.parallel = n_slots, dim, parallel
        self.storage_dtype = dtype  # fp32 (TABLE_DTYPE), or bf16 by choice (model/precision.py)
        self.shard_dim = dim // parallel.size
        self.column_start = parallel.shard * self.shard_dim
        weight = torch.empty(n_slots, self.shard_dim, dtype=dtype, device="meta" if _shape_only.get() else device)
        self.reset_parameters(weight, init_seed)
        self.register_buffer("weight", weight.requires_grad_(True))
        self._hook_grad()

    def _hook_grad(self) -> None:
        """Keep the gradient's coalesced flag through autograd's accumulation (`_mark_coalesced`)."""
        w = self.weight
        if w.requires_grad and w.is_leaf and not getattr(w, "_pkm_marks_coalesced", False):
            w.register_post_accumulate_grad_hook(_mark_coalesced)
            w._pkm_marks_coalesced = True

    @torch.no_grad()
    def reset_parameters(self, weight: torch.Tensor, seed: int) -> None:
        """N(0, dim^-0.5) like XLM. Every (block of INIT_BLOCK_ROWS rows, column) of the global table has
        its own seeded stream, so a rank draws only its own columns, yet every layout holds exactly the
        numbers of the single-process table. Memory and time are proportional to the shard."""
        if weight.is_meta:
            return
        gen = torch.Generator(device="cpu")
        std = self.dim**-0.5
        buf = torch.empty(self.shard_dim, min(INIT_BLOCK_ROWS, self.n_slots), dtype=torch.float32)
        for block, start in enumerate(range(0, self.n_slots, INIT_BLOCK_ROWS)):
            cols = buf[:, : min(INIT_BLOCK_ROWS, self.n_slots - start)]
            for j in range(self.shard_dim):
                gen.manual_seed(_stream_seed(seed, block, self.column_start + j))
                cols[j].normal_(0.0, std, generator=gen)
            weight[start : start + cols.shape[1]].copy_(cols.t())

    def forward(self, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """indices, weights: [N, K] -> [N, dim] = sum_k weights[:, k] * table[indices[:, k]]."""
        p = self.parallel
        if weights.dtype != self.weight.dtype:  # a bf16 table (model.pkm.value_dtype) reads bf16 weights
            return self(indices, weights.to(self.weight.dtype)).to(weights.dtype)
        if p.size == 1:
            return weighted_bag(indices, weights, self.weight)
        if p.tp_size > 1:
            weights = _ReduceGrad.apply(weights, p.tp_group)
        counts = [indices.shape[0]]
        if p.dp_size > 1:
            counts = _all_counts(indices.shape[0], p.dp_size, p.dp_group, indices.device)
            indices = _GatherTokens.apply(indices, counts, p.dp_group)
            weights = _GatherTokens.apply(weights, counts, p.dp_group)
        out = weighted_bag(indices, weights, self.weight)  # the same kernel as one process, on my columns
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
        moved = (
            weight.detach().to(fn(torch.empty(0, device=weight.device)).device)
            if weight.dtype == torch.bfloat16
            else keep_at_least_fp32(fn, weight.detach())
        )
        self._buffers["weight"] = moved.detach().requires_grad_(True)
        self._hook_grad()  # a new leaf: hook it again
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
        return {
            key: [
                ShardedTensor.from_rank_offsets(
                    key, w[b * rows : (b + 1) * rows], (0, b, n), (1, p.shard, p.size), replica_id=p.replica_id
                )
                for b in range(n)
            ]
        }

    def extra_repr(self) -> str:
        p = self.parallel
        return (
            f"slots={self.n_slots}, dim={self.dim}, shard=columns[{self.column_start}:"
            f"{self.column_start + self.shard_dim}] ({p.shard + 1}/{p.size})"
        )


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
