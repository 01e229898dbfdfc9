"""A run's configuration, resolved once before anything is built.

(YAML + overrides) -> `load_config` -> `resolve_run` -> ResolvedRun -> Trainer. Resolving checks what the
run reads and writes, opens `checkpoint.init_from` once (an HF directory's architecture becomes the
model's; our own checkpoint is verified and lends its tokenizer), and checks the layout against the
launcher's world size. The Trainer only builds from the result.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pretrain.config import ConfigError, RunConfig, validate


@dataclass(frozen=True)
class InitSource:
    """Where the memory-free weights come from: an HF directory (opened: config and adapter) or one of
    our checkpoints (the directory `latest` or the given path names)."""

    kind: Literal["hf", "checkpoint"]
    path: Path
    hf: object | None = None  # model.hf.init_from.HFSource for kind "hf"


@dataclass(frozen=True)
class ResolvedRun:
    cfg: RunConfig  # final and validated: with an HF init_from, the model's architecture is the checkpoint's
    init: InitSource | None
    tokenizer: str | None  # what load_tokenizer gets: data.tokenizer, else the init_from's own vocabulary


def resolve_run(cfg: RunConfig) -> ResolvedRun:
    from model.hf.init_from import HFSource, model_config_from_hf
    from pretrain.checkpoint import checkpoint_tokenizer, is_native_checkpoint, resolve_checkpoint, verify
    from pretrain.distributed import rank_env
    from pretrain.layout import check_layout

    check_inputs(cfg)
    init, tokenizer = None, cfg.data.tokenizer
    if cfg.checkpoint.init_from:
        path = cfg.checkpoint.init_from
        if is_native_checkpoint(path):  # a run or checkpoints/ directory: its latest checkpoint
            ckpt = resolve_checkpoint(path)
            verify(ckpt)
            init = InitSource("checkpoint", ckpt)
            tokenizer = tokenizer or checkpoint_tokenizer(ckpt)
        else:
            hf = HFSource.open(path)
            cfg = dataclasses.replace(cfg, model=model_config_from_hf(hf, base=cfg.model))
            validate(cfg, after_init=True)
            init = InitSource("hf", Path(path), hf)
            tokenizer = tokenizer or path  # a model initialised from a checkpoint trains with its vocabulary
    check_layout(cfg.model, cfg.parallel, int(rank_env()["WORLD_SIZE"]))
    return ResolvedRun(cfg, init, tokenizer)


def check_inputs(cfg) -> None:
    """What the run reads and writes, checked before anything is built: one-line errors naming the key."""
    from data_pipeline.outputs import OutputError, check_writable
    from data_pipeline.preprocess import check_files
    from data_pipeline.tokenizer import BUNDLED
    from pretrain.checkpoint import resolve_checkpoint

    for key, path, kind in (
        ("checkpoint.init_from", cfg.checkpoint.init_from, "dir"),
        ("checkpoint.resume", None if cfg.checkpoint.resume == "auto" else cfg.checkpoint.resume, "dir"),
        ("data.tokenizer", None if cfg.data.tokenizer in BUNDLED else cfg.data.tokenizer, "any"),
    ):
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
