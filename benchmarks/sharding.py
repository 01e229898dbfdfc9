"""PKM value-table sharding: per-rank bytes and step time at world sizes 1, 2, 4 (issue #5).

Each world size is a real `torchrun` (gloo, CPU) of the real Trainer with the value tables split by
columns over data parallelism (parallel.memory_parallel=dp, TP 1), the same global batch at every size
(8 sequences x 64 tokens, micro-batch 8 / world, no gradient accumulation). Every rank reports what it
really holds, from its live tensors after the timed steps (benchmarks/workers/sharding_worker.py):
  value bytes       the storage of its value-table shard
  optimizer bytes   the storage of the lazy Adam's exp_avg and exp_avg_sq for that shard (LazyRowAdam)
Figures (--json keys):
  value_bytes_ratio_w2, _w4   max per-rank (value + optimizer) bytes x world / the world-1 total
                              (goal: within 5% of 1.0, i.e. each rank holds total / world)
  step_time_w2_over_w1, _w4   median step time per rank after warm-up, world N / world 1
  dense_values_over_sparse_wN the same step with the value update done densely (shard gradient made
                              dense + torch Adam over the whole shard, what the table would cost inside
                              the DeepSpeed engine) / the row-sparse update, timed A B A B in one run
Threads: one per rank by default (OMP_NUM_THREADS=1), so every rank has the same compute at every size
and world x threads <= 2 cores for worlds 1 and 2; world 4 oversubscribes 2 cores and its step time says
little. `--threads 0` gives each rank max(1, cores // world) threads instead (world 1 then runs 2
threads): on a machine shared with other work, 2-thread OpenMP regions wait on descheduled threads and
world 1 slows down by several times, so that setting only means something on idle cores.
Also reported: CPU time per step of each rank's process (time.process_time), less distorted by machine
load than wall time; cpu_total_wN_over_w1 = N x per-rank CPU / world-1 CPU (the parallel overhead).
Sizes: GPT 2 layers, hidden 256, 4 heads, seq 64; one PKM at layer 1 with n_keys 256 (65,536 slots x
256 = 64 MiB fp32 table, 128 MiB of Adam moments; --n-keys to change), heads 4, knn 32, k_dim 128.

    python benchmarks/sharding.py [--quick] [--json] [--threads N] [--n-keys K]

`--quick` runs fewer steps (never smaller sizes) and the dense comparison at world 1 only.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.common import emit, free_port, log  # noqa: E402

WORKER = ROOT / "benchmarks" / "workers" / "sharding_worker.py"
GLOBAL_BATCH = 8
N_KEYS = 256
MODEL = [
    "model.num_layers=2",
    "model.hidden_size=256",
    "model.num_attention_heads=4",
    "model.seq_length=64",
    "model.pkm.layers=[1]",
    "model.pkm.heads=4",
    "model.pkm.knn=32",
    "model.pkm.k_dim=128",
]
RUN = [
    "parallel.tensor_parallel=1",
    "parallel.memory_parallel=dp",
    "train.zero_stage=0",
    "train.precision=fp32",
    f"train.global_batch_size={GLOBAL_BATCH}",
    "train.eval_interval=0",
    "logging.tensorboard=false",
    "logging.progress=false",
    "checkpoint.save_interval=0",
]


def run_world(world: int, work: Path, warmup: int, steps: int, dense: bool, threads: int, n_keys: int) -> list[dict]:
    """One torchrun of `world` ranks with `threads` OpenMP threads each; returns each rank's report."""
    out = work / f"w{world}"
    overrides = [
        *MODEL,
        f"model.pkm.n_keys={n_keys}",
        *RUN,
        f"train.micro_batch_size={GLOBAL_BATCH // world}",
        f"train.train_steps={(warmup + steps) * (2 if dense else 1) + 1}",
        f"run_dir={work / f'run_w{world}'}",
        f"data.cache_dir={work / 'cache'}",
    ]
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={world}", f"--master_port={free_port()}"]
    config = str(ROOT / "configs" / "tiny_gpt.yaml")
    cmd += [str(WORKER), str(out), str(warmup), str(steps), "1" if dense else "0", config, *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1", "PYTHONWARNINGS": "ignore"}
    log(
        f"world {world}: {world} rank(s) x {threads} thread(s), {warmup} warm-up + {steps} timed step(s)"
        + (", sparse and dense value updates interleaved" if dense else "")
    )
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in r.stdout.splitlines():
        if line.startswith("  world"):
            log(line)
    if r.returncode != 0:
        sys.exit(f"world {world} failed (exit {r.returncode}):\n{r.stdout[-4000:]}")
    reports = [json.loads((out / f"rank{i}.json").read_text()) for i in range(world)]
    log(f"world {world}: done in {time.perf_counter() - t0:.0f} s")
    return reports


def summarise(world: int, reports: list[dict], total: int | None) -> dict:
    per_rank = [r["value_bytes"] + r["value_optimizer_bytes"] for r in reports]
    step = {k: statistics.median(statistics.median(r["step_ms"][k]) for r in reports) for k in reports[0]["step_ms"]}
    cpu = {k: statistics.median(statistics.median(r["cpu_ms"][k]) for r in reports) for k in reports[0]["cpu_ms"]}
    rows = [statistics.mean(sum(s) for s in r["rows_updated"]) for r in reports]
    return {
        "world": world,
        "threads": reports[0]["omp_threads"],
        "value_shape": reports[0]["value_shape"][0],
        "value_bytes": max(r["value_bytes"] for r in reports),
        "optimizer_bytes": max(r["value_optimizer_bytes"] for r in reports),
        "per_rank_bytes": max(per_rank),
        "min_rank_bytes": min(per_rank),
        "ratio": None if total is None else max(per_rank) * world / total,
        "step_ms": step["sparse"],
        "dense_step_ms": step.get("dense"),
        "cpu_ms": cpu["sparse"],
        "dense_cpu_ms": cpu.get("dense"),
        "rows_updated": statistics.mean(rows),
        "slots": reports[0]["value_shape"][0][0],
        "peak_rss_mib": max(r["peak_rss_bytes"] for r in reports) / 2**20,
        "dense_param_bytes": reports[0]["dense_param_bytes"],
    }


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer steps (same sizes); <= 60 s on 2 idle cores")
    ap.add_argument("--json", action="store_true", help="last line: one JSON object of the figures")
    ap.add_argument("--threads", type=int, default=1, help="OpenMP threads per rank; 0 = max(1, cores // world)")
    ap.add_argument("--cores", type=int, default=2, help="cores of the machine, for --threads 0 and the notes")
    ap.add_argument("--n-keys", type=int, default=N_KEYS, help="sub-keys per half (the table has n_keys**2 slots)")
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None)
    args = ap.parse_args(argv)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    steps = args.steps or (3 if args.quick else 8)
    t_start = time.perf_counter()
    sizes = (1, 2, 4)
    rows = {}
    with tempfile.TemporaryDirectory(prefix="pkm-sharding-") as tmp:
        for w in sizes:
            dense = w == 1 or not args.quick
            threads = args.threads or max(1, args.cores // w)
            reports = run_world(w, Path(tmp), warmup, steps, dense, threads, args.n_keys)
            total = rows[1]["per_rank_bytes"] if 1 in rows else None
            rows[w] = summarise(w, reports, total)
    rows[1]["ratio"] = 1.0
    base = rows[1]["step_ms"]

    def r3(x):
        return None if x is None else round(x, 3)

    result = {
        "value_bytes_ratio_w2": r3(rows[2]["ratio"]),
        "value_bytes_ratio_w4": r3(rows[4]["ratio"]),
        "step_time_w2_over_w1": r3(rows[2]["step_ms"] / base),
        "step_time_w4_over_w1": r3(rows[4]["step_ms"] / base),
        **{
            f"dense_values_over_sparse_w{w}": r3(rows[w]["dense_step_ms"] / rows[w]["step_ms"])
            for w in sizes
            if rows[w]["dense_step_ms"]
        },
        "total_bytes_w1": rows[1]["per_rank_bytes"],
        **{f"per_rank_bytes_w{w}": rows[w]["per_rank_bytes"] for w in sizes},
        **{f"step_ms_w{w}": round(rows[w]["step_ms"], 1) for w in sizes},
        **{f"cpu_ms_per_rank_w{w}": round(rows[w]["cpu_ms"], 1) for w in sizes},
        # CPU time of all ranks together per global step, world N / world 1: the parallel overhead,
        # which machine load distorts less than wall time
        "cpu_total_w2_over_w1": r3(2 * rows[2]["cpu_ms"] / rows[1]["cpu_ms"]),
        "cpu_total_w4_over_w1": r3(4 * rows[4]["cpu_ms"] / rows[1]["cpu_ms"]),
        **{
            f"dense_values_cpu_over_sparse_w{w}": r3(rows[w]["dense_cpu_ms"] / rows[w]["cpu_ms"])
            for w in sizes
            if rows[w]["dense_cpu_ms"]
        },
        **{f"rows_updated_per_step_w{w}": round(rows[w]["rows_updated"]) for w in sizes},
        "slots": rows[1]["slots"],
        **{f"threads_w{w}": rows[w]["threads"] for w in sizes},
        "n_keys": args.n_keys,
        "warmup": warmup,
        "steps": steps,
        "cores": args.cores,
        "global_batch": GLOBAL_BATCH,
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()} {os.cpu_count()} cpus, load avg {os.getloadavg()[0]:.1f}",
        "wall_s": round(time.perf_counter() - t_start, 1),
    }

    print(
        f"{'world':>5} {'thr':>3} {'value shard':>16} {'value MiB':>9} {'Adam MiB':>8} {'per rank MiB':>12} "
        f"{'x world / total':>15} {'step ms':>8} {'CPU ms':>7} {'dense-values ms':>15} {'rows upd/step':>13} "
        f"{'peak RSS MiB':>12}"
    )
    for w in sizes:
        r = rows[w]
        dense = f"{r['dense_step_ms']:.0f}" if r["dense_step_ms"] else "-"
        print(
            f"{w:>5} {r['threads']:>3} {str(tuple(r['value_shape'])):>16} {r['value_bytes'] / 2**20:>9.1f} "
            f"{r['optimizer_bytes'] / 2**20:>8.1f} {r['per_rank_bytes'] / 2**20:>12.1f} {r['ratio']:>15.4f} "
            f"{r['step_ms']:>8.0f} {r['cpu_ms']:>7.0f} {dense:>15} {r['rows_updated']:>13.0f} "
            f"{r['peak_rss_mib']:>12.0f}"
        )
    print(
        f"value_bytes_ratio_w2 {result['value_bytes_ratio_w2']} | value_bytes_ratio_w4 "
        f"{result['value_bytes_ratio_w4']} (goal: within 5% of 1.0)"
    )
    note = "".join(
        f" (world {w} runs {w * rows[w]['threads']} threads on {args.cores} cores: oversubscribed)"
        for w in sizes
        if w * rows[w]["threads"] > args.cores
    )
    print(
        f"step_time_w2_over_w1 {result['step_time_w2_over_w1']} | step_time_w4_over_w1 "
        f"{result['step_time_w4_over_w1']}{note}"
    )
    print(f"wall {result['wall_s']} s")
    return emit(result, args.json)


if __name__ == "__main__":
    main()
