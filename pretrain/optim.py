"""Optimisers: dense weights on the usual schedule (inside the DeepSpeed engine), PKM value tables on
a constant-lr sparse optimizer beside it, stepping only the rows that were read (XLM's `mem_sparse`).

Why beside the engine: the engine (and ZeRO) flattens parameters and their gradients into dense
buffers; a value table's gradient touches ~N*heads*knn of n_keys**2 rows, so inside the engine every
step would materialise and update the whole table. benchmarks/pkm_layer.py measures both.

The value optimizer (`model.pkm.value_optimizer`) sets the bytes per value parameter, which bound the
largest table a machine can train (benchmarks/scale.py):
  adam             LazyRowAdam: two fp32 moments per value, 12 bytes with the fp32 table (XLM's choice)
  rowwise_adagrad  RowwiseAdagrad: one fp32 scalar per row, 4 + 4/dim bytes (2 + 4/dim with bf16 tables)
  rowwise_adam     RowwiseAdam: a first moment per value, a second moment per row, 8 + 4/dim bytes
The row-wise ones are what recommendation systems use for huge embedding tables (fbgemm_gpu's
EXACT_ROWWISE_ADAGRAD and PARTIAL_ROWWISE_ADAM, TorchRec's default).
"""

from __future__ import annotations

import math

import torch

from model.pkm import cpu_kernels
from model.pkm.value_table import MemoryParallel, ValueTable, reduce_sparse_grad
from pretrain.config import TrainConfig
from pretrain.errors import PretrainError

VALUE_OPTIMIZERS = ("adam", "rowwise_adagrad", "rowwise_adam")


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
                step_size = group["lr"] * math.sqrt(1 - b2**t) / (1 - b1**t)
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
        v = torch.index_select(v_all, 0, rows, out=buf[n : 2 * n])
        m.lerp_(vals, 1 - b1)
        v.mul_(b2).addcmul_(vals, vals, value=1 - b2)
        m_all.index_copy_(0, rows, m)
        v_all.index_copy_(0, rows, v)
        p.index_add_(0, rows, m.div_(v.sqrt_().add_(eps)), alpha=-step_size)


