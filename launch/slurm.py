"""SLURM batch jobs: render the sbatch script (kept in the run directory) and submit it.

The script starts one torchrun per node with `srun`, rendezvous on the first node, and turns the
trainer's "preempted" exit (a checkpoint was saved on SIGUSR1/SIGTERM) into `scontrol requeue`; the
requeued job resumes from that checkpoint (`checkpoint.resume=auto`).
"""

from __future__ import annotations

import datetime as _dt
import os
import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from data_pipeline.outputs import atomic_output
from data_pipeline.slurm_job import SlurmJob
from launch.errors import LaunchError
from launch.torchrun import TORCHRUN_ENV, TorchrunOptions, torchrun_options
from launch.training import PREEMPTED_EXIT_CODE, Entry

# Shell variables the script defines or SLURM sets, marked in an argument as "\0NAME\0".
_SHELL_VARS = {"NNODES": "${SLURM_JOB_NUM_NODES}", "ENDPOINT": "${rdzv_addr}:${rdzv_port}", "JOB_ID": "${SLURM_JOB_ID}"}


def _var(name: str) -> str:
    return f"\0{name}\0"


def shell_word(text: str) -> str:
    """Quote one argument for bash; marked SLURM/script variables stay expandable."""
    if "\0" not in text:
        return shlex.quote(text)
    parts = text.split("\0")
    out = [_SHELL_VARS[p] if i % 2 else re.sub(r'([\\"`$])', r"\\\1", p) for i, p in enumerate(parts)]
    return '"' + "".join(out) + '"'


@dataclass
class SlurmOptions:
    nodes: int
    gpus_per_node: int = 0  # 0: a CPU job (gloo), `procs_per_node` workers per node
    procs_per_node: int = 1
    cpus_per_task: int | None = None  # None: one core per worker
    time: str | None = None  # sbatch --time, e.g. "2-00:00:00"
    partition: str | None = None
    account: str | None = None
    job_name: str | None = None  # None: "pkm-" + the run directory's name
    signal_seconds: int = 300  # SIGUSR1 this long before the time limit: time to save a checkpoint
    max_restarts: int = 1  # torchrun restarts of the worker group (a crashed or killed worker)
    max_requeues: int = 20  # requeues after preemption before the job gives up
    sbatch_lines: list[str] = field(default_factory=list)  # extra "#SBATCH ..." options, e.g. "--qos=high"

    def job(self) -> SlurmJob:
        """The part of the description `pkm data preprocess --executor slurm` shares (same options, same lines)."""
        return SlurmJob(
            time=self.time,
            partition=self.partition,
            account=self.account,
            cpus_per_task=self.cpus_per_task,
            job_name=self.job_name,
            sbatch_lines=self.sbatch_lines,
        )

    def job_name_for(self, run_dir: Path) -> str:
        return self.job_name or f"pkm-{Path(run_dir).name}"

    @property
    def workers_per_node(self) -> int:
        return self.gpus_per_node or self.procs_per_node

    def check(self) -> None:
        if self.nodes < 1:
            raise LaunchError(f"--nodes must be at least 1, got {self.nodes}")
        if self.gpus_per_node < 0 or self.procs_per_node < 1:
            raise LaunchError("--gpus-per-node must be 0 or more and --procs-per-node at least 1")
        if self.gpus_per_node and self.procs_per_node not in (1, self.gpus_per_node):
            raise LaunchError(
                f"--procs-per-node {self.procs_per_node} differs from --gpus-per-node "
                f"{self.gpus_per_node}: a GPU job runs one worker per GPU"
            )
        if not 1 <= self.signal_seconds <= 65535:
            raise LaunchError(f"--signal-seconds must be 1..65535 (SLURM's limit), got {self.signal_seconds}")
        if self.max_requeues < 0:
            raise LaunchError(f"--max-requeues must be 0 or more, got {self.max_requeues}")
        for problem in self.job().problems():
            raise LaunchError(problem)


def slurm_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "slurm"


def script_path(run_dir: Path) -> Path:
    return slurm_dir(run_dir) / "job.sbatch"


def log_pattern(run_dir: Path) -> Path:
    """sbatch's --output: one file per job id, appended to across requeues."""
    return slurm_dir(run_dir) / "%x-%j.out"


