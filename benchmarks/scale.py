"""A billion-parameter value table on one box (issue #17): memory per rank while training at world 4,
resuming at world 2, and exporting.

The pipeline, every stage a real process (`torchrun` of `pkm pretrain`, gloo, CPU; then `pkm export hf`):
  A  world 4 trains 4 steps, the table split over all 4 ranks (memory_parallel=dp), saving step 3 (and 4):
     its step 4 is the world-4 continuation
  C  world 2 resumes step 3 (resharding every table 4 -> 2) and trains steps 4 and 5
  E  `pkm export hf` of A's checkpoint, then `transformers` loads the export and runs a forward
The driver samples each rank's VmHWM (the kernel's peak resident set) from /proc every 0.1 s.
Model: GPT, 2 layers, hidden = value dim 1024, 8 heads, seq 32, one PKM at layer 1 with n_keys 1024
(1,048,576 slots x 1024 = 1.07e9 value parameters, 4.3 GB fp32); --quick: hidden 256, n_keys 256
(16.8e6 value parameters), the same pipeline. The FFN is as wide as the hidden size (not 4x) so the
dense model (~21e6 parameters, its Adam moments gathered whole at each save) stays small beside the
table whose handling is measured.
--json keys:
  value_params          parameters of the value table
  value_optimizer, value_dtype  --value-optimizer (model.pkm.value_optimizer), --value-dtype
  table_gb              its size in its dtype (1e9 bytes)
  checkpoint_gb         the size of A's step-3 checkpoint
  shard_gb_w4, _w2      one rank's value shard + its value-optimizer state ((table + state) / world)
  max_value_params_rowwise  value_params, in a run with a row-wise value optimizer (issue #15)
  peak_rss_gb_w4, _w2   largest rank's peak RSS in A (init, train, save) and in C (load included)
  rss_over_shard_w4, _w2  peak_rss_gb_wN / shard_gb_wN      (goal at >= 1e9: <= 1.5)
  init_s_w4             model build in A (value-table init included), from rank 0's log
  save_s                the step-3 save in A, from rank 0's log
  resume_loss_diff      |loss(step 4, C) - loss(step 4, A)| / loss(step 4, A)   (goal: <= 1e-5)
  export_peak_rss_gb    peak RSS of `pkm export hf`    (goal: <= table_gb / 2)
  export_s              wall time of `pkm export hf`
  stage_s               wall time of each stage
A process's fixed part (python, torch, megatron, deepspeed: ~1 GB) is inside every RSS figure; at
--quick sizes it dominates the ratios, which are then not goals.

    python benchmarks/scale.py [--quick] [--json] [--workdir DIR] [--keep]
                               [--value-optimizer adam|rowwise_adagrad|rowwise_adam] [--value-dtype fp32|bf16]
                               [--n-keys N]
The largest tables of issue #15: `--value-optimizer rowwise_adagrad --value-dtype bf16 --n-keys 2000`
(4.1e9 values, 8.2 GB); with adam, ~1.3e9 is this machine's limit (12 bytes per value).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.common import free_port, log  # noqa: E402

FULL = {"hidden": 1024, "n_keys": 1024, "heads": 8}
QUICK = {"hidden": 256, "n_keys": 256, "heads": 4}


def overrides(
    size: dict, run_dir: Path, cache: Path, world: int, steps: int, resume: Path | None, save_interval: int = 0
) -> list[str]:
    """`size`: hidden, n_keys, heads, value_optimizer, value_dtype."""
    out = [
        "model.num_layers=2",
        f"model.hidden_size={size['hidden']}",
        f"model.ffn_hidden_size={size['hidden']}",
        f"model.num_attention_heads={size['heads']}",
        "model.seq_length=32",
        "model.pkm.layers=[1]",
        f"model.pkm.n_keys={size['n_keys']}",
        "model.pkm.heads=2",
        "model.pkm.knn=8",
        "model.pkm.k_dim=64",
        f"model.pkm.value_optimizer={size['value_optimizer']}",
        f"model.pkm.value_dtype={size['value_dtype']}",
        "parallel.tensor_parallel=1",
        "parallel.memory_parallel=dp",
        "train.zero_stage=1",
        "train.precision=fp32",
        "train.global_batch_size=4",
        f"train.micro_batch_size={4 // world}",
        f"train.train_steps={steps}",
        "train.warmup_steps=1",
        "train.eval_interval=0",
        "logging.tensorboard=false",
        "logging.progress=false",
        "logging.log_interval=1",
        f"checkpoint.save_interval={save_interval}",
        "checkpoint.keep_last=2",
        f"run_dir={run_dir}",
        f"data.cache_dir={cache}",
    ]
    return out + ([f"checkpoint.resume={resume}"] if resume else [])


class PeakRSS:
    """Samples VmHWM (peak RSS, kB) of every descendant of `root_pid` until stopped."""

    def __init__(self, root_pid: int):
        self.root, self.peaks, self._stop = root_pid, {}, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _children(self, pid: int) -> list[int]:
        try:
            with open(f"/proc/{pid}/task/{pid}/children") as f:
                return [int(x) for x in f.read().split()]
        except OSError:
            return []

    def _run(self) -> None:
        while not self._stop.is_set():
            todo, seen = self._children(self.root), []
            while todo:
                pid = todo.pop()
                seen.append(pid)
                todo += self._children(pid)
            for pid in seen + [self.root]:
                try:
                    status = open(f"/proc/{pid}/status").read()
                except OSError:
                    continue
                m = re.search(r"VmHWM:\s+(\d+) kB", status)
                if m:
                    self.peaks[pid] = max(self.peaks.get(pid, 0), int(m.group(1)) * 1024)
            time.sleep(0.1)

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join()
        return self.peaks


def run(cmd: list[str], what: str) -> tuple[float, dict, str]:
    """Run `cmd`; returns (seconds, {pid: peak RSS bytes} of it and its descendants, output)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PYTHONWARNINGS": "ignore"}
    log(f"{what}: {' '.join(cmd[:6])} ...")
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    rss = PeakRSS(p.pid)
    out = p.communicate()[0]
    peaks = rss.stop()
    secs = time.perf_counter() - t0
    if p.returncode != 0:
        sys.stderr.write(out[-6000:])
        raise SystemExit(f"{what} failed with exit code {p.returncode}")
    log(f"{what}: {secs:.1f} s, largest process peak RSS {max(peaks.values(), default=0) / 1e9:.2f} GB")
    return secs, peaks, out


