"""Training in-process (pretrain.trainer.pretrain, what `pkm pretrain` runs) leaves the process as it found
it: no launcher variable in os.environ (a child `pkm` inheriting MASTER_PORT failed with EADDRINUSE), no
log handler writing the next run's lines into this run's log, nothing carried into a second run."""

from __future__ import annotations

import os

import torch.distributed as dist

from tests.conftest import TINY_GPT

LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def test_two_runs_in_one_process_leave_no_launcher_variables(tmp_path, monkeypatch):
    from pretrain.config import load_config
    from pretrain.trainer import pretrain

    for k in LAUNCHER_VARS:  # a single process without a launcher
        monkeypatch.delenv(k, raising=False)
    had_group = dist.is_initialized()  # another test's fixture may hold a world of one: it must stay
    results = []
    for name in ("first", "second"):
        overrides = [f"run_dir={tmp_path / name}", f"data.cache_dir={tmp_path / 'cache'}"]
        cfg = load_config(TINY_GPT, [*overrides, "train.train_steps=1", "logging.tensorboard=false"])
        results.append(pretrain(cfg))
        assert results[-1].exit_code == 0 and results[-1].steps_run == 1
        leaked = {k: os.environ[k] for k in LAUNCHER_VARS if k in os.environ}
        assert not leaked, f"after the {name} run os.environ holds {leaked}"
        assert dist.is_initialized() == had_group
    # the same config trains the same step: no RNG, usage or parallel state carried over (CPU, fp32: exact)
    assert results[0].first_loss == results[1].first_loss
    assert results[0].usage == results[1].usage
    # each run's log holds its own lines only
    for name in ("first", "second"):
        log = (tmp_path / name / "logs" / "train.log").read_text()
        assert log.count("world 1 = TP 1 x DP 1") == 1, log
