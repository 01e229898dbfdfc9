"""For users of the `deepspeed` launcher: a hostfile (`host slots=N` per line) and the command.

The deepspeed launcher reaches other hosts over pdsh/ssh and sets RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR and MASTER_PORT for each worker, which `pkm pretrain` reads as it reads torchrun's.
"""

from __future__ import annotations

import re
from pathlib import Path

from data_pipeline.outputs import atomic_output
from launch.errors import LaunchError
from launch.training import Entry


def hostfile_path(run_dir: Path) -> Path:
    return Path(run_dir) / "deepspeed" / "hostfile"


def hostfile_text(hosts: list[str], slots: int) -> str:
    if not hosts:
        raise LaunchError("--hosts is empty: give at least one host name")
    if slots < 1:
        raise LaunchError(f"--slots must be at least 1, got {slots}")
    for h in hosts:
        if not re.fullmatch(r"[A-Za-z0-9._-]+", h):
            raise LaunchError(f"'{h}' is not a host name")
    if len(set(hosts)) != len(hosts):
        raise LaunchError(f"--hosts names a host twice: {','.join(hosts)}")
    return "".join(f"{h} slots={slots}\n" for h in hosts)


def write_hostfile(text: str, path: Path) -> Path:
    with atomic_output(path) as tmp:
        tmp.write_text(text)
    return path


def deepspeed_argv(python: str, hostfile: Path, master: str, port: int, entry: Entry) -> list[str]:
    """`python -m deepspeed.launcher.runner`: the `deepspeed` command, from this interpreter's venv."""
    module = ["--module"] if entry.module else []
    return [
        python,
        "-m",
        "deepspeed.launcher.runner",
        f"--hostfile={hostfile}",
        f"--master_addr={master}",
        f"--master_port={port}",
        *module,
        entry.target,
        *entry.args,
    ]
