"""`pkm pretrain`: the training entry point (torchrun, SLURM srun, or a single process)."""
from __future__ import annotations

import argparse
from pathlib import Path


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
    check_inputs(cfg)
    from pretrain.distributed import shutdown
    from pretrain.trainer import Trainer

    trainer = Trainer(cfg)
    try:
        result = trainer.train()
        if result.exit_code == 0 and trainer.env.is_main:
            _print_summary(result, trainer.run_dir)
        return result.exit_code
    finally:
        shutdown()


def check_inputs(cfg) -> None:
    """What the run reads and writes, checked before anything is built: one-line errors naming the key."""
    from data_pipeline.outputs import OutputError, check_writable
    from data_pipeline.preprocess import check_files
    from data_pipeline.tokenizer import BUNDLED
    from pretrain.checkpoint import resolve_checkpoint
    from pretrain.config import ConfigError

    for key, path, kind in (("checkpoint.init_from", cfg.checkpoint.init_from, "dir"),
                            ("checkpoint.resume", None if cfg.checkpoint.resume == "auto" else cfg.checkpoint.resume,
                             "dir"),
                            ("data.tokenizer", None if cfg.data.tokenizer in BUNDLED else cfg.data.tokenizer, "any")):
        if path is None:
            continue
        p = Path(path)
        if not p.exists():
            raise ConfigError(f"{key}: {p} does not exist")
        if kind == "dir" and not p.is_dir():
            raise ConfigError(f"{key}: {p} is a file, not a checkpoint or model directory")
    if cfg.checkpoint.resume not in (None, "auto"):  # a path that names no checkpoint
        resolve_checkpoint(cfg.checkpoint.resume)
    for prefix in cfg.data.paths:  # a missing or truncated dataset
        check_files(prefix)
    try:
        check_writable(cfg.run_dir)
    except OutputError as e:
        raise ConfigError(f"run_dir: {e}") from None


def _print_summary(result, run) -> None:
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