# Rows rounded at once (bf16 tables): the rounding's int64 temporaries take ~50 bytes per value.
ROUND_CHUNK_ROWS = 4096


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (Wellons' lowbias32) of int64 tensors holding values in [0, 2**32)."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    return x ^ (x >> 16)


def stochastic_round_bf16(x: torch.Tensor, element: torch.Tensor, salt: int) -> torch.Tensor:
    """fp32 `x` rounded to bf16 up or down with probabilities given by its distance to each (unbiased:
    E[round(x)] = x), as fbgemm rounds its fp16/bf16 tables. Round to nearest would drop every update
    smaller than half a bf16 step (2**-9 relative): with row-wise Adagrad's shrinking steps and rarely
    read rows, most updates of a trained table. The random bits are a hash of (`salt`, the element's
    global index `element`), not a generator's stream, so every column layout rounds the same element
    the same way (TP/DP runs match the single process)."""
    bits = _mix32(
        (element >> 32) ^ _mix32((element & 0xFFFFFFFF) ^ _mix32(torch.full_like(element, salt & 0xFFFFFFFF)))
    )
    u = x.float().contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    u = (u + (bits & 0xFFFF)) & 0xFFFF0000  # add 16 random bits below bf16's last bit, then truncate
    return u.to(torch.int32).view(torch.float32).to(torch.bfloat16)  # exact: the low 16 bits are zero


class _RowwiseOptimizer(torch.optim.Optimizer):
    """Base of the row-wise optimizers: per table one param group with `dim` (the FULL row width) and
    `column_start` (this shard's first column). A row's statistic, mean(g_r**2) over the full width, must
    not depend on the layout: each column shard sums its part and `row_sum` (SparseValueOptimizer: an
    all-reduce over the memory-parallel group, one float per touched row) adds up the shards.

    Every step gathers the touched rows in fp32, updates them there and writes them back (bf16 tables:
    stochastically rounded, `stochastic_round_bf16`). Expects coalesced gradients whose row ids are the
    same on every column shard (every shard reads all tokens of its memory group)."""

    def __init__(self, params, defaults: dict, row_sum=None, seed: int = 0):
        super().__init__(params, defaults)
        self.row_sum = row_sum or (lambda x: x)
        self.seed = seed

    def init_state(self, p: torch.Tensor) -> dict:
        raise NotImplementedError

    def update_rows(self, st: dict, group: dict, rows, w, g, mean_sq) -> None:
        """Update the fp32 rows `w` (in place) and their state from gradient rows `g` and mean_sq."""
        raise NotImplementedError

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad if p.grad.is_coalesced() else p.grad.coalesce()
                rows, vals = g._indices()[0], g._values().float()
                st = self.state[p]
                if not st:
                    st.update(self.init_state(p))
                st["step"] += 1
                if rows.numel() == 0:
                    continue
                mean_sq = self.row_sum(vals.pow(2).sum(1)) / group["dim"]
                w = p.detach().index_select(0, rows).float()
                self.update_rows(st, group, rows, w, vals, mean_sq)
                if p.dtype != torch.bfloat16:
                    p.detach().index_copy_(0, rows, w)
                    continue
                cols = group["column_start"] + torch.arange(w.shape[1], device=rows.device)
                for a in range(0, rows.numel(), ROUND_CHUNK_ROWS):  # the hash's int64 temporaries: by chunks
                    r = rows[a : a + ROUND_CHUNK_ROWS]
                    element = r.unsqueeze(1) * group["dim"] + cols
                    p.detach().index_copy_(
                        0,
                        r,
                        stochastic_round_bf16(w[a : a + ROUND_CHUNK_ROWS], element, self.seed * 1000003 + st["step"]),
                    )
        return None


class RowwiseAdagrad(_RowwiseOptimizer):
    """fbgemm_gpu's EXACT_ROWWISE_ADAGRAD (fbgemm_gpu/codegen/genscript/optimizers.py, `rowwise_adagrad`,
    no weight decay), one fp32 scalar G_r per row:
        G_r += mean_j g_rj**2        (mean over the row's full width d)
        w_r -= lr * g_r / (sqrt(G_r) + eps)
    State: `step` (int), `sum` [rows] fp32."""

    def __init__(self, params, lr: float = 1e-3, eps: float = 1e-8, row_sum=None, seed: int = 0):
        super().__init__(params, dict(lr=lr, eps=eps, dim=None, column_start=0), row_sum, seed)

    def init_state(self, p):
        return dict(step=0, sum=torch.zeros(p.shape[0], dtype=torch.float32, device=p.device))

    def update_rows(self, st, group, rows, w, g, mean_sq):
        G = st["sum"].index_add_(0, rows, mean_sq).index_select(0, rows)
        w.addcmul_(g, (group["lr"] / (G.sqrt_() + group["eps"])).unsqueeze(1), value=-1.0)


class RowwiseAdam(_RowwiseOptimizer):
    """fbgemm_gpu's PARTIAL_ROWWISE_ADAM (fbgemm_gpu/codegen/genscript/optimizers.py,
    `partial_rowwise_adam`, no weight decay): the first moment per element, the second per row; one step
    count t per table (as LazyRowAdam: rows not read keep their moments):
        m_r = b1 * m_r + (1 - b1) * g_r                     [per element]
        v_r = b2 * v_r + (1 - b2) * mean_j g_rj**2          [per row, mean over the full width d]
        w_r -= lr * (m_r / (1 - b1**t)) / (sqrt(v_r / (1 - b2**t)) + eps)
    State: `step` (int), `exp_avg` [rows, shard cols] fp32, `exp_avg_sq` [rows] fp32."""

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, row_sum=None, seed: int = 0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, dim=None, column_start=0), row_sum, seed)

    def init_state(self, p):
        return dict(
            step=0,
            exp_avg=torch.zeros_like(p, dtype=torch.float32),
            exp_avg_sq=torch.zeros(p.shape[0], dtype=torch.float32, device=p.device),
        )

    def update_rows(self, st, group, rows, w, g, mean_sq):
        b1, b2 = group["betas"]
        t = st["step"]
        m = st["exp_avg"].index_select(0, rows).lerp_(g, 1 - b1)
        st["exp_avg"].index_copy_(0, rows, m)
        v = st["exp_avg_sq"].index_select(0, rows).mul_(b2).add_(mean_sq, alpha=1 - b2)
        st["exp_avg_sq"].index_copy_(0, rows, v)
        denom = v.div_(1 - b2**t).sqrt_().add_(group["eps"])
        w.addcdiv_(m, denom.unsqueeze(1), value=-group["lr"] / (1 - b1**t))


