"""`pkm launch slurm` on a real two-node SLURM cluster on this machine (see slurm_cluster.py).

A tiny PKM-GPT trains across both nodes (DP=2, gloo); a second run is signalled mid-run the way
`#SBATCH --signal=B:USR1@N` signals it (slurmctld → the batch script), saves, requeues itself and
finishes; its final loss must equal the uninterrupted run's.
"""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import PY, ROOT, TINY_GPT, losses
from tests.slurm_cluster import slurm_cluster  # noqa: F401  (the fixture)

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

STEPS = 30
OVERRIDES = [f"train.train_steps={STEPS}", "checkpoint.save_interval=10", "logging.log_interval=1"]
JOB_TIMEOUT = 240


def submit(cluster, run_dir: Path) -> str:
    proc = subprocess.run(
        [
            PY,
            "-m",
            "pkm",
            "launch",
            "slurm",
            "--nodes",
            "2",
            "--signal-seconds",
            "60",
            "--config",
            str(TINY_GPT),
            f"run_dir={run_dir}",
            *OVERRIDES,
        ],
        cwd=ROOT,
        env=cluster.env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    m = re.search(r"Submitted SLURM job (\d+)", proc.stdout)
    assert m, proc.stdout
    assert f"SLURM log:   {run_dir}/slurm/pkm-{run_dir.name}-{m.group(1)}.out" in proc.stdout
    return m.group(1)


def slurm_log(run_dir: Path, job_id: str) -> str:
    return (run_dir / "slurm" / f"pkm-{run_dir.name}-{job_id}.out").read_text(errors="replace")


def finish(cluster, job_id: str, run_dir: Path) -> str:
    state = cluster.wait_state(job_id, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"}, JOB_TIMEOUT)
    assert state == "COMPLETED", f"job {job_id} {state}:\n{slurm_log(run_dir, job_id)[-4000:]}"
    return slurm_log(run_dir, job_id)


def test_cluster_runs_steps_on_both_nodes(slurm_cluster):
    out = slurm_cluster.run("srun", "--nodes=2", "--ntasks-per-node=1", "bash", "-c", "echo $SLURMD_NODENAME").stdout
    assert sorted(out.split()) == ["node1", "node2"]


@pytest.fixture(scope="module")
def uninterrupted(slurm_cluster, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("slurm-runs") / "plain"
    job_id = submit(slurm_cluster, run_dir)
    t0 = time.monotonic()
    log = finish(slurm_cluster, job_id, run_dir)
    print(f"uninterrupted 2-node SLURM job {job_id}: {time.monotonic() - t0:.0f} s")
    return run_dir, job_id, log


def test_two_node_job_trains_and_checkpoints(slurm_cluster, uninterrupted):
    run_dir, job_id, log = uninterrupted
    assert "node node1 is node rank 0 of 2: starting torchrun" in log
    assert "node node2 is node rank 1 of 2: starting torchrun" in log
    assert "training step finished with exit code 0" in log
    (record,) = slurm_cluster.jobcomp(job_id)  # what sacct would show, from the controller's job log
    assert record["NodeList"] == "node[1-2]" and record["NodeCnt"] == "2" and record["JobState"] == "COMPLETED"
    train_log = (run_dir / "logs" / "train.log").read_text()
    assert "world 2 = TP 1 x DP 2" in train_log
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    assert latest == f"step_{STEPS:07d}" and (run_dir / "checkpoints" / latest).is_dir()
    assert list((run_dir / "tensorboard").rglob("events.out.tfevents.*"))
    assert sorted(losses(run_dir)) == list(range(1, STEPS + 1))
    assert (run_dir / "slurm" / "job.sbatch").read_text().startswith("#!/bin/bash")


def test_preempted_job_saves_requeues_and_matches(slurm_cluster, uninterrupted, tmp_path):
    run_dir = tmp_path / "preempted"
    job_id = submit(slurm_cluster, run_dir)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + JOB_TIMEOUT
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        assert time.monotonic() < deadline and slurm_cluster.job_state(job_id) in ("PENDING", "RUNNING"), (
            slurm_log(run_dir, job_id) if (run_dir / "slurm").exists() else "no log"
        )
        time.sleep(0.2)
    # What `#SBATCH --signal=B:USR1@60` does 60 s before the time limit: slurmctld signals the batch shell.
    slurm_cluster.run("scancel", "--batch", "--signal=USR1", job_id)
    log = finish(slurm_cluster, job_id, run_dir)

    preempted_at = int(
        re.search(r"preempted at step (\d+): checkpoint saved", (run_dir / "logs" / "train.log").read_text()).group(1)
    )
    assert 3 <= preempted_at < STEPS, "the signal must land mid-run"
    assert "got SIGUSR1: asking the training step to save a checkpoint and stop" in log
    assert f"requeueing job {job_id}" in log and f"job {job_id} (requeued 1 times)" in log
    assert "training step finished with exit code 0" in log
    assert re.search(
        rf"resumed from \S+step_{preempted_at:07d} at step {preempted_at}", (run_dir / "logs" / "train.log").read_text()
    )
    runs = slurm_cluster.jobcomp(job_id)
    assert [r["JobState"] for r in runs] == ["PENDING", "COMPLETED"]  # requeued once, then finished
    assert all(r["NodeList"] == "node[1-2]" for r in runs)

    ref, got = losses(uninterrupted[0]), losses(run_dir)
    assert sorted(got) == list(range(1, STEPS + 1))
    # Same data order, RNG and optimizer state restored: equal to float32 round-off.
    diff = abs(got[STEPS] - ref[STEPS])
    print(f"final loss: uninterrupted {ref[STEPS]!r}, preempted+requeued {got[STEPS]!r}, |diff| {diff:.3g}")
    assert got[STEPS] == pytest.approx(ref[STEPS], rel=1e-5, abs=1e-6)
    assert [got[s] for s in range(1, STEPS + 1)] == pytest.approx(
        [ref[s] for s in range(1, STEPS + 1)], rel=1e-5, abs=1e-6
    )
