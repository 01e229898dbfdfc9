"""Two-node torchrun on one machine: two `pkm launch torchrun --nnodes 2` agents (node ranks 0 and 1)
form one job and train a tiny PKM-GPT (DP=2, gloo); then a worker is killed with SIGKILL under
`--max-restarts 1`, torchrun restarts the group, training resumes from the last checkpoint, and the
final loss equals the uninterrupted run's.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from tests.conftest import PY, ROOT, TINY_GPT, descendants, free_port, losses, survivors

pytestmark = [pytest.mark.dist, pytest.mark.slow]

STEPS = 30
OVERRIDES = [f"train.train_steps={STEPS}", "checkpoint.save_interval=5", "logging.log_interval=1"]
TIMEOUT = 240


def start_nodes(run_dir: Path, max_restarts: int) -> list[subprocess.Popen]:
    """One `pkm launch torchrun` per node rank, as a user would type on two machines."""
    endpoint = f"127.0.0.1:{free_port()}"
    run_dir.mkdir(parents=True)
    procs = []
    for rank in (0, 1):
        cmd = [
            PY,
            "-m",
            "pkm",
            "launch",
            "torchrun",
            "--nnodes",
            "2",
            "--node-rank",
            str(rank),
            "--rdzv-endpoint",
            endpoint,
            "--nproc-per-node",
            "1",
            "--max-restarts",
            str(max_restarts),
            "--shutdown-timeout",
            "20",
            "--config",
            str(TINY_GPT),
            f"run_dir={run_dir}",
            *OVERRIDES,
        ]
        out = open(run_dir.parent / f"{run_dir.name}-node{rank}.out", "w")
        procs.append(subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT))
    return procs


def kill_trees(procs: list[subprocess.Popen]) -> None:
    """End torchrun agents and their workers (which torchrun starts in sessions of their own)."""
    for p in procs:
        try:
            for child in psutil.Process(p.pid).children(recursive=True):
                child.kill()
        except psutil.NoSuchProcess:
            pass
        if p.poll() is None:
            p.kill()
            p.wait()


def _descendants(procs: list[subprocess.Popen]) -> set[int]:
    return set().union(*(descendants(p.pid) for p in procs))


def wait_all(procs: list[subprocess.Popen], run_dir: Path, watch: set[int] | None = None) -> list[str]:
    """Wait for every node; `watch` collects the pids of every process they start meanwhile."""
    deadline = time.monotonic() + TIMEOUT
    try:
        for p in procs:
            while p.poll() is None:
                assert time.monotonic() < deadline, "the job did not finish in time"
                if watch is not None:
                    watch.update(_descendants(procs))
                time.sleep(0.2)
    finally:
        kill_trees(procs)
    outs = [(run_dir.parent / f"{run_dir.name}-node{r}.out").read_text(errors="replace") for r in (0, 1)]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-4000:]
    return outs


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("torchrun-runs") / "plain"
    t0 = time.monotonic()
    outs = wait_all(start_nodes(run_dir, max_restarts=0), run_dir)
    print(f"uninterrupted two-node torchrun: {time.monotonic() - t0:.0f} s")
    return run_dir, outs


def test_two_torchrun_nodes_form_one_job(uninterrupted):
    run_dir, outs = uninterrupted
    for rank, out in enumerate(outs):
        assert "--nnodes=2 --nproc-per-node=1 --rdzv-backend=c10d" in out.splitlines()[0]
        assert f"--rdzv-conf=is_host={int(rank == 0)}" in out.splitlines()[0]  # node rank 0 hosts the store
    train_log = (run_dir / "logs" / "train.log").read_text()
    assert "world 2 = TP 1 x DP 2" in train_log
    assert sorted(losses(run_dir)) == list(range(1, STEPS + 1))
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step_{STEPS:07d}"


def _worker_pids(agent: subprocess.Popen) -> list[int]:
    """The trainer processes torchrun started (`pkm launch torchrun` became torchrun by exec)."""
    return [c.pid for c in psutil.Process(agent.pid).children() if "-m pkm " in " ".join(c.cmdline())]


def test_killed_worker_restarts_group_and_resumes(uninterrupted, tmp_path):
    run_dir = tmp_path / "fault"
    procs = start_nodes(run_dir, max_restarts=1)
    seen: set[int] = set()
    latest, deadline = run_dir / "checkpoints" / "latest", time.monotonic() + TIMEOUT
    try:
        # Kill once a checkpoint exists and training went on past it.
        while not (latest.exists() and max(losses(run_dir), default=0) >= 7):
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs), "no checkpoint to resume from"
            seen.update(_descendants(procs))
            time.sleep(0.1)
        victims = _worker_pids(procs[1])
        assert len(victims) == 1, victims
        step_at_kill = max(losses(run_dir))
        os.kill(victims[0], signal.SIGKILL)
    except BaseException:
        kill_trees(procs)
        raise
    outs = wait_all(procs, run_dir, watch=seen)
    alive = survivors(seen)
    for pid in seen:  # leave nothing behind even when the assertion fails
        try:
            psutil.Process(pid).kill()
        except psutil.NoSuchProcess:
            pass
    assert not alive, f"processes of the run outlived it: {alive}"

    train_log = (run_dir / "logs" / "train.log").read_text()
    resumed = re.findall(r"resumed from \S+step_(\d+) at step (\d+)", train_log)
    assert resumed, train_log[-3000:]
    resumed_step = int(resumed[-1][1])
    assert resumed_step % 5 == 0 and 5 <= resumed_step <= step_at_kill
    assert any("restart" in out.lower() for out in outs)  # torchrun's own account of the restart
    ref, got = losses(uninterrupted[0]), losses(run_dir)
    assert sorted(got) == list(range(1, STEPS + 1))
    # Restored data order, RNG and optimizer state: equal to float32 round-off.
    diff = abs(got[STEPS] - ref[STEPS])
    print(f"final loss: uninterrupted {ref[STEPS]!r}, killed+restarted {got[STEPS]!r}, |diff| {diff:.3g}")
    assert got[STEPS] == pytest.approx(ref[STEPS], rel=1e-5, abs=1e-6)