def pretrain(
    world: int,
    size: dict,
    run_dir: Path,
    cache: Path,
    steps: int,
    resume: Path | None,
    what: str,
    save_interval: int = 0,
):
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={world}", f"--master_port={free_port()}"]
    cmd += ["-m", "pkm", "pretrain", "--config", str(ROOT / "configs" / "tiny_gpt.yaml")]
    cmd += overrides(size, run_dir, cache, world, steps, resume, save_interval)
    secs, peaks, _ = run(cmd, what)
    # The ranks are torchrun's children; the largest of them (torchrun itself is small).
    return secs, max(peaks.values())


def losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {r["step"]: r["lm loss"] for r in rows if "lm loss" in r}


def _stamp(line: str) -> float:
    return datetime.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()


def log_interval(run_dir: Path, start: str, end: str) -> float:
    """Seconds between the first rank-0 log line containing `start` and the next containing `end`."""
    lines = (run_dir / "logs" / "train.log").read_text().splitlines()
    i = next(i for i, line in enumerate(lines) if start in line)
    j = next(j for j in range(i + 1, len(lines)) if end in lines[j])
    return _stamp(lines[j]) - _stamp(lines[i])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a 16.8e6-parameter table (the same pipeline)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--workdir", help="where runs and checkpoints go (default: a temporary directory)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument(
        "--value-optimizer",
        default="adam",
        choices=["adam", "rowwise_adagrad", "rowwise_adam"],
        help="model.pkm.value_optimizer (bytes per value parameter: 12 / ~4 / ~8 in fp32)",
    )
    ap.add_argument("--value-dtype", default="fp32", choices=["fp32", "bf16"], help="model.pkm.value_dtype")
    ap.add_argument("--n-keys", type=int, help="the table has n_keys**2 x hidden values (default: 1024; --quick 256)")
    args = ap.parse_args()
    size = {**(QUICK if args.quick else FULL), "value_optimizer": args.value_optimizer, "value_dtype": args.value_dtype}
    if args.n_keys:
        size["n_keys"] = args.n_keys
    work = Path(args.workdir or tempfile.mkdtemp(prefix="pkm-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    cache = work / "cache"
    value_params = size["n_keys"] ** 2 * size["hidden"]
    table_gb = value_params * (2 if args.value_dtype == "bf16" else 4) / 1e9
    # the optimizer's state in GB: two fp32 moments per value (adam), one per value + one per row
    # (rowwise_adam), one fp32 per row (rowwise_adagrad)
    per_value = {"adam": 8, "rowwise_adam": 4, "rowwise_adagrad": 0}[args.value_optimizer]
    optimizer_gb = (value_params * per_value + (size["n_keys"] ** 2 * 4 if args.value_optimizer != "adam" else 0)) / 1e9
    log(
        f"value table {value_params:.3e} parameters ({table_gb:.2f} GB {args.value_dtype}, {args.value_optimizer} "
        f"state {optimizer_gb:.2f} GB); work dir {work}"
    )
    t_all = time.perf_counter()
    stage = {}
    try:
        a, c = work / "w4", work / "w2_resumed"
        stage["A_w4_train_save"], peak_w4 = pretrain(
            4, size, a, cache, 4, None, "A: world 4, 4 steps, save at 3", save_interval=3
        )
        ckpt = a / "checkpoints" / "step_0000003"
        shutil.rmtree(a / "checkpoints" / "step_0000004", ignore_errors=True)
        stage["C_w2_resume"], peak_w2 = pretrain(2, size, c, cache, 5, ckpt, "C: world 2 resumes, steps 4-5")
        shutil.rmtree(c / "checkpoints", ignore_errors=True)
        out = work / "hf"
        export_s, export_peaks, _ = run(
            [sys.executable, "-m", "pkm", "export", "hf", str(ckpt), str(out), "--overwrite"], "E: pkm export hf"
        )
        stage["E_export"] = export_s
        load = (
            "import sys, torch\nfrom transformers import AutoModelForCausalLM\n"
            "m = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True).eval()\n"
            "with torch.no_grad():\n    y = m(torch.arange(16).view(1, 16)).logits\n"
            "assert torch.isfinite(y).all()\nprint('loaded', sum(p.numel() for p in m.parameters()))\n"
        )
        stage["F_transformers_load"], _, loaded = run([sys.executable, "-c", load, str(out)], "F: transformers load")
        step4_a, step4_c = losses(a)[4], losses(c)[4]
        shard_w4, shard_w2 = (table_gb + optimizer_gb) / 4, (table_gb + optimizer_gb) / 2
        result = {
            "quick": args.quick,
            "value_optimizer": args.value_optimizer,
            "value_dtype": args.value_dtype,
            "value_params": value_params,
            "table_gb": round(table_gb, 3),
            "checkpoint_gb": round(sum(f.stat().st_size for f in ckpt.rglob("*") if f.is_file()) / 1e9, 3),
            "shard_gb_w4": round(shard_w4, 3),
            "shard_gb_w2": round(shard_w2, 3),
            "peak_rss_gb_w4": round(peak_w4 / 1e9, 3),
            "peak_rss_gb_w2": round(peak_w2 / 1e9, 3),
            "rss_over_shard_w4": round(peak_w4 / 1e9 / shard_w4, 3),
            "rss_over_shard_w2": round(peak_w2 / 1e9 / shard_w2, 3),
            "init_s_w4": round(log_interval(a, "world 4 = ", " memory: "), 2),
            "save_s": round(log_interval(a, "step 3/4", "saved checkpoint"), 2),
            "resume_loss_diff": abs(step4_c - step4_a) / abs(step4_a),
            "loss_step4_w4": step4_a,
            "loss_step4_w2": step4_c,
            "export_peak_rss_gb": round(max(export_peaks.values()) / 1e9, 3),
            "export_s": round(export_s, 1),
            "exported_params": int(loaded.split()[-1]),
            "stage_s": {k: round(v, 1) for k, v in stage.items()},
            "total_s": round(time.perf_counter() - t_all, 1),
            "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, "
            f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB",
        }
        if args.value_optimizer != "adam":  # the table this run trained, saved, resumed and exported
            result["max_value_params_rowwise"] = value_params
        if not args.quick:
            result["goals"] = {
                "rss_over_shard_w4 <= 1.5": result["rss_over_shard_w4"] <= 1.5,
                "rss_over_shard_w2 <= 1.5": result["rss_over_shard_w2"] <= 1.5,
                "resume_loss_diff <= 1e-5": result["resume_loss_diff"] <= 1e-5,
                "export_peak_rss_gb <= table_gb / 2": result["export_peak_rss_gb"] <= table_gb / 2,
            }
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    for k, v in result.items():
        log(f"{k:>22}: {v}")
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
