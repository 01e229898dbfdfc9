"""Issue: checkpoints reshard on resume. A run trained at TP=2 x DP=2 (value tables split 4 ways, ZeRO 1)
and checkpointed at step 5 resumes at TP1/DP1, DP2 with ZeRO 2 and DP4 with ZeRO 1 and trains 5 more
steps: every one of those losses, and at step 10 the gathered value table, its lazy-Adam moments and the
dense Adam moments, match the uninterrupted TP2xDP2 run within 1e-5 (fp32; losses relative, the table and
its moments relative to each tensor's largest magnitude, dense moments to the largest over the model:
measured ~1e-6 for the tables, up to 1e-5 per dense tensor). Five steps after the load, a lost moment
or a mis-sharded row is visible; the first loss after resume alone (a forward with the saved weights)
would see neither.

`test_reshard_restores_sparse_moments` checks the load itself: right after resuming at another layout
the value optimizer holds exactly the checkpoint's moments and step count (it fails if they are dropped).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT
from tests.test_sharding import loss_curve, run

pytestmark = [pytest.mark.dist, pytest.mark.slow]
TOL = 1e-5
STEPS, SAVED_AT = 10, 5
RESUME_LAYOUTS = [(1, 0), (2, 2), (4, 1)]  # (processes, ZeRO stage) at TP=1, tables split over DP


def checkpoint_tensors(ckpt: Path, prefix: str) -> dict[str, torch.Tensor]:
    """Every tensor of checkpoint `ckpt` whose key starts with `prefix`, whole (gathered from however
    many shards wrote it)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = dcp.FileSystemReader(str(ckpt))
    meta = reader.read_metadata().state_dict_metadata
    out = {
        k: torch.empty(m.size, dtype=m.properties.dtype)
        for k, m in meta.items()
        if k.startswith(prefix) and isinstance(m, TensorStorageMetadata)
    }
    dcp.load(out, storage_reader=dcp.FileSystemReader(str(ckpt)), no_dist=True)
    return out