def render_sbatch(opts: SlurmOptions, entry: Entry, run_dir: Path, python: str, workdir: Path) -> str:
    """The batch script's text for `entry` on `opts.nodes` nodes (see templates/sbatch.sh)."""
    opts.check()
    run_dir, workdir = Path(run_dir).absolute(), Path(workdir).absolute()
    for name, path in (("run directory", run_dir), ("working directory", workdir), ("python", python)):
        if re.search(r"\s", str(path)):
            raise LaunchError(f"the {name} '{path}' contains whitespace, which #SBATCH lines cannot hold")
    job_name = opts.job_name_for(run_dir)
    for problem in SlurmJob(job_name=job_name).problems():
        raise LaunchError(problem)

    resources_lines = []
    if opts.gpus_per_node:
        resources_lines.append(f"--gpus-per-node={opts.gpus_per_node}")
    resources_lines += opts.job().sbatch_options()

    torchrun = TorchrunOptions(
        nnodes=_var("NNODES"),
        nproc_per_node=opts.workers_per_node,
        rdzv_endpoint=_var("ENDPOINT"),
        rdzv_id=f"pkm-{_var('JOB_ID')}",
        max_restarts=opts.max_restarts,
        shutdown_timeout=opts.signal_seconds,
    )
    # One torchrun option per line, then the training command on one line.
    lines = [shell_word(a) for a in torchrun_options(torchrun)]
    lines.append(" ".join(shell_word(a) for a in entry.torchrun_tail()))
    torchrun_args = " \\\n    ".join(lines)

    values = {
        "HEADER": f"Rendered by `pkm launch slurm` on {_dt.datetime.now():%Y-%m-%d %H:%M}; "
        f"submit again with: sbatch {script_path(run_dir)}",
        "JOB_NAME": job_name,
        "NODES": str(opts.nodes),
        "CPUS_PER_TASK": str(opts.cpus_per_task or opts.workers_per_node),
        "RESOURCE_LINES": "".join(f"#SBATCH {line}\n" for line in resources_lines),
        "SLURM_LOG": str(log_pattern(run_dir)),
        "WORKDIR": str(workdir),
        "SIGNAL_SECONDS": str(opts.signal_seconds),
        "PYTHON": shlex.quote(python),
        "PREEMPTED_EXIT_CODE": str(PREEMPTED_EXIT_CODE),
        "MAX_REQUEUES": str(opts.max_requeues),
        "TORCHRUN_ARGS": torchrun_args,
        "TORCHRUN_ENV": "# Torch's rendezvous store shared with the workers breaks multi-node restarts\n"
        "# (pytorch/pytorch#135712): give each restart attempt's workers a fresh store.\n"
        + "\n".join(f"export {k}={shlex.quote(v)}" for k, v in TORCHRUN_ENV.items()),
    }
    text = resources.files("launch").joinpath("templates/sbatch.sh").read_text()
    for key, value in values.items():
        text = text.replace("{{" + key + "}}", value)
    leftover = re.search(r"\{\{[A-Z_]+\}\}", text)
    assert leftover is None, f"unfilled template field {leftover.group(0)}"
    return text


def write_script(text: str, run_dir: Path) -> Path:
    """Write the script into the run directory (temp name, then rename)."""
    path = script_path(run_dir)
    with atomic_output(path) as tmp:
        tmp.write_text(text)
        tmp.chmod(0o755)
    return path


def find_sbatch() -> str:
    exe = shutil.which("sbatch")
    if exe is None:
        raise LaunchError(
            "'sbatch' was not found on PATH: run this on a SLURM login node (or load its module); "
            "--dry-run prints the script without submitting"
        )
    return exe


def submit(path: Path, env: dict | None = None) -> str:
    """`sbatch --parsable PATH`; returns the job id."""
    exe = find_sbatch()
    proc = subprocess.run(
        [exe, "--parsable", str(path)],
        capture_output=True,
        text=True,
        env=env if env is not None else os.environ.copy(),
    )
    if proc.returncode != 0:
        msg = " ".join((proc.stderr or proc.stdout).split()) or f"exit code {proc.returncode}"
        raise LaunchError(f"sbatch rejected {path}: {msg}")
    job_id = proc.stdout.strip().split(";")[0]
    if not job_id.isdigit():
        raise LaunchError(f"sbatch printed '{proc.stdout.strip()}' instead of a job id")
    return job_id


def job_log(run_dir: Path, job_name: str, job_id: str) -> Path:
    return Path(str(log_pattern(run_dir)).replace("%x", job_name).replace("%j", job_id))
