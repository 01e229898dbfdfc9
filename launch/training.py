"""What each worker runs, and the checks that a config fits the job's shape, before anything starts.

`pretrain.config` is torch-free, so a config is loaded and checked here on the login node: a config
that does not load, or a world size the config's tensor/data parallel layout cannot use, is an error
before a job is submitted, and so is a layout the trainer would refuse (`pretrain.layout`).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from launch.errors import LaunchError

# The trainer's exit code after it saved a checkpoint because it was asked to stop (SIGUSR1/SIGTERM);
# equal to `pretrain.trainer.PREEMPTED_EXIT_CODE` (a test checks), repeated here to keep torch out.
PREEMPTED_EXIT_CODE = 75


def venv_python() -> str:
    """The interpreter running `pkm`, by its unresolved absolute path (resolving would leave the venv)."""
    return os.path.abspath(sys.executable)


@dataclass(frozen=True)
class Entry:
    """A Python module (`python -m target`) or a script, with its arguments: what every worker runs."""

    target: str
    args: tuple[str, ...] = ()
    module: bool = True

    def python_argv(self, python: str) -> list[str]:
        return [python, *self.torchrun_tail()]

    def torchrun_tail(self) -> list[str]:
        """The part of a torchrun command after its own options."""
        return ["-m", self.target, *self.args] if self.module else [self.target, *self.args]


@dataclass
class TrainingJob:
    """A checked `pkm pretrain` run: its entry point, where it writes, and its parallel layout."""

    entry: Entry
    run_dir: Path
    world_size: int
    tensor_parallel: int
    data_parallel: int
    overrides: list[str] = field(default_factory=list)


def _has_override(overrides: list[str], key: str) -> bool:
    return any(o.split("=", 1)[0].strip() == key for o in overrides)


def plan_training(
    config: str | os.PathLike,
    overrides: list[str],
    nodes: int,
    procs_per_node: int,
    workdir: str | os.PathLike | None = None,
) -> TrainingJob:
    """Load and check `config` for `nodes` x `procs_per_node` ranks; return the command to run.

    Relative paths (the config file, the config's run_dir) are taken from `workdir`, the directory
    the job runs in. `checkpoint.resume=auto` is added unless the user chose a resume source, so a
    restarted or requeued job continues from its latest checkpoint.
    """
    from pretrain.config import ConfigError, load_config
    from pretrain.errors import PretrainError
    from pretrain.layout import check_layout

    if nodes < 1:
        raise LaunchError(f"the node count must be at least 1, got {nodes}")
    if procs_per_node < 1:
        raise LaunchError(f"processes per node must be at least 1, got {procs_per_node}")
    workdir = Path(workdir or os.getcwd()).absolute()
    config_path = Path(config)
    if not config_path.is_absolute():
        config_path = workdir / config_path
    overrides = list(overrides)
    try:
        cfg = load_config(config_path, overrides)
    except ConfigError as e:
        raise LaunchError(f"the config does not load, nothing was started: {e}") from None

    world = nodes * procs_per_node
    tp = cfg.parallel.tensor_parallel
    where = f"({config}{' with overrides' if overrides else ''})"
    if tp < 1:
        raise LaunchError(f"parallel.tensor_parallel must be at least 1, got {tp} {where}")
    if world % tp:
        raise LaunchError(
            f"{nodes} node(s) x {procs_per_node} process(es) = {world} ranks, which "
            f"parallel.tensor_parallel={tp} does not divide {where}; use a node count whose rank count "
            f"is a multiple of {tp}"
        )
    try:  # the trainer's own layout check (heads, query groups, ffn by TP; the value-table split)
        check_layout(cfg.model, cfg.parallel, world)
    except PretrainError as e:
        raise LaunchError(
            f"{e} {where}, at {nodes} node(s) x {procs_per_node} process(es); nothing was started"
        ) from None
    dp = world // tp
    mbs, gbs = cfg.train.micro_batch_size, cfg.train.global_batch_size
    if gbs % (mbs * dp):
        raise LaunchError(
            f"{world} ranks with parallel.tensor_parallel={tp} give data parallel size {dp}, but "
            f"train.global_batch_size={gbs} is not a multiple of micro_batch_size x dp = {mbs} x {dp} "
            f"{where}; change the node count or the batch sizes"
        )

    run_dir = Path(cfg.run_dir)
    if not run_dir.is_absolute():
        run_dir = workdir / run_dir
    if not _has_override(overrides, "checkpoint.resume") and cfg.checkpoint.resume is None:
        overrides.append("checkpoint.resume=auto")
    args = ("pretrain", "--config", str(config_path), *overrides)
    return TrainingJob(Entry("pkm", args), run_dir, world, tp, dp, overrides)
