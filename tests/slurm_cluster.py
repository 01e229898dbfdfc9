"""A real two-node SLURM cluster on this machine, for tests: the `slurm_cluster` pytest fixture.

Debian's `slurmctld`, two `slurmd` (node1, node2: one CPU each, their own ports) and `munged`, all
on the local host, with every file they write (config, munge key and socket, state, spool, logs,
pid files) under one temporary directory. Installs the packages with apt-get when they are missing
and this runs as root (as on CI); otherwise the tests that use it skip, saying why.

Use it from a test module with `from tests.slurm_cluster import slurm_cluster  # noqa: F401`; pass
`cluster.env` to every SLURM command (it sets SLURM_CONF). No accounting daemon: `sacct` has no
data; finished jobs are in `cluster.jobcomp(job_id)` (jobcomp/filetxt) and, for MinJobAge seconds,
in `scontrol show job`.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import free_port

PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]
NODES = ["node1", "node2"]
SBIN = ["/usr/sbin", "/usr/bin", "/sbin", "/bin"]


def _which(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path=os.pathsep.join(SBIN))


def install_reason() -> str | None:
    """Install SLURM and munge if they are missing; the reason they cannot be used, or None."""
    if all(_which(x) for x in ("slurmctld", "slurmd", "munged", "sbatch")):
        return None if os.geteuid() == 0 else "slurmd must run as root to start jobs, and these tests are not root"
    if os.environ.get("PKM_TEST_NO_INSTALL"):
        return "slurmctld is not installed and PKM_TEST_NO_INSTALL is set"
    if os.geteuid() != 0:
        return "slurmctld is not installed and installing it needs root (apt-get install " + " ".join(PACKAGES) + ")"
    if _which("apt-get") is None:
        return "slurmctld is not installed and there is no apt-get to install it"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", "-o", "DPkg::Lock::Timeout=600", *PACKAGES]
    proc = subprocess.run(install, env=env, capture_output=True, text=True)
    if proc.returncode != 0:  # a fresh machine may have no package lists yet
        subprocess.run(["apt-get", "update", "-q", "-o", "DPkg::Lock::Timeout=600"], env=env, capture_output=True)
        proc = subprocess.run(install, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return f"could not install {' '.join(PACKAGES)} with apt-get: {last}"
    return None


SLURM_CONF = """\
ClusterName=pkmtest
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire: also how long a requeued job waits before it may start again (default 120 s)
AuthInfo=socket={root}/munge/socket,cred_expire=10
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool/%n
SlurmctldPidFile={root}/run/slurmctld.pid
SlurmdPidFile={root}/run/slurmd.%n.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
JobRequeue=1
JobCompType=jobcomp/filetxt
JobCompLoc={root}/log/jobcomp.txt
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
MinJobAge=600
KillWait=10
SlurmctldTimeout=30
SlurmdTimeout=60
InactiveLimit=0
Waittime=0
{nodes}
PartitionName=debug Nodes={node_list} Default=YES MaxTime=INFINITE State=UP
"""
NODE_LINE = "NodeName={name} NodeAddr=127.0.0.1 NodeHostname=localhost CPUs=1 RealMemory=1000 Port={port} State=UNKNOWN"


@dataclass
class SlurmCluster:
    root: Path
    env: dict
    nodes: list[str] = field(default_factory=lambda: list(NODES))

    @property
    def conf(self) -> Path:
        return self.root / "slurm.conf"

    def run(self, *cmd: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        proc = subprocess.run(list(cmd), env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()}")
        return proc

    def job_fields(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict ({} once the controller forgot the job)."""
        proc = self.run("scontrol", "show", "job", "-o", job_id, check=False)
        if proc.returncode != 0:
            return {}
        return dict(w.split("=", 1) for w in proc.stdout.split() if "=" in w)

    def job_state(self, job_id: str) -> str:
        return self.job_fields(job_id).get("JobState", "GONE")

    def wait_state(self, job_id: str, states: set[str], timeout: float) -> str:
        """Wait until the job reaches one of `states`; return it."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = self.job_state(job_id)
            if state in states:
                return state
            time.sleep(0.5)
        raise TimeoutError(
            f"job {job_id} is {self.job_state(job_id)} after {timeout:.0f} s, not one of {sorted(states)}"
            f"\n{self.diagnostics()}"
        )

    def jobcomp(self, job_id: str) -> list[dict[str, str]]:
        """The controller's completion records of a job (one per run: a requeue adds one)."""
        path = self.root / "log" / "jobcomp.txt"
        if not path.exists():
            return []
        recs = [dict(w.split("=", 1) for w in line.split() if "=" in w) for line in path.read_text().splitlines()]
        return [r for r in recs if r.get("JobId") == str(job_id)]

    def diagnostics(self) -> str:
        out = []
        for log in sorted((self.root / "log").glob("*.log")):
            out.append(f"--- {log.name} (tail)\n" + "\n".join(log.read_text(errors="replace").splitlines()[-15:]))
        return "\n".join(out)