def step_dir(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step_{step:07d}"


def assert_close(
    ref: dict[str, torch.Tensor], got: dict[str, torch.Tensor], what: str, one_scale: bool = False
) -> None:
    """Each tensor within TOL x its largest magnitude; with `one_scale`, x the largest magnitude over all
    of `ref` (dense moments: some gradients are zero in exact arithmetic, e.g. the query projection's
    bias under BatchNorm, and their moments are fp32 rounding noise that differs with reduction order)."""
    assert ref and ref.keys() == got.keys(), f"{what}: keys differ: {sorted(ref.keys() ^ got.keys())[:6]}"
    overall = max(a.abs().max().item() for a in ref.values())
    for k, a in ref.items():
        b = got[k]
        assert a.shape == b.shape, (k, a.shape, b.shape)
        scale = max(overall if one_scale else a.abs().max().item(), 1e-30)
        diff = (a - b).abs().max().item()
        assert diff <= TOL * scale, f"{what} {k}: differs by {diff:.3g} (largest magnitude {scale:.3g})"


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    """TP2 x DP2, memory_parallel=all, ZeRO 1: 10 steps, checkpoints at steps 5 and 10."""
    d = tmp_path_factory.mktemp("tp2dp2") / "run"
    run(
        "tiny_gpt.yaml",
        4,
        d,
        "parallel.tensor_parallel=2",
        "parallel.memory_parallel=all",
        "train.zero_stage=1",
        "train.micro_batch_size=4",
        f"train.train_steps={STEPS}",
        f"checkpoint.save_interval={SAVED_AT}",
        "checkpoint.keep_last=2",
    )
    assert step_dir(d, SAVED_AT).is_dir() and step_dir(d, STEPS).is_dir()
    return d


def resumed_copy(uninterrupted: Path, dest: Path) -> Path:
    """A fresh run directory holding only the step-5 checkpoint of the uninterrupted run."""
    shutil.copytree(step_dir(uninterrupted, SAVED_AT), step_dir(dest, SAVED_AT))
    (dest / "checkpoints" / "latest").write_text(step_dir(dest, SAVED_AT).name + "\n")
    return dest


@pytest.mark.parametrize("nproc,zero", RESUME_LAYOUTS, ids=["tp1dp1", "dp2-zero2", "dp4-zero1"])
def test_reshard_resume_trains_like_uninterrupted(uninterrupted: Path, tmp_path: Path, nproc: int, zero: int):
    d = resumed_copy(uninterrupted, tmp_path / "resumed")
    run(
        "tiny_gpt.yaml",
        nproc,
        d,
        "parallel.tensor_parallel=1",
        "parallel.memory_parallel=dp",
        f"train.zero_stage={zero}",
        f"train.micro_batch_size={8 // nproc}",
        f"train.train_steps={STEPS}",
        f"checkpoint.save_interval={SAVED_AT}",
        "checkpoint.resume=auto",
    )

    ref, got = loss_curve(uninterrupted)[SAVED_AT:], loss_curve(d)
    assert len(ref) == len(got) == STEPS - SAVED_AT, (ref, got)
    for step, (a, b) in enumerate(zip(ref, got), SAVED_AT + 1):
        assert abs(a - b) <= TOL * abs(a), f"step {step}: uninterrupted {a} vs resumed at {nproc} ranks {b}"

    ref_ckpt, got_ckpt = step_dir(uninterrupted, STEPS), step_dir(d, STEPS)
    values = {k: v for k, v in checkpoint_tensors(ref_ckpt, "model.").items() if k.endswith("values.weight")}
    assert values, "no value table in the checkpoint"
    assert_close(
        values, {k: v for k, v in checkpoint_tensors(got_ckpt, "model.").items() if k in values}, "value table"
    )
    sparse = checkpoint_tensors(ref_ckpt, "value_optimizer.")
    assert any(v.abs().max() > 0 for v in sparse.values()), "the value optimizer never moved"
    assert_close(sparse, checkpoint_tensors(got_ckpt, "value_optimizer."), "value-table Adam moment")
    for k in ("exp_avg", "exp_avg_sq"):
        prefix = f"optimizer.{k}."
        assert_close(
            checkpoint_tensors(ref_ckpt, prefix),
            checkpoint_tensors(got_ckpt, prefix),
            "dense Adam moment",
            one_scale=True,
        )
    steps = [torch.load(c / "common.pt", weights_only=False)["value_optimizer_steps"] for c in (ref_ckpt, got_ckpt)]
    assert steps[0] == steps[1] == [STEPS], steps


LOAD_WORKER = """
import sys, torch
from pretrain.config import load_config
from pretrain.trainer import Trainer
from pretrain.distributed import shutdown
tr = Trainer(load_config(sys.argv[1], sys.argv[3:]))
opt = tr.value_optimizer.optimizer
torch.save({name: {k: (v.clone() if torch.is_tensor(v) else v) for k, v in opt.state.get(m.values.weight, {}).items()}
            for name, m in tr.pkm_layers}, sys.argv[2])
shutdown()
"""


def test_reshard_restores_sparse_moments(uninterrupted: Path, tmp_path: Path):
    """Resuming the TP2xDP2 step-5 checkpoint in one process (TP1, table whole) puts the checkpoint's
    lazy-Adam moments and step count into the value optimizer, bit for bit."""
    d = resumed_copy(uninterrupted, tmp_path / "resumed")
    out = tmp_path / "state.pt"
    r = subprocess.run(
        [
            sys.executable,
            "-c",
            LOAD_WORKER,
            str(ROOT / "configs" / "tiny_gpt.yaml"),
            str(out),
            f"run_dir={d}",
            f"data.cache_dir={d.parent / 'cache'}",
            "model.pkm.n_keys=48",
            "train.global_batch_size=8",
            f"train.train_steps={STEPS}",
            "logging.tensorboard=false",
            "parallel.memory_parallel=dp",
            "checkpoint.resume=auto",
        ],
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    state = torch.load(out, weights_only=False)
    saved = checkpoint_tensors(step_dir(uninterrupted, SAVED_AT), "value_optimizer.")
    assert state, "no PKM layer"
    for name, st in state.items():
        assert st.get("step") == SAVED_AT, f"{name}: value optimizer step {st.get('step')} after load"
        for k in ("exp_avg", "exp_avg_sq"):
            want = saved[f"value_optimizer.{k}.model.{name}.values.weight"]
            assert want.abs().max() > 0, f"{k} of {name} is zero in the checkpoint: nothing to check"
            assert torch.equal(st[k], want), f"{name} {k}: the loaded moment is not the checkpoint's"
    assert json.loads((step_dir(d, SAVED_AT) / "manifest.json").read_text())["world_size"] == 4