# Per value optimizer: its state tensors, and whether each holds one value per row ("row") or one per
# table element ("element"). Checkpoints save element states by the table's row blocks, row states by
# the same rows from one column shard only (every column shard holds the same vector).
STATE_LAYOUT = {
    "adam": {"exp_avg": "element", "exp_avg_sq": "element"},
    "rowwise_adagrad": {"sum": "row"},
    "rowwise_adam": {"exp_avg": "element", "exp_avg_sq": "row"},
}


def value_optimizer_bytes(kind: str, tables: list[ValueTable]) -> int:
    """Bytes of the value optimizer's state (fp32) for these table shards."""
    total = 0
    for t in tables:
        rows, cols = t.n_slots, t.shard_dim
        total += sum(4 * (rows * cols if what == "element" else rows) for what in STATE_LAYOUT[kind].values())
    return total


class SparseValueOptimizer:
    """The value tables' optimizer (`kind`, one of VALUE_OPTIMIZERS): only rows with a gradient move,
    the state of all other rows stays as it was. Reduces each table's sparse gradient over the replicas
    of its shard first; the row-wise kinds also sum each touched row's squared gradient over the
    memory-parallel group (the column shards of the table). Hands out and takes back its own sharded
    checkpoint state (`sharded_state_dict`, `load_sharded_state_dict`)."""

    def __init__(
        self,
        tables: list[ValueTable],
        lr: float,
        betas=(0.9, 0.98),
        eps: float = 1e-8,
        parallel: MemoryParallel = MemoryParallel(),
        kind: str = "adam",
        seed: int = 0,
    ):
        if kind not in VALUE_OPTIMIZERS:
            raise ValueError(f"value optimizer {kind!r} is not one of {VALUE_OPTIMIZERS}")
        self.tables, self.parallel, self.kind = tables, parallel, kind
        self.weights = [t.weight for t in tables]
        self.optimizer = None
        if not tables:
            return
        if kind == "adam":
            self.optimizer = LazyRowAdam(self.weights, lr=lr, betas=betas, eps=eps)
            return
        groups = [{"params": [t.weight], "dim": t.dim, "column_start": t.column_start} for t in tables]
        if kind == "rowwise_adagrad":
            self.optimizer = RowwiseAdagrad(groups, lr=lr, eps=eps, row_sum=self._row_sum, seed=seed)
        else:
            self.optimizer = RowwiseAdam(groups, lr=lr, betas=betas, eps=eps, row_sum=self._row_sum, seed=seed)

    def _row_sum(self, x: torch.Tensor) -> torch.Tensor:
        """Sum per-row partial sums over the column shards (TP part, then DP part of the memory group)."""
        m = self.parallel
        for group, size in ((m.tp_group, m.tp_size), (m.dp_group, m.dp_size)):
            if size > 1:
                torch.distributed.all_reduce(x, group=group)
        return x

    @torch.no_grad()
    def step(self) -> list[torch.Tensor]:
        """Apply one update; returns, per table, the (local) row ids that were updated."""
        updated = []
        m = self.parallel
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

    def state_of(self, w: torch.Tensor) -> dict:
        """The state of table `w`, created as the optimizer would at its first step (step 0, zeros) when
        missing, so saves and loads use the optimizer's own tensors."""
        st = self.optimizer.state[w]
        if not st:
            if self.kind == "adam":
                st.update(
                    step=0,
                    exp_avg=torch.zeros_like(w, dtype=torch.float32),
                    exp_avg_sq=torch.zeros_like(w, dtype=torch.float32),
                )
            else:
                st.update(self.optimizer.init_state(w))
        return st

    def state_bytes(self) -> int:
        """Bytes held by the live state tensors of every table (benchmarks/pkm_layer.py)."""
        return sum(
            t.untyped_storage().nbytes() for w in self.weights for t in self.state_of(w).values() if torch.is_tensor(t)
        )

    def sharded_state_dict(self, named_tables: list[tuple[str, ValueTable]], model_sd: dict) -> dict:
        """dist_checkpointing entries of the state of each (name, table) (`model_sd`: the model's sharded
        state dict, whose `model.{name}.weight` entry is the table's list of row blocks). Element states
        go by the table's own row blocks; a row state by the same rows, written by column shard 0 of the
        first replica only (all column shards hold the same vector after the row all-reduce).
        The entries are views of the optimizer's own tensors: a load reads into them in place."""
        from megatron.core.dist_checkpointing import ShardedTensor
        from megatron.core.dist_checkpointing.optimizer import make_sharded_optimizer_tensor

        out = {}
        for name, table in named_tables:
            st = self.state_of(table.weight)
            blocks = model_sd[f"model.{name}.weight"]
            owner = (table.parallel.shard,) + tuple(table.parallel.replica_id)
            for k, what in STATE_LAYOUT[self.kind].items():
                prefix = f"value_optimizer.{k}"
                if what == "element":
                    out[f"values.{k}.{name}"] = [
                        make_sharded_optimizer_tensor(sh, _rows_of(st[k], sh), prefix) for sh in blocks
                    ]
                else:
                    key = f"{prefix}.model.{name}.weight"
                    out[f"values.{k}.{name}"] = [
                        ShardedTensor.from_rank_offsets(key, _rows_of(st[k], sh), (0, b, len(blocks)), replica_id=owner)
                        for b, sh in enumerate(blocks)
                    ]
        return out

    def common_state(self) -> dict:
        """What a checkpoint keeps beside the sharded tensors: the kind and each table's step count."""
        return {
            "value_optimizer": self.kind,
            "value_optimizer_steps": [int(self.state_of(w)["step"]) for w in self.weights],
        }

    def check_checkpoint(self, common: dict, path) -> None:
        """One-line error if the checkpoint at `path` was written by another kind of value optimizer
        (checkpoints from before value optimizers had kinds are adam's)."""
        saved = common.get("value_optimizer", "adam")
        if saved != self.kind:
            raise PretrainError(
                f"{path}: the checkpoint holds {saved} value-optimizer state, this run uses "
                f"model.pkm.value_optimizer={self.kind}; resume with value_optimizer={saved} "
                "or start a new run"
            )

    def load_sharded_state_dict(self, common: dict) -> None:
        """After a dist_checkpointing load of `sharded_state_dict`'s entries (read in place): the steps."""
        for w, step in zip(self.weights, common["value_optimizer_steps"]):
            self.state_of(w)["step"] = int(step)  # a Python int, as SparseAdam's

    def state_dict(self) -> dict:
        return self.optimizer.state_dict() if self.optimizer else {}

    def load_state_dict(self, state: dict) -> None:
        if self.optimizer and state:
            self.optimizer.load_state_dict(state)


def _rows_of(t: torch.Tensor, sh) -> torch.Tensor:
    """The rows of `t` (a rank's shard, or a per-row vector) that ShardedTensor block `sh` covers."""
    start = sh.global_offset[0]
    return t.detach()[start : start + sh.local_shape[0]]
