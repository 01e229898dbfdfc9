"""How a SLURM job is described: one description for `pkm launch slurm` (training) and
`pkm data preprocess --executor slurm` (a datatrove job array), so both take the same options and
render them as the same `#SBATCH` lines.

It lives here, not in launch/, because data_pipeline must not depend on launch (launch may use this).
No heavy imports.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

_JOB_NAME = re.compile(r"[A-Za-z0-9._+-]+")


@dataclass
class SlurmJob:
    time: str | None = None  # sbatch --time, e.g. "2-00:00:00"
    partition: str | None = None
    account: str | None = None
    cpus_per_task: int | None = None  # None: the caller's default (training: one per worker; preprocessing: 1)
    job_name: str | None = None  # None: the caller's default
    sbatch_lines: list[str] = field(default_factory=list)  # extra "#SBATCH ..." options, e.g. "--qos=high"

    def problems(self) -> list[str]:
        """What is wrong with the description (each a sentence naming the option); [] when usable."""
        out = []
        if self.cpus_per_task is not None and self.cpus_per_task < 1:
            out.append(f"--cpus-per-task must be at least 1, got {self.cpus_per_task}")
        if self.job_name is not None and not _JOB_NAME.fullmatch(self.job_name):
            out.append(f"job name '{self.job_name}' may hold only letters, digits and . _ + -")
        for name, value in (("--time", self.time), ("--partition", self.partition), ("--account", self.account)):
            if value is not None and (not value.strip() or re.search(r"\s", value)):
                out.append(f"{name} '{value}' must be one word")
        for line in self.sbatch_lines:
            if not line.strip().startswith("-") or "\n" in line:
                out.append(f"--sbatch '{line.strip()}' is not an sbatch option (like --qos=high)")
        return out

    def sbatch_options(self) -> list[str]:
        """The `#SBATCH` options for time, partition, account and the extra lines, in that order
        (cpus-per-task and the job name are rendered by each caller with its own default)."""
        out = [
            f"--{name}={value}"
            for name, value in (("time", self.time), ("partition", self.partition), ("account", self.account))
            if value
        ]
        return out + [line.strip() for line in self.sbatch_lines]