def _pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _wait_for(pred, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.2)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


def start_cluster(root: Path) -> SlurmCluster:
    """Write the config and start munged, slurmctld and one slurmd per node (all under `root`)."""
    root = Path(root)
    for d in ("munge", "state", "spool", "run", "log"):
        (root / d).mkdir(parents=True, exist_ok=True)
    (root / "munge").chmod(0o755)  # munged wants its socket's directory reachable by all
    key = root / "munge" / "munge.key"
    key.write_bytes(secrets.token_bytes(128))
    key.chmod(0o600)
    ctld_port, node_ports = free_port(), [free_port() for _ in NODES]
    nodes = "\n".join(NODE_LINE.format(name=n, port=p) for n, p in zip(NODES, node_ports))
    (root / "slurm.conf").write_text(
        SLURM_CONF.format(root=root, ctld_port=ctld_port, nodes=nodes, node_list=",".join(NODES))
    )
    env = {**os.environ, "SLURM_CONF": str(root / "slurm.conf")}
    env["PATH"] = os.pathsep.join([env.get("PATH", ""), *SBIN])
    cluster = SlurmCluster(root, env)

    m = root / "munge"
    subprocess.run(
        [
            _which("munged"),
            "--force",
            f"--socket={m}/socket",
            f"--key-file={key}",
            f"--pid-file={m}/munged.pid",
            f"--log-file={root}/log/munged.log",
            f"--seed-file={m}/seed",
        ],
        check=True,
        env=env,
        timeout=30,
    )
    _wait_for(lambda: (m / "socket").exists(), 10, "munged's socket")
    conf = str(root / "slurm.conf")
    subprocess.run([_which("slurmctld"), "-f", conf], check=True, env=env, timeout=30)
    _wait_for(lambda: cluster.run("scontrol", "ping", check=False).returncode == 0, 30, "slurmctld to answer")
    for n in NODES:
        subprocess.run([_which("slurmd"), "-f", conf, "-N", n], check=True, env=env, timeout=30)

    def idle() -> bool:
        states = cluster.run("sinfo", "-h", "-N", "-o", "%N %T", check=False).stdout.split("\n")
        return sum(1 for s in states if s.strip().endswith("idle")) == len(NODES)

    _wait_for(idle, 60, "both nodes to be idle")
    return cluster


def _our_step_daemons(root: Path) -> list:
    """slurmstepd processes of this cluster (they run in its log directory, detached from slurmd)."""
    import psutil

    found = []
    for proc in psutil.process_iter(["name", "cmdline"]):
        try:
            if "slurmstepd" in (proc.info["name"] or "") + " ".join(proc.info["cmdline"] or []) and Path(
                proc.cwd()
            ).is_relative_to(root):
                found.append(proc)
        except (psutil.Error, OSError):
            continue
    return found


def stop_cluster(cluster: SlurmCluster) -> None:
    """Cancel this cluster's jobs and let them end, stop the daemons it started (by their pid
    files), and end step daemons left behind."""
    cluster.run("scancel", "--full", "--user", str(os.getuid()), check=False)
    _wait_for_quiet = time.monotonic() + 30
    while time.monotonic() < _wait_for_quiet:
        proc = cluster.run("squeue", "-h", "-o", "%i", check=False)
        if proc.returncode != 0 or not proc.stdout.strip():
            break
        time.sleep(0.5)
    run = cluster.root / "run"
    pids = [_pid(run / f"slurmd.{n}.pid") for n in NODES] + [
        _pid(run / "slurmctld.pid"),
        _pid(cluster.root / "munge" / "munged.pid"),
    ]
    for pid in pids:
        if pid and _alive(pid):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 20
    for pid in pids:
        while pid and _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        if pid and _alive(pid):
            os.kill(pid, signal.SIGKILL)
    for proc in _our_step_daemons(cluster.root):
        proc.kill()


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """A running two-node cluster (node1, node2 on this host), or a skip with the reason."""
    reason = install_reason()
    if reason:
        pytest.skip(f"no local SLURM cluster: {reason}")
    root = tmp_path_factory.mktemp("slurm")
    try:
        cluster = start_cluster(root)
    except (subprocess.SubprocessError, TimeoutError, OSError) as e:
        logs = "\n".join(p.read_text(errors="replace")[-2000:] for p in sorted((root / "log").glob("*.log")))
        partial = SlurmCluster(root, {**os.environ, "SLURM_CONF": str(root / "slurm.conf")})
        stop_cluster(partial)
        pytest.fail(f"SLURM is installed but the local cluster did not start: {e}\n{logs}")
    yield cluster
    stop_cluster(cluster)
