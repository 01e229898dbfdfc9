"""Kim & Jung's usage measure, "share of value rows updated in the last N steps": a row counts if an
optimizer step among t-N+1..t updated it (N steps, not N-1: a window of 1 used to read 0% always),
and the counters survive a checkpoint (the window used to restart at every resume)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from tests.conftest import TINY_GPT, run_pkm


def _usage(run: Path) -> dict[int, dict]:
    out = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        usage = {k: v for k, v in rec.items() if k.startswith("pkm/")}
        if usage:
            out[rec["step"]] = usage
    return out


def test_usage_window_hand_computed():
    from model.config import PKMConfig
    from model.pkm.memory import ProductKeyMemory
    from pretrain.metrics import PKMUsage

    mem = ProductKeyMemory(8, PKMConfig(n_keys=4, heads=1, knn=2, k_dim=4))  # 16 slots
    usage = PKMUsage([("decoder.layers.0.mlp.memory", mem)])
    updated = {1: [0, 1], 2: [2], 3: [3, 4, 5], 4: [0]}
    key = "pkm/layer0/slots updated in last {} steps %"
    for step, rows in updated.items():
        usage.mark_updated(step, [torch.tensor(rows)])
    # at step 4: N=1 -> {0}; N=2 -> {0,3,4,5}; N=3 -> {0,2,3,4,5}; N=4 and more -> {0,...,5}
    for window, rows in {1: 1, 2: 4, 3: 5, 4: 6, 100: 6}.items():
        assert usage.summary(4, window)[key.format(window)] == pytest.approx(100.0 * rows / 16)
    # reads and softmax mass since the last summary: slots 1 (mass 0.75) and 3 (0.25) of 16
    from model.pkm.memory import PKMLookup

    mem.last_lookup = PKMLookup(torch.tensor([[1, 3]]), torch.tensor([[0.75, 0.25]]), None)
    usage.observe()
    s = usage.summary(4, 1)
    assert s["pkm/layer0/slots read %"] == pytest.approx(100.0 * 2 / 16)
    assert s["pkm/layer0/kl to uniform"] == pytest.approx(
        0.75 * torch.log(torch.tensor(0.75 * 16)).item() + 0.25 * torch.log(torch.tensor(0.25 * 16)).item()
    )
    assert usage.summary(4, 1)["pkm/layer0/slots read %"] == 0.0  # reset by the previous summary


def test_top1_usage_counts_each_heads_best_slot():
    """Top-1 usage (Lample et al.): the share of slots that were the highest-weight slot of some head for
    some token; per head, not over a token's heads x knn reads together."""
    from model.config import PKMConfig
    from model.pkm.memory import PKMLookup, ProductKeyMemory
    from pretrain.metrics import PKMUsage

    mem = ProductKeyMemory(8, PKMConfig(n_keys=4, heads=2, knn=2, k_dim=4))  # 16 slots
    usage = PKMUsage([("decoder.layers.0.mlp.memory", mem)])
    # two tokens, [head 0's two slots | head 1's two slots]; best per head: 1, 6 and 3, 7
    mem.last_lookup = PKMLookup(
        torch.tensor([[1, 3, 5, 6], [3, 1, 6, 7]]), torch.tensor([[0.75, 0.25, 0.4, 0.6], [0.9, 0.1, 0.2, 0.8]]), None
    )
    usage.observe()
    s = usage.summary(1, 1)
    assert s["pkm/layer0/top-1 slots read %"] == pytest.approx(100.0 * 4 / 16)
    assert s["pkm/layer0/slots read %"] == pytest.approx(100.0 * 5 / 16)
    assert usage.summary(1, 1)["pkm/layer0/top-1 slots read %"] == 0.0  # reset by the previous summary


def test_usage_window_of_one_step_is_the_rows_read(tmp_path: Path):
    """Through the trainer: logging every step with N=1, the rows updated in the last step are the rows
    read in it (every row read gets a gradient row), so the two measures are equal, and not 0."""
    run = tmp_path / "run"
    r = run_pkm(
        "pretrain",
        "--config",
        TINY_GPT,
        f"run_dir={run}",
        "train.train_steps=3",
        "model.pkm.n_keys=128",
        "logging.usage_window=1",
        "logging.log_interval=1",
        f"data.cache_dir={tmp_path}",
    )
    assert r.returncode == 0, r.stderr[-3000:]
    for step, u in _usage(run).items():
        updated, read = u["pkm/layer1/slots updated in last 1 steps %"], u["pkm/layer1/slots read %"]
        assert 0 < updated < 100 and updated == pytest.approx(read, abs=1e-6), (step, u)


def test_usage_window_survives_resume(tmp_path: Path):
    """Resumed at step 3 (in the middle of a logging window, and of a 3-step usage window), the usage
    measures at steps 4 and 6 equal those of the uninterrupted run."""
    cfg = (
        "--config",
        TINY_GPT,
        "train.train_steps=6",
        "model.pkm.n_keys=128",
        "logging.usage_window=3",
        "logging.log_interval=2",
        "checkpoint.save_interval=3",
        "checkpoint.keep_last=5",
        f"data.cache_dir={tmp_path}",
    )
    full = tmp_path / "full"
    r = run_pkm("pretrain", *cfg, f"run_dir={full}")
    assert r.returncode == 0, r.stderr[-3000:]
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(full / "checkpoints" / "step_0000003", resumed / "checkpoints" / "step_0000003")
    (resumed / "checkpoints" / "latest").write_text("step_0000003\n")
    r = run_pkm("pretrain", *cfg, f"run_dir={resumed}", "checkpoint.resume=auto")
    assert r.returncode == 0, r.stderr[-3000:]
    want, got = _usage(full), _usage(resumed)
    assert sorted(got) == [4, 6]
    for step in (4, 6):
        assert got[step].keys() == want[step].keys()
        for k, v in want[step].items():
            assert got[step][k] == pytest.approx(v, rel=1e-7, abs=1e-9), (step, k, got[step][k], v)
    assert 0 < want[4]["pkm/layer1/slots updated in last 3 steps %"] < 100
