"""A tiny torch.distributed (gloo) job for testing launchers without the trainer.

It behaves like `pkm pretrain` where launchers can see it: reads torchrun's or SLURM's environment,
all-reduces a value each step, saves `run_dir/step_N` every `--save-interval` steps, resumes from the
newest, and on SIGUSR1/SIGTERM all ranks agree at the next step, save and exit 75 (preempted).
Run: python tests/dist_toy.py RUN_DIR --steps 20 [--save-interval 5] [--step-seconds 0.1]
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

PREEMPTED = 75
_signalled = False


def _on_signal(signum, frame):
    global _signalled
    _signalled = True
    print(f"toy: rank {os.environ.get('RANK')} got signal {signal.Signals(signum).name}", flush=True)


def _env_from_slurm() -> None:
    """Fill torchrun's variables from SLURM's when launched by a plain `srun`."""
    if "RANK" in os.environ or "SLURM_PROCID" not in os.environ:
        return
    os.environ["RANK"] = os.environ["SLURM_PROCID"]
    os.environ["WORLD_SIZE"] = os.environ["SLURM_NTASKS"]
    os.environ["LOCAL_RANK"] = os.environ["SLURM_LOCALID"]
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29555")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("run_dir")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--save-interval", type=int, default=5)
    ap.add_argument("--step-seconds", type=float, default=0.1)
    a = ap.parse_args()
    signal.signal(signal.SIGUSR1, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)
    _env_from_slurm()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    run = Path(a.run_dir)
    run.mkdir(parents=True, exist_ok=True)
    latest = run / "latest"
    start, value = 0, torch.zeros(1, dtype=torch.float64)
    if latest.exists():
        state = json.loads((run / latest.read_text().strip() / "state.json").read_text())
        start, value = state["step"], torch.tensor([state["value"]], dtype=torch.float64)
        print(f"toy: rank {rank} resumed from step {start}", flush=True)
    print(f"toy: rank {rank}/{world} host {socket.gethostname()} node {os.environ.get('SLURMD_NODENAME', '-')} "
          f"pid {os.getpid()} restart {os.environ.get('TORCHELASTIC_RESTART_COUNT', '-')}", flush=True)

    def save(step: int) -> None:
        if rank == 0:
            d = run / f"step_{step:07d}"
            d.mkdir(exist_ok=True)
            (d / "state.json").write_text(json.dumps({"step": step, "value": float(value)}))
            tmp = run / "latest.tmp"
            tmp.write_text(d.name)
            tmp.replace(latest)
        dist.barrier()

    for step in range(start + 1, a.steps + 1):
        contrib = torch.tensor([float(rank + 1) * step], dtype=torch.float64)
        dist.all_reduce(contrib)
        value += contrib / 100.0
        loss = 1.0 / (1.0 + float(value))
        if rank == 0:
            with open(run / "metrics.jsonl", "a") as f:
                f.write(json.dumps({"step": step, "loss": loss}) + "\n")
            print(f"toy: step {step} loss {loss:.6f}", flush=True)
        if a.save_interval and step % a.save_interval == 0:
            save(step)
        stop = torch.tensor([1 if _signalled else 0])
        dist.all_reduce(stop, op=dist.ReduceOp.MAX)
        if stop.item():
            save(step)
            print(f"toy: rank {rank} preempted at step {step}", flush=True)
            dist.destroy_process_group()
            return PREEMPTED
        time.sleep(a.step_seconds)
    save(a.steps)
    if rank == 0:
        (run / "done").write_text(str(a.steps))
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
