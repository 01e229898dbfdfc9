"""A checkpoint written by an older commit's code resumes with today's, exactly.

The checkpoint format (`pkm-dist-ckpt-1`) must outlive refactorings of the code that writes it: this
test checks out the code of FORMAT_BASE (the last commit before the Checkpointer took explicit states),
trains the tiny GPT there for 2 steps, resumes it here to step 4, and compares steps 3-4 with an
uninterrupted run of today's code (the losses agree to 1e-6: same data order, weights, moments and RNG).
Skips where the history is not there (a shallow clone, or an export without .git).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, TINY_GPT, losses, run_pkm

FORMAT_BASE = "90c76eb"  # "data_pipeline: ... read_versioned_json": checkpoints as the code wrote them then

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def old_code(tmp_path_factory) -> Path:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout: the older commit's code is not available")
    have = subprocess.run(["git", "cat-file", "-e", f"{FORMAT_BASE}^{{commit}}"], cwd=ROOT, capture_output=True)
    if have.returncode != 0:
        pytest.skip(f"commit {FORMAT_BASE} is not in this clone's history (shallow clone?)")
    out = tmp_path_factory.mktemp("old_code")
    archive = subprocess.run(["git", "archive", FORMAT_BASE], cwd=ROOT, capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(out)], input=archive, check=True)
    return out


def test_checkpoint_of_previous_code_resumes_exactly(old_code, tmp_path):
    common = ["--config", str(TINY_GPT), "train.train_steps=4", "checkpoint.save_interval=0"]
    resumed, fresh = tmp_path / "resumed", tmp_path / "fresh"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "2", "PYTHONPATH": str(old_code)}
    cmd = [sys.executable, "-m", "pretrain.cli", "pretrain", *common, "train.train_steps=2", f"run_dir={resumed}"]
    old = subprocess.run(cmd, cwd=old_code, env=env, capture_output=True, text=True, timeout=900)
    assert old.returncode == 0, old.stderr[-3000:]
    assert (resumed / "checkpoints" / "step_0000002").is_dir()

    r = run_pkm("pretrain", *common, f"run_dir={resumed}", "--resume", "auto")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in (resumed / "logs" / "train.log").read_text()
    r = run_pkm("pretrain", *common, f"run_dir={fresh}")
    assert r.returncode == 0, r.stderr[-3000:]

    got, want = losses(resumed), losses(fresh)
    for step in (3, 4):
        assert got[step] == pytest.approx(want[step], abs=1e-6), (step, got, want)
