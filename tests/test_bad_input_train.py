"""`pkm pretrain` against a tired user, through the real entry point: every config value out of range is
one line naming the key (exit 2) before anything is built; a truncated dataset is named before training
opens it; a finished run resumed, or `train.train_steps=0`, is a normal end (exit 0); a run killed with
SIGKILL in the middle of a checkpoint save leaves no process behind."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time
import typing
from pathlib import Path

import psutil
import pytest

from tests.conftest import ROOT, TINY_GPT, assert_user_error, descendants, run_pkm, small_tmpfs, survivors

AUSTEN = ROOT / "data_pipeline" / "assets" / "austen"


@pytest.mark.parametrize(
    "override, key",
    [
        ("model.pkm.knn=0", "model.pkm.knn"),  # was a segmentation fault in the numba top-k
        ("model.pkm.knn=64", "model.pkm.knn"),  # more than n_keys=32
        ("model.pkm.n_keys=0", "model.pkm.n_keys"),
        ("model.pkm.heads=0", "model.pkm.heads"),
        ("model.pkm.k_dim=0", "model.pkm.k_dim"),
        ("model.pkm.value_dropout=1.0", "model.pkm.value_dropout"),
        ("model.pkm.layers=[1,1]", "model.pkm.layers"),
        ("model.num_attention_heads=0", "model.num_attention_heads"),  # was a ZeroDivisionError
        ("model.num_query_groups=3", "model.num_query_groups"),
        ("model.seq_length=0", "model.seq_length"),
        ("train.lr=-1", "train.lr"),  # was torch's traceback after the whole start-up
        ("train.lr=.nan", "train.lr"),
        ("train.min_lr=0.1", "train.min_lr"),
        ("train.micro_batch_size=0", "train.micro_batch_size"),  # was a ZeroDivisionError
        ("train.global_batch_size=-8", "train.global_batch_size"),
        ("train.train_steps=-1", "train.train_steps"),
        ("train.adam_beta2=1.0", "train.adam_beta2"),
        ("train.seed=-5", "train.seed"),
        ("train.zero_stage=3", "train.zero_stage"),
        ("parallel.tensor_parallel=0", "parallel.tensor_parallel"),
        ("logging.usage_window=0", "logging.usage_window"),
        ("logging.log_interval=0", "logging.log_interval"),
        ("checkpoint.keep_last=0", "checkpoint.keep_last"),
        ("data.split=90,10", "data.split"),
        ("data.mlm_probability=0", "data.mlm_probability"),
    ],
)
def test_bad_input_config_value(override: str, key: str):
    r = run_pkm("pretrain", "--config", TINY_GPT, override, "run_dir=/nonexistent/never-created", timeout=120)
    assert_user_error(r, key)
    assert not Path("/nonexistent/never-created").exists()


@pytest.mark.parametrize(
    "override, named",
    [
        ("checkpoint.resume=/nonexistent/ckpt", "checkpoint.resume: /nonexistent/ckpt does not exist"),
        ("checkpoint.init_from=/nonexistent/model", "checkpoint.init_from: /nonexistent/model does not exist"),
        ("checkpoint.init_from=README.md", "checkpoint.init_from: README.md is a file"),
        ("data.tokenizer=/nonexistent.model", "data.tokenizer: /nonexistent.model does not exist"),
        ("data.paths=[/nonexistent/corpus]", "/nonexistent/corpus.manifest.json"),
        ("run_dir=README.md/run", "run_dir: README.md/run: cannot be created"),
    ],
)
def test_bad_input_paths(override: str, named: str):
    r = run_pkm("pretrain", "--config", TINY_GPT, override, timeout=120)
    assert_user_error(r, named)


def test_bad_input_knn_zero_as_in_the_issue():
    r = run_pkm(
        "pretrain", "--config", "configs/tiny_gpt.yaml", "model.pkm.knn=0", "run_dir=/nonexistent/x", timeout=120
    )
    assert_user_error(r, "model.pkm.knn")


def _numeric(tp) -> bool:
    args = typing.get_args(tp)
    return tp in (int, float) or any(_numeric(a) for a in args if a is not type(None))


def test_every_number_in_the_config_declares_its_range():
    """The class of bug, not its examples: a numeric config field without a declared range would
    reach the trainer unchecked."""
    from pretrain.config import RunConfig

    def walk(cls, where=""):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            path = f"{where}.{f.name}" if where else f.name
            if dataclasses.is_dataclass(hints[f.name]):
                yield from walk(hints[f.name], path)
            elif _numeric(hints[f.name]):
                yield path, f.metadata

    unbounded = [path for path, meta in walk(RunConfig) if not {"ge", "gt", "le", "lt"} & set(meta)]
    assert not unbounded, f"numeric config fields without a declared range: {unbounded}"


# ---------------------------------------------------------------------------------------------
# Datasets


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory) -> Path:
    prefix = tmp_path_factory.mktemp("data") / "persuasion"
    options = ["--text-mode", "blank-line", "--workers", "0", "--no-progress"]
    r = run_pkm("data", "preprocess", "--input", AUSTEN / "persuasion.txt", "--output", prefix, *options, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return prefix


def test_bad_input_truncated_dataset(small_dataset: Path, tmp_path: Path):
    data = tmp_path / "persuasion"
    for ext in (".bin", ".idx", ".manifest.json"):
        data.with_suffix(ext).write_bytes(small_dataset.with_suffix(ext).read_bytes())
    size = data.with_suffix(".bin").stat().st_size
    with open(data.with_suffix(".bin"), "r+b") as f:
        f.truncate(size // 2)
    run = tmp_path / "run"
    r = run_pkm(
        "pretrain", "--config", TINY_GPT, f"run_dir={run}", f"data.paths=[{data}]", "train.train_steps=2", timeout=600
    )
    assert_user_error(r, f"{data}.bin", "truncated")
    assert not (run / "checkpoints").exists()


def test_bad_input_dataset_bin_missing(small_dataset: Path, tmp_path: Path):
    data = tmp_path / "persuasion"
    for ext in (".idx", ".manifest.json"):
        data.with_suffix(ext).write_bytes(small_dataset.with_suffix(ext).read_bytes())
    r = run_pkm("pretrain", "--config", TINY_GPT, f"run_dir={tmp_path / 'run'}", f"data.paths=[{data}]", timeout=600)
    assert_user_error(r, f"{data}.bin", "missing")


# ---------------------------------------------------------------------------------------------
# The end of a run is a normal state


def test_resume_of_a_finished_run_is_a_noop(tmp_path: Path):
    """What a requeued SLURM job does after a SIGTERM in its last step, or a torchrun restart after
    completion (was UnboundLocalError)."""
    run = tmp_path / "run"
    common = ("pretrain", "--config", TINY_GPT, f"run_dir={run}", "train.train_steps=3", f"data.cache_dir={tmp_path}")
    r = run_pkm(*common)
    assert r.returncode == 0, r.stderr[-3000:]
    checkpoints = sorted(p.name for p in (run / "checkpoints").iterdir())
    metrics = (run / "metrics.jsonl").read_text()
    r = run_pkm(*common, "checkpoint.resume=auto")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    assert "nothing to train: the run is already at step 3" in r.stdout
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == checkpoints
    assert (run / "metrics.jsonl").read_text() == metrics


def test_resume_with_another_model_is_a_user_error(tmp_path: Path):
    """The model section edited between a run and its resume: a change of the tensors' layout is named
    before anything loads (it was a megatron traceback, or for placement add -> replace a silent resume
    without the FFN's weights) and no checkpoint is written; a knn change resumes, logged."""
    run = tmp_path / "run"
    common = ("pretrain", "--config", TINY_GPT, f"run_dir={run}", f"data.cache_dir={tmp_path}")
    r = run_pkm(*common, "train.train_steps=2")
    assert r.returncode == 0, r.stderr[-3000:]
    checkpoints = sorted(p.name for p in (run / "checkpoints").iterdir())
    resume = ("train.train_steps=3", "checkpoint.resume=auto")
    for override, key in (
        ("model.pkm.placement=replace", "model.pkm.placement"),
        ("model.hidden_size=32", "hidden_size"),
    ):
        assert "(checkpoint: " in assert_user_error(run_pkm(*common, *resume, override), key)
        assert sorted(p.name for p in (run / "checkpoints").iterdir()) == checkpoints
    r = run_pkm(*common, *resume, "model.pkm.knn=4")
    assert r.returncode == 0, r.stderr[-3000:]
    assert (
        "resuming with model.pkm.knn=4 (the checkpoint was trained with 8)" in (run / "logs" / "train.log").read_text()
    )


def test_train_steps_zero_saves_the_initial_weights(tmp_path: Path):
    run = tmp_path / "run"
    r = run_pkm("pretrain", "--config", TINY_GPT, f"run_dir={run}", "train.train_steps=0", f"data.cache_dir={tmp_path}")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_0000000"


def test_bad_input_disk_full_during_checkpoint(tmp_path: Path):
    """A run whose checkpoint does not fit on its filesystem: one line naming the checkpoint and the
    free space, exit 2, no half-written checkpoint left (a 4 MiB tmpfs; needs root to mount)."""
    with small_tmpfs(tmp_path / "small", "4m") as small:
        run = small / "run"
        r = run_pkm(
            "pretrain",
            "--config",
            TINY_GPT,
            f"run_dir={run}",
            "train.train_steps=2",
            f"data.cache_dir={tmp_path / 'cache'}",
        )
        assert_user_error(r, f"{run}/checkpoints/step_0000002: could not write the checkpoint", "MiB free")
        assert list((run / "checkpoints").iterdir()) == []


# ---------------------------------------------------------------------------------------------
# Processes


def test_kill_during_checkpoint_save_leaves_no_process(tmp_path: Path):
    """No process the trainer started outlives a kill -9 in the middle of a checkpoint save. megatron's
    default writer forked bucket writers and spawned a Manager server and a resource tracker, which
    outlived the kill holding memory and the run's files; the trainer's writer now writes in-process
    (torch's FileSystemWriter, pretrain/checkpoint.py), so there may be no child at all to watch (this
    test used to require one, and was seeing DeepSpeed's start-up compiler probes, now gone)."""
    run = tmp_path / "run"
    overrides = ["train.train_steps=400", "checkpoint.save_interval=2", f"data.cache_dir={tmp_path}"]
    cmd = [sys.executable, "-m", "pkm", "pretrain", "--config", str(TINY_GPT), f"run_dir={run}", *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    seen: set[int] = set()
    saves = run / "checkpoints"
    deadline = time.monotonic() + 300
    try:
        # every process the trainer starts, until it is in the middle of its third save
        while True:
            assert time.monotonic() < deadline and proc.poll() is None, "the run ended before its third save"
            seen.update(descendants(proc.pid))
            if saves.is_dir() and any(p.name.startswith(".tmp-step_0000006") for p in saves.iterdir()):
                seen.update(descendants(proc.pid))
                break
            time.sleep(0.005)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        alive = survivors(seen)
        assert not alive, f"processes outlived the killed trainer: {alive}"
    finally:
        if proc.poll() is None:
            proc.kill()
        for pid in seen:
            try:
                psutil.Process(pid).kill()
            except psutil.NoSuchProcess:
                pass
