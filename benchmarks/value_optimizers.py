"""Quality and memory of the value optimizers (issue #15): the same model, data and steps trained with
each `model.pkm.value_optimizer` (and rowwise_adagrad with bf16 tables), held-out loss compared.

Each variant is one `pkm pretrain` process (CPU, one rank); the held-out loss is the trainer's own
"valid loss" at the last step (the same validation batches for every variant); memory is the trainer's
memory report (value shard and value-optimizer bytes) and the process's peak RSS (VmHWM).
Models: `--family gpt`: configs/demo_gpt.yaml (the demo model, `--steps` of its 300);
`--family bert`: a configs/tiny_bert.yaml-shaped PKM-BERT (masked LM) on the bundled Austen corpus.
--quick: configs/tiny_gpt.yaml, 20 steps.
--json keys: per variant "<family>/<variant>": {valid_loss, gap_vs_adam (relative), value_bytes,
value_mib, value_optimizer_mib (the trainer's memory report), peak_rss_gb, seconds}.

    python benchmarks/value_optimizers.py [--quick] [--json] [--family gpt|bert] [--steps N]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.common import emit, log  # noqa: E402

VARIANTS = {
    "adam": ["model.pkm.value_optimizer=adam"],
    "rowwise_adagrad": ["model.pkm.value_optimizer=rowwise_adagrad"],
    "rowwise_adagrad_bf16": ["model.pkm.value_optimizer=rowwise_adagrad", "model.pkm.value_dtype=bf16"],
    "rowwise_adam": ["model.pkm.value_optimizer=rowwise_adam"],
}


def train(config: str, overrides: list[str], run_dir: Path) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "pkm",
        "pretrain",
        "--config",
        str(ROOT / "configs" / config),
        f"run_dir={run_dir}",
        f"data.cache_dir={run_dir.parent / 'cache'}",
        "logging.tensorboard=false",
        "checkpoint.save_interval=0",
        *overrides,
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONWARNINGS": "ignore"}
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak = 0
    while p.poll() is None:  # peak RSS of the one training process
        try:
            m = re.search(r"VmHWM:\s+(\d+) kB", Path(f"/proc/{p.pid}/status").read_text())
            peak = max(peak, int(m.group(1)) * 1024) if m else peak
        except OSError:
            pass
        time.sleep(0.2)
    out = p.stdout.read()
    if p.returncode != 0:
        sys.stderr.write(out[-4000:])
        raise SystemExit(f"{run_dir.name} failed with exit code {p.returncode}")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    valid = [r for r in rows if "valid loss" in r]
    text = (run_dir / "logs" / "train.log").read_text()
    m = re.search(r"value shard ([\d.]+) MiB .* value optimizer ([\d.]+) MiB", text)
    return {
        "valid_loss": valid[-1]["valid loss"],
        "valid_step": valid[-1]["step"],
        "value_mib": float(m.group(1)),
        "value_optimizer_mib": float(m.group(2)),
        "peak_rss_gb": round(peak / 1e9, 3),
        "seconds": round(time.perf_counter() - t0, 1),
    }


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="configs/tiny_gpt.yaml, 20 steps")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--family", choices=["gpt", "bert"], default="gpt")
    ap.add_argument("--steps", type=int, default=300, help="training steps of every variant")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of " + ",".join(VARIANTS))
    args = ap.parse_args(argv)
    if args.quick:
        config, common = "tiny_gpt.yaml", ["train.train_steps=20", "train.eval_interval=20", "train.eval_steps=4"]
    elif args.family == "gpt":
        config, common = (
            "demo_gpt.yaml",
            [f"train.train_steps={args.steps}", f"train.eval_interval={args.steps}", "train.eval_steps=16"],
        )
    else:
        config, common = (
            "tiny_bert.yaml",
            [
                f"train.train_steps={args.steps}",
                f"train.eval_interval={args.steps}",
                "train.eval_steps=16",
                f"train.warmup_steps={max(2, args.steps // 10)}",
            ],
        )
    work = Path(tempfile.mkdtemp(prefix="pkm-value-opt-"))
    result = {"config": config, "steps": 20 if args.quick else args.steps}
    for name in args.variants.split(","):
        log(f"{name}: training {config} ...")
        r = train(config, common + VARIANTS[name], work / name)
        log(f"{name}: {r}")
        result[name] = r
    if "adam" in result:
        for name in VARIANTS:
            if name in result and name != "adam":
                result[name]["gap_vs_adam"] = round(
                    (result[name]["valid_loss"] - result["adam"]["valid_loss"]) / result["adam"]["valid_loss"], 5
                )
    result["date"] = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    return emit(result, args.json)


if __name__ == "__main__":
    main()
