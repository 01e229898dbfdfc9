"""Issue #15: the row-wise value optimizers through the real trainer and checkpoints. A run saved at
step 3 and resumed gives the same per-step losses as the straight run (row state and bf16 tables
included); resuming with another value optimizer, or bf16 tables with adam, is a one-line error."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.conftest import TINY_GPT, assert_user_error, run_pkm

pytestmark = pytest.mark.slow
VARIANTS = {
    "rowwise_adam": ["model.pkm.value_optimizer=rowwise_adam"],
    "rowwise_adagrad_bf16": ["model.pkm.value_optimizer=rowwise_adagrad", "model.pkm.value_dtype=bf16"],
}


def losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {r["step"]: r["lm loss"] for r in rows if "lm loss" in r}


def train(run_dir: Path, *overrides: str):
    return run_pkm(
        "pretrain",
        "--config",
        str(TINY_GPT),
        f"run_dir={run_dir}",
        "train.train_steps=6",
        "checkpoint.save_interval=3",
        "checkpoint.keep_last=2",
        "logging.tensorboard=false",
        f"data.cache_dir={run_dir.parent / 'cache'}",
        *overrides,
    )


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    base = tmp_path_factory.mktemp("value_opt")
    runs = {}
    for name, overrides in VARIANTS.items():
        r = train(base / name, *overrides)
        assert r.returncode == 0, r.stderr[-3000:]
        runs[name] = base / name
    return runs


@pytest.mark.parametrize("name", list(VARIANTS))
def test_rowwise_exact_resume(straight, tmp_path, name):
    """Steps 4-6 after a resume from step 3 equal the straight run's, bit for bit (fp32 CPU): the row
    state (one vector per table, saved by one column shard) and the step count come back, and bf16
    tables round the same way (the rounding bits are a hash of the element and step)."""
    run = tmp_path / "resumed"
    shutil.copytree(straight[name] / "checkpoints" / "step_0000003", run / "checkpoints" / "step_0000003")
    r = train(run, "checkpoint.resume=auto", *VARIANTS[name])
    assert r.returncode == 0, r.stderr[-3000:]
    want, got = losses(straight[name]), losses(run)
    assert sorted(got) == [4, 5, 6]
    for step in (4, 5, 6):
        assert got[step] == want[step], f"step {step}: {got[step]} != {want[step]}"


def test_resume_with_another_value_optimizer_is_a_user_error(straight, tmp_path):
    ckpt = straight["rowwise_adam"] / "checkpoints" / "step_0000003"
    r = train(tmp_path / "other", f"checkpoint.resume={ckpt}", "model.pkm.value_optimizer=adam")
    line = assert_user_error(r, "step_0000003", "rowwise_adam", "value_optimizer=adam")
    assert not (tmp_path / "other" / "checkpoints").exists() or not any(
        (tmp_path / "other" / "checkpoints").iterdir()
    ), line


def test_bf16_tables_with_adam_is_a_user_error(tmp_path):
    r = train(tmp_path / "bad", "model.pkm.value_dtype=bf16")
    assert_user_error(r, "model.pkm.value_dtype", "model.pkm.value_optimizer")
