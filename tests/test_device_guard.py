"""Issue 17 (device discipline): every collective gets its tensors on the device the backend needs.
A CPU run cannot see NCCL's refusal of CPU tensors, so the trainer runs under
`DeviceGuard(required="cuda")` (pretrain/device_guard.py), which tracks where each tensor would live on
a GPU run and fails a collective on a tensor built without `device=`. Checked against the code before
the fix: the DP=2 run failed at the trainer's global token sum (`torch.tensor([value])`), the TP=2 run
at the dense grad-norm split (`torch.zeros(1)`), and with only the trainer fixed the DP=2 run failed
in the PKM usage summary (host counters reduced in place)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT, torchrun_train

WORKER = ROOT / "tests" / "workers" / "guarded_train.py"
COMMON = [
    "train.train_steps=3",
    "logging.tensorboard=false",
    "train.eval_interval=2",
    "train.eval_steps=1",
    "checkpoint.keep_last=1",
]


def test_device_guard_tracks_placement(megatron_single_process):
    """The emulation alone: bare factories and what is computed from them fail, placed tensors pass."""
    import torch.distributed as dist

    from pretrain.device_guard import DeviceGuard, DeviceGuardError
    from pretrain.distributed import all_reduce_tensor, backend_device

    device = backend_device()
    with DeviceGuard(required="cuda") as guard:
        placed = torch.ones(3, device=device)
        bare = torch.tensor([1.0])
        for t in (
            placed,
            placed.sum(),
            placed * torch.tensor(2.0),
            torch.tensor([1.0]).to(device),
            torch.zeros_like(bare, device=device),
        ):
            dist.all_reduce(t)
        for t in (
            bare,
            bare.clone() * 2,
            torch.zeros(2, dtype=torch.float64),
            placed.cpu(),
            torch.from_numpy(placed.numpy()),
        ):
            with pytest.raises(DeviceGuardError, match="built without device="):
                dist.all_reduce(t)
        all_reduce_tensor(torch.zeros(4), "sum", dist.group.WORLD)  # host counters travel through the helper
    assert guard.checked >= 10
    assert dist.all_reduce.__name__ == "all_reduce" and not hasattr(bare, "__wrapped__")


def _run(nproc: int, run_dir: Path, config: str, *overrides: str) -> str:
    r = torchrun_train(WORKER, config, run_dir, *COMMON, *overrides, nproc=nproc)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    assert out.count("device guard checked") == nproc, out[-2000:]
    return out


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.parametrize("config,tp", [("tiny_gpt.yaml", 1), ("tiny_bert.yaml", 2)], ids=["gpt-dp2", "bert-tp2"])
def test_device_guard_trainer(tmp_path, config, tp):
    """Train (usage metrics, evaluation, checkpoint) and resume under the guard told "cuda"."""
    run_dir = tmp_path / "run"
    _run(2, run_dir, config, f"parallel.tensor_parallel={tp}")
    out = _run(2, run_dir, config, f"parallel.tensor_parallel={tp}", "train.train_steps=4", "checkpoint.resume=auto")
    assert "resumed from" in out and "step 4/4" in out, out[-2000:]
