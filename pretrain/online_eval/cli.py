"""`pkm eval online ...` (dynamic evaluation) and `pkm eval lm-eval-data ...` (documents for lm-eval).

The handlers only parse: `pkm eval online` builds an `OnlineEvalJob` and calls `run_online_eval`
(pretrain.online_eval.evaluate). Heavy imports (torch, transformers) happen inside the command functions.
"""

from __future__ import annotations

import argparse
import itertools
import json

from data_pipeline.argtypes import non_negative_float, positive_float, positive_int
from pretrain.online_eval.config import ADAPTS, MODES, OPTIMIZERS, RESETS, STRATEGIES, OnlineEvalConfig, OnlineEvalJob


def register(subparsers) -> None:
    ev = subparsers.add_parser("eval", help="evaluation: online (dynamic) evaluation, lm-eval task data")
    sub = ev.add_subparsers(dest="eval_command", required=True, metavar="<eval command>")

    p = sub.add_parser("online", help="static vs dynamic evaluation (score each chunk, then learn from it)")
    p.description = cmd_online.__doc__
    p.add_argument(
        "--model",
        required=True,
        help="HF model directory (trust_remote_code), a .gguf file, `smollm2`, or a native checkpoint dir",
    )
    p.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the model's)")
    p.add_argument(
        "--corpus",
        default="books",
        help="`books`, `books:NAME,...`, a .txt/.jsonl file, a directory of .txt, or an indexed-dataset prefix",
    )
    p.add_argument("--json-key", default="text", help="text field of .jsonl records")
    p.add_argument("--max-docs", type=positive_int, default=None)
    p.add_argument("--max-tokens", type=positive_int, default=None, help="at most this many tokens of each document")
    p.add_argument("--modes", nargs="+", choices=MODES, default=["static", "dynamic"])
    p.add_argument("--strategies", nargs="+", choices=STRATEGIES, default=["txl"])
    p.add_argument("--adapt", nargs="+", choices=ADAPTS, default=["all"], help="what dynamic runs adapt")
    p.add_argument("--optimizer", nargs="+", choices=OPTIMIZERS, default=["sgd"])
    p.add_argument("--lr", nargs="+", type=float, default=[1e-4])
    p.add_argument("--reset", choices=RESETS, default="per-document")
    p.add_argument("--update-every", type=int, default=1, help="gradient step on every k-th chunk only")
    p.add_argument("--chunk", type=int, default=256, help="txl chunk length / overlapping stride S")
    p.add_argument("--window", type=int, default=512, help="overlapping window length L")
    p.add_argument(
        "--sink",
        type=int,
        default=4,
        help="txl: keep the document's first N tokens in the memory (attention sinks; 0: none)",
    )
    p.add_argument("--weight-decay", type=non_negative_float, default=0.0)
    p.add_argument("--rms-decay", type=float, default=0.0, help="rms: pull towards the initial weights (lambda)")
    p.add_argument(
        "--rms-calibration",
        default=None,
        metavar="CORPUS",
        help="rms: mean squared gradients from this corpus (Krause: training data); default: running",
    )
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--lora-alpha", type=positive_float, default=16.0)
    p.add_argument("--lora-targets", nargs="+", default=None, help="module names (default: peft's per architecture)")
    p.add_argument(
        "--doc-start", default="auto", help="token read before each document: auto (bos/eos), none, or an id"
    )
    p.add_argument("--position-bin", type=int, default=1024, help="bin width of the loss-by-position curve")
    p.add_argument(
        "--interleave",
        action="store_true",
        help="run all configurations chunk by chunk side by side (one model copy each): fair timings "
        "on a shared machine",
    )
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads")
    p.add_argument("--out", default="runs/online_eval", help="writes results.json, loss_by_position.png, tensorboard/")
    p.add_argument("--json", action="store_true", help="print the JSON summary as the last line")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_online)

    p = sub.add_parser("lm-eval-data", help="write documents as jsonl for the local lm-eval task (configs/lm_eval)")
    p.add_argument("--corpus", default="books")
    p.add_argument("--json-key", default="text")
    p.add_argument("--out", default="runs/lm_eval/books.jsonl")
    p.set_defaults(func=cmd_lm_eval_data)


def configs_from_args(args: argparse.Namespace) -> list[OnlineEvalConfig]:
    common = dict(
        chunk=args.chunk,
        window=args.window,
        sink=args.sink,
        reset=args.reset,
        update_every=args.update_every,
        weight_decay=args.weight_decay,
        rms_decay=args.rms_decay,
        lora_rank=args.lora_rank,
        lora_alpha=args.lora_alpha,
        lora_targets=args.lora_targets,
        doc_start=args.doc_start,
        position_bin=args.position_bin,
    )
    out = []
    for mode in args.modes:
        for strategy in args.strategies:
            if mode == "static":
                out.append(OnlineEvalConfig(mode=mode, strategy=strategy, **common).validate())
                continue
            for adapt, opt, lr in itertools.product(args.adapt, args.optimizer, args.lr):
                out.append(
                    OnlineEvalConfig(
                        mode=mode, strategy=strategy, adapt=adapt, optimizer=opt, lr=lr, **common
                    ).validate()
                )
    return out


def job_from_args(args: argparse.Namespace) -> OnlineEvalJob:
    return OnlineEvalJob(
        model=args.model,
        runs=configs_from_args(args),
        corpus=args.corpus,
        tokenizer=args.tokenizer,
        json_key=args.json_key,
        max_docs=args.max_docs,
        max_tokens=args.max_tokens,
        rms_calibration=args.rms_calibration,
        interleave=args.interleave,
        device=args.device,
        dtype=args.dtype,
        threads=args.threads,
        out=args.out,
        progress=not args.no_progress,
    )


def cmd_online(args: argparse.Namespace) -> int:
    """One run per combination of --modes x --strategies (x --adapt x --optimizer x --lr for dynamic runs), all over
    the same documents, compared in one table."""
    from pathlib import Path

    from pretrain.log import setup_logging
    from pretrain.online_eval import report
    from pretrain.online_eval.evaluate import run_online_eval

    setup_logging()
    results, summary = run_online_eval(job_from_args(args))
    out = Path(args.out)
    print(report.table(results))
    print(f"wrote {out / 'results.json'}, {out / 'loss_by_position.png'}, {out / 'tensorboard'}")
    if args.json:
        print(json.dumps(summary))
    return 0


def cmd_lm_eval_data(args: argparse.Namespace) -> int:
    from pretrain.online_eval.corpus import load_corpus
    from pretrain.online_eval.lm_eval_task import write_documents

    docs = load_corpus(args.corpus, args.json_key)
    path = write_documents(docs, args.out)
    print(f"{path}: {len(docs)} documents")
    return 0
