"""`pkm pretrain`: the training entry point (torchrun, SLURM srun, or a single process)."""
from __future__ import annotations

import argparse


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
    p.set_defaults(func=run_pretrain)


def run_pretrain(args: argparse.Namespace) -> int:
    from pretrain.config import load_config

    overrides = list(args.overrides)
    if args.resume:
        overrides.append(f"checkpoint.resume={args.resume}")
    if args.init_from:
        overrides.append(f"checkpoint.init_from={args.init_from}")
    cfg = load_config(args.config, overrides)  # config errors before any heavy import
    from data_pipeline.outputs import check_writable

    check_writable(cfg.run_dir)
    if cfg.checkpoint.resume not in (None, "auto"):  # a path that names no checkpoint: before start-up
        from pretrain.checkpoint import resolve_checkpoint

        resolve_checkpoint(cfg.checkpoint.resume)
    from pretrain.distributed import shutdown
    from pretrain.trainer import Trainer

    trainer = Trainer(cfg)
    try:
        code = trainer.train()
        if code == 0 and trainer.env.is_main:
            _print_summary(trainer)
        return code
    finally:
        shutdown()


def _print_summary(trainer) -> None:
    from pretrain.checkpoint import resolve_checkpoint

    f = trainer.final
    run = trainer.run_dir
    lines = [f"pretraining finished: {f['step']} steps",
             f"  loss: {f['first_loss']:.4f} at the first step -> {f['final_loss']:.4f} at the last"]
    for k, v in f.get("usage", {}).items():
        lines.append(f"  {k}: {v:.2f}")
    lines += [f"  TensorBoard: tensorboard --logdir {run / 'tensorboard'}",
              f"  checkpoint:  {resolve_checkpoint(run)}",
              f"  log:         {run / 'logs' / 'train.log'}"]
    print("\n".join(lines), flush=True)
