"""Quality and memory of the value optimizers (issue #15): the same model, data and steps trained with
each `model.pkm.value_optimizer` (and rowwise_adagrad with bf16 tables), held-out loss compared.

Each variant is one `pkm pretrain` process (CPU, one rank); the held-out loss is the trainer's own
"valid loss" at the last step (the same validation batches for every variant); memory is the trainer's
memory report (value shard and value-optimizer bytes) and the process's peak RSS (VmHWM).
Models: `--family gpt`: configs/demo_gpt.yaml (the demo model, `--steps` of its 300);
`--family bert`: a configs/tiny_bert.yaml-shaped PKM-BERT (masked LM) on the bundled Austen corpus.
--quick: configs/tiny_gpt.yaml, QUICK_STEPS steps. Variants run VARIANTS_AT_ONCE at a time, one torch thread each.
--json keys: per variant "<variant>": {valid_loss, valid_step, gap_vs_adam (relative), value_mib,
value_optimizer_mib (the trainer's memory report), peak_rss_gb, seconds}; config, steps, date, wall_seconds,
load_average (1, 5, 15 min at the end).

`--recipe kim_jung`: the Kim & Jung recipe's recommended arm instead (benchmarks/kim_jung.py: `minilm_add`,
all-MiniLM-L6-v2 with a PKM added to the FFN of layer 4, masked LM on the recipe's corpus, its FULL sizes;
`--quick`: its QUICK sizes), trained by kim_jung's own pretrain() once per variant, no finetune, VARIANTS_AT_ONCE
runs at a time (--quick: in this process, one after the other). Per variant (read from the run's
metrics.jsonl by kim_jung.summarise and its last checkpoint's manifest): mlm_loss, usage_updated_pct,
slots_read_pct, top1_read_pct, kl_uniform, tokens_per_second, bytes_per_value_param (value table +
value-optimizer state over the table's values), gap_vs_adam, seconds.

    python benchmarks/value_optimizers.py [--quick] [--json] [--family gpt|bert] [--steps N]
    python benchmarks/value_optimizers.py --recipe kim_jung [--quick] [--json] [--out DIR] [--results FILE.json]
"""

from __future__ import annotations

import argparse
import concurrent.futures
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
# Runs side by side, one torch thread each (kim_jung.pkm sets OMP_NUM_THREADS=1 too): most of a short run is
# the process's start-up (imports), which one thread does anyway.
VARIANTS_AT_ONCE = 2
QUICK_STEPS = 8  # --quick: configs/tiny_gpt.yaml, this many steps (the held-out loss at the last one)


def train(config: str, overrides: list[str], run_dir: Path) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "pkm",
        "pretrain",
        "--config",
        str(ROOT / "configs" / config),
        f"run_dir={run_dir}",
        f"data.cache_dir={run_dir.parent / 'cache'}",  # one demo corpus: the first variant builds it, the others wait
        "logging.tensorboard=false",
        "checkpoint.save_interval=0",
        *overrides,
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
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


def recipe_kim_jung(quick: bool, variants: list[str], out: Path | None) -> dict:
    """The recipe's minilm_add arm once per value-optimizer variant: the same corpus, sizes and seed."""
    from benchmarks import kim_jung

    sizes = dict(kim_jung.QUICK if quick else kim_jung.FULL)
    arm = next(a for a in kim_jung.ARMS if a.name == "minilm_add")
    work = (out or ROOT / "runs" / ("value_optimizers_kim_jung" + ("_quick" if quick else ""))).resolve()
    tokenizer = kim_jung.minilm_dir()
    # --quick: in this process, one after the other (the imports are paid once, as kim_jung --quick does)
    runner = kim_jung.Runner(in_process=quick)
    data = kim_jung.corpus(work, tokenizer, kim_jung.QUICK_BOOKS if quick else kim_jung.BOOKS, runner)

    def one(name: str) -> dict:
        t0 = time.perf_counter()
        run = kim_jung.pretrain(arm, sizes, work / name, data, tokenizer, VARIANTS[name], runner)
        r = kim_jung.summarise(run, sizes["window"])
        # bytes in the trainer's memory report, saved in every checkpoint's manifest
        latest = (run / "checkpoints" / "latest").read_text().strip()
        mem = json.loads((run / "checkpoints" / latest / "manifest.json").read_text())["sizes"]
        element = 2 if "model.pkm.value_dtype=bf16" in VARIANTS[name] else 4
        r["bytes_per_value_param"] = round(
            (mem["value_shard_bytes"] + mem["value_optimizer_bytes"]) / (mem["value_shard_bytes"] / element), 4
        )
        r["seconds"] = round(time.perf_counter() - t0, 1)
        log(f"{name}: held-out MLM loss {r['mlm_loss']}, {r['bytes_per_value_param']} bytes per value")
        return r

    if runner.in_process:
        runs = {name: one(name) for name in variants}
    else:
        with concurrent.futures.ThreadPoolExecutor(VARIANTS_AT_ONCE) as pool:
            runs = dict(zip(variants, pool.map(one, variants)))
    return {
        "recipe": "kim_jung",
        "arm": arm.name,
        "config": str(kim_jung.CONFIG.relative_to(ROOT)),
        "sizes": sizes,
        **runs,
    }


