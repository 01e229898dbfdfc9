"""Issue: checkpoints reshard on resume. A run saved at TP=2 x DP=2 (value tables split 4 ways) resumes
at TP=1/DP=1, DP=2 and DP=4: the loss of the next step matches the uninterrupted continuation within
1e-5 (relative), so model weights, dense Adam moments, value tables and their sparse-Adam moments
all reshard (megatron-core dist_checkpointing, torch_dist format)."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.test_sharding import losses, run

pytestmark = [pytest.mark.dist, pytest.mark.slow]
TOL = 1e-5


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("tp2dp2") / "run"
    run("tiny_gpt.yaml", 4, d, "parallel.tensor_parallel=2", "parallel.memory_parallel=all",
        "train.zero_stage=1", "train.micro_batch_size=4", "train.train_steps=6",
        "checkpoint.save_interval=5", "checkpoint.keep_last=2")
    return d


@pytest.mark.parametrize("nproc,zero", [(1, 0), (2, 2), (4, 1)], ids=["tp1dp1", "dp2-zero2", "dp4-zero1"])
def test_resume_at_another_layout(saved: Path, tmp_path: Path, nproc: int, zero: int):
    continuation = losses(saved)[5]  # step 6 of the uninterrupted TP2xDP2 run
    d = tmp_path / "resumed"
    shutil.copytree(saved / "checkpoints" / "step_0000005", d / "checkpoints" / "step_0000005")
    run("tiny_gpt.yaml", nproc, d, "parallel.tensor_parallel=1", "parallel.memory_parallel=dp",
        f"train.zero_stage={zero}", f"train.micro_batch_size={8 // nproc}", "train.train_steps=6",
        "checkpoint.resume=auto")
    resumed = losses(d)
    assert len(resumed) == 1, resumed
    assert abs(resumed[0] - continuation) <= TOL * abs(continuation), (resumed[0], continuation)
