"""The one logger: `logging.getLogger("pkm.<part>")` everywhere; this sets up console + run log file."""

from __future__ import annotations

import logging
import os
import sys
import warnings
from pathlib import Path

_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup_logging(
    log_file: str | Path | None = None, rank: int | None = None, level: int = logging.INFO
) -> logging.Logger:
    """Console on rank 0 (warnings on others), and every rank's records in `log_file` (rank-suffixed)."""
    if rank is None:
        rank = int(os.environ.get("RANK", "0"))
    root = logging.getLogger("pkm")
    root.setLevel(level)
    root.propagate = False
    for h in list(root.handlers):
        root.removeHandler(h)
        h.close()
    # Progress (INFO) to stdout, problems (WARNING and up) to stderr: stderr of a run that fails
    # for a user mistake holds its warnings and the one-line error, not the start-up log.
    fmt = logging.Formatter(f"[rank{rank}] " + _FORMAT if rank else _FORMAT, "%H:%M:%S")
    progress = logging.StreamHandler(sys.stdout)
    progress.setLevel(level if rank == 0 else logging.WARNING)
    progress.addFilter(lambda record: record.levelno < logging.WARNING)
    problems = logging.StreamHandler(sys.stderr)
    problems.setLevel(logging.WARNING)
    for h in (progress, problems):
        h.setFormatter(fmt)
        root.addHandler(h)
    if log_file is not None:
        path = Path(log_file)
        if rank:
            path = path.with_name(f"{path.stem}.rank{rank}{path.suffix}")
        path.parent.mkdir(parents=True, exist_ok=True)
        fh = logging.FileHandler(path)
        fh.setFormatter(logging.Formatter(_FORMAT))
        root.addHandler(fh)
    return root


def close_logging() -> None:
    """Undo setup_logging (its handlers closed, the run's log file with them): a process that runs
    several commands in turn (tests, benchmarks/kim_jung.py --quick) must not write one run's log with
    the next one's lines."""
    root = logging.getLogger("pkm")
    for h in list(root.handlers):
        root.removeHandler(h)
        h.close()
    root.propagate = True


def quiet_third_party() -> None:
    """Drop the import-time warnings of megatron-core/DeepSpeed/torch that say nothing to a user
    (optional fused kernels absent, deprecations): a CLI error must be the one line on stderr."""
    for msg in (
        ".*Apex is not installed.*",
        ".*Transformer Engine and Apex are not installed.*",
        ".*full scope is deprecated.*",
        ".*TypedStorage is deprecated.*",
    ):
        warnings.filterwarnings("ignore", message=msg)
    logging.getLogger("megatron.core.transformer.transformer_layer").setLevel(logging.ERROR)
