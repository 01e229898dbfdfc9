"""pretrain's commands: `pkm pretrain`, `pkm export hf`, `pkm finetune`. The handlers only parse and call
the package's functions (`pretrain.trainer.pretrain`, the export and finetune functions)."""
from __future__ import annotations

import argparse

from pretrain import export_cli


def register(sub) -> None:
    p = sub.add_parser("pretrain", help="pretrain a PKM GPT/BERT model",
                       description="Pretrain a megatron-core GPT/BERT with PKM layers under DeepSpeed. "
                                   "Run it directly, under torchrun, or under SLURM srun.")
    p.add_argument("--config", help="YAML run config (see configs/)")
    p.add_argument("overrides", nargs="*", help="config overrides, e.g. train.train_steps=100 model.pkm.layers=[2]")
    p.add_argument("--resume", metavar="auto|DIR", help="= checkpoint.resume: 'auto' (latest good checkpoint "
                   "of run_dir, else start fresh) or a checkpoint directory")
    p.add_argument("--init-from", metavar="DIR", help="= checkpoint.init_from: a Hugging Face BERT/GPT-2/Llama "
                   "directory or a checkpoint of a memory-free run of ours; PKM layers start fresh")
    p.set_defaults(func=cmd_pretrain)
    export_cli.register(sub)


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
        lines = [f"pretraining finished: {result.step} steps",
                 f"  loss: {result.first_loss:.4f} at the first step -> {result.final_loss:.4f} at the last"]
    for k, v in result.usage.items():
        lines.append(f"  {k}: {v:.2f}")
    lines += [f"  TensorBoard: tensorboard --logdir {run / 'tensorboard'}",
              f"  checkpoint:  {result.checkpoint}",
              f"  log:         {run / 'logs' / 'train.log'}"]
    print("\n".join(lines), flush=True)