def train_family(quick: bool, family: str, steps: int, variants: list[str]) -> dict:
    """The demo GPT (or the tiny PKM-BERT, or with `quick` the tiny GPT) once per variant."""
    if quick:
        config, common = (
            "tiny_gpt.yaml",
            [f"train.train_steps={QUICK_STEPS}", f"train.eval_interval={QUICK_STEPS}", "train.eval_steps=2"],
        )
    elif family == "gpt":
        config, common = (
            "demo_gpt.yaml",
            [f"train.train_steps={steps}", f"train.eval_interval={steps}", "train.eval_steps=16"],
        )
    else:
        config, common = (
            "tiny_bert.yaml",
            [
                f"train.train_steps={steps}",
                f"train.eval_interval={steps}",
                "train.eval_steps=16",
                f"train.warmup_steps={max(2, steps // 10)}",
            ],
        )
    log(f"training {config} with {', '.join(variants)}, {VARIANTS_AT_ONCE} at a time ...")
    with tempfile.TemporaryDirectory(prefix="pkm-value-opt-") as tmp:  # the runs are read, then removed
        work = Path(tmp)
        with concurrent.futures.ThreadPoolExecutor(VARIANTS_AT_ONCE) as pool:
            runs = dict(
                zip(variants, pool.map(lambda name: train(config, common + VARIANTS[name], work / name), variants))
            )
    for name, r in runs.items():
        log(f"{name}: {r}")
    return {"config": config, "steps": QUICK_STEPS if quick else steps, **runs}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help=f"configs/tiny_gpt.yaml, {QUICK_STEPS} steps")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--family", choices=["gpt", "bert"], default="gpt")
    ap.add_argument("--steps", type=int, default=300, help="training steps of every variant")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of " + ",".join(VARIANTS))
    ap.add_argument("--recipe", choices=["kim_jung"], default=None, help="the Kim & Jung recipe's minilm_add arm")
    ap.add_argument("--out", type=Path, default=None, help="--recipe: working directory (finished runs are reused)")
    ap.add_argument("--results", type=Path, default=None, help="also write the JSON object to this file")
    args = ap.parse_args(argv)
    t_start = time.perf_counter()
    variants = args.variants.split(",")
    if args.recipe:
        result, loss = recipe_kim_jung(args.quick, variants, args.out), "mlm_loss"
    else:
        result, loss = train_family(args.quick, args.family, args.steps, variants), "valid_loss"
    if "adam" in result:
        for name in variants:
            if name != "adam":
                result[name]["gap_vs_adam"] = round(
                    (result[name][loss] - result["adam"][loss]) / result["adam"][loss], 5
                )
    result["date"] = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    result["wall_seconds"] = round(time.perf_counter() - t_start, 1)
    result["load_average"] = list(os.getloadavg())
    if args.results:
        args.results.parent.mkdir(parents=True, exist_ok=True)
        args.results.write_text(json.dumps(result, indent=1) + "\n")
    return emit(result, args.json)


if __name__ == "__main__":
    main()
