"""torchrun worker of benchmarks/sharding.py: builds the real Trainer, times its training steps and
reports what this rank really holds for the PKM value tables (live tensors, not formulas).

usage: torchrun --nproc_per_node N benchmarks/workers/sharding_worker.py \
    OUT_DIR WARMUP STEPS DENSE CONFIG [overrides...]

Each round times one training step with the row-sparse value update (the Trainer's LazyRowAdam) and,
when DENSE is 1, one with the dense alternative right after it (A B A B ...), so both see the same
machine load. Writes OUT_DIR/rank<R>.json.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist


class DenseValueAdam:
    """The alternative the Trainer avoids: each shard's gradient made dense and a dense Adam over the
    whole shard every step (what a value table inside the DeepSpeed engine would cost)."""

    def __init__(self, sparse, lr: float, betas, eps: float):
        self.weights, self.parallel = sparse.weights, sparse.parallel
        self.optimizer = torch.optim.Adam(self.weights, lr=lr, betas=betas, eps=eps)

    @torch.no_grad()
    def step(self) -> list[torch.Tensor]:
        from model.pkm.value_table import reduce_sparse_grad

        m, updated = self.parallel, []
        for w in self.weights:
            g = w.grad
            g = reduce_sparse_grad(g, m.replica_group, m.replica_size) if m.replica_size > 1 else g.coalesce()
            updated.append(g.indices()[0])
            w.grad = g.to_dense().mul_(m.grad_scale)
        self.optimizer.step()
        for w in self.weights:
            w.grad = None
        return updated


class RowCounter:
    """Passes `step` through and records how many rows of each table it updated."""

    def __init__(self, inner):
        self.inner, self.rows = inner, []

    def step(self) -> list[torch.Tensor]:
        updated = self.inner.step()
        self.rows.append([int(r.numel()) for r in updated])
        return updated


def storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind `tensors` (a view never counts its base twice)."""
    seen = {}
    for t in tensors:
        s = t.untyped_storage()
        seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values())


def peak_rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def main() -> int:
    out_dir, warmup, steps, dense = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1"
    from megatron.core import parallel_state as ps

    from pretrain.config import load_config
    from pretrain.distributed import shutdown
    from pretrain.metrics import PKMUsage
    from pretrain.trainer import Trainer

    cfg = load_config(sys.argv[5], sys.argv[6:])
    t0 = time.perf_counter()
    tr = Trainer(cfg)
    setup_s = time.perf_counter() - t0
    env = tr.env
    tr.usage = PKMUsage(tr.pkm_layers, ps.get_data_parallel_group() if env.dp_size > 1 else None)
    tr.engine.train()
    t = cfg.train
    optimizers = {"sparse": tr.value_optimizer}
    if dense:
        optimizers["dense"] = DenseValueAdam(
            tr.value_optimizer, cfg.model.pkm.value_lr, (t.adam_beta1, t.adam_beta2), t.adam_eps
        )
    optimizers = {k: RowCounter(v) for k, v in optimizers.items()}
    times = {k: [] for k in optimizers}
    cpu = {k: [] for k in optimizers}  # this process's CPU time (all its threads): less sensitive to load
    batches = iter(tr.sampler)
    for r in range(warmup + steps):
        for name, opt in optimizers.items():
            tr.value_optimizer = opt
            dist.barrier()  # every rank starts the step together; the step itself ends in an all-reduce
            start, cpu_start = time.perf_counter(), time.process_time()
            tr.train_step(next(batches))
            if r >= warmup:
                times[name].append((time.perf_counter() - start) * 1e3)
                cpu[name].append((time.process_time() - cpu_start) * 1e3)
        if env.is_main:
            print(
                f"  world {env.world_size}: round {r + 1}/{warmup + steps}"
                + ("" if r >= warmup else " (warm-up)")
                + "".join(f"  {k} {v[-1]:.0f} ms" for k, v in times.items() if v and r >= warmup),
                flush=True,
            )

    tables = [m.values.weight for _, m in tr.pkm_layers]
    sparse_state = optimizers["sparse"].inner.optimizer.state
    moments = [sparse_state[w][k] for w in tables for k in ("exp_avg", "exp_avg_sq")]
    report = {
        "rank": env.rank,
        "world": env.world_size,
        "memory_parallel_size": env.memory_parallel.size,
        "omp_threads": torch.get_num_threads(),
        "value_shape": [list(w.shape) for w in tables],
        "value_bytes": storage_bytes(tables),
        "value_optimizer_bytes": storage_bytes(moments),
        "value_optimizer_steps": [int(sparse_state[w]["step"]) for w in tables],
        "dense_param_bytes": storage_bytes(tr.model.parameters()),
        "peak_rss_bytes": peak_rss_bytes(),
        "setup_s": round(setup_s, 2),
        "step_ms": times,
        "cpu_ms": cpu,
        "rows_updated": optimizers["sparse"].rows[warmup:],  # per table and step, rows of this shard
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / f".rank{env.rank}.json.tmp"
    tmp.write_text(json.dumps(report))
    os.replace(tmp, out_dir / f"rank{env.rank}.json")
    shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
