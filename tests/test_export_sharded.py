"""`pkm export hf` of checkpoints the single-process export test does not cover:

- one written by a sharded run: the tiny PKM-GPT trained 3 steps at TP2 x DP2 with its value table split
  over all 4 ranks (memory_parallel=all, ZeRO 1) under torchrun;
- one of a model with the PKM query LayerNorm (`model.pkm.query_layernorm: true`) and PKM dropouts set.

Each export loads with AutoModelForCausalLM (trust_remote_code) and gives the logits of the model the
checkpoint consolidates to (`pretrain.checkpoint.load_consolidated`) within 1e-4 (fp32), so the HF
modeling file implements what was trained.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT, TINY_GPT, run_pkm
from tests.test_sharding import run

pytestmark = pytest.mark.slow
TOL = 1e-4


def export_and_compare(ckpt: Path, out: Path) -> dict:
    """Export `ckpt` with the real CLI, load it in transformers, compare its logits with the consolidated
    native model on Austen text. Returns the consolidated state dict."""
    from transformers import AutoModelForCausalLM

    from data_pipeline.tokenizer import load_tokenizer
    from model.build import build_model
    from pretrain.checkpoint import load_consolidated

    r = run_pkm("export", "hf", ckpt, out)
    assert r.returncode == 0, r.stderr[-3000:]
    sd, cfg, info = load_consolidated(ckpt)
    native = build_model(cfg.model, info["vocab_size"]).eval()
    native.load_state_dict(sd, strict=False)
    hf = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    assert not hf.training
    text = (ROOT / "data_pipeline" / "assets" / "austen" / "persuasion.txt").read_text()[5000:9000]
    seq = cfg.model.seq_length
    ids = torch.tensor(load_tokenizer(None).encode(text)[: 2 * seq]).view(2, seq)
    with torch.no_grad():
        ref = native(input_ids=ids, position_ids=torch.arange(seq).unsqueeze(0).expand(2, -1), attention_mask=None)
        got = hf(ids).logits
    diff = (got - ref).abs().max().item()
    assert diff < TOL, f"exported logits differ from the consolidated model's by {diff}"
    return sd


@pytest.mark.dist
def test_export_of_a_tp2_dp2_checkpoint(megatron_single_process, tmp_path):
    d = run(
        "tiny_gpt.yaml",
        4,
        tmp_path / "run",
        "parallel.tensor_parallel=2",
        "parallel.memory_parallel=all",
        "train.zero_stage=1",
        "train.micro_batch_size=4",
        "train.train_steps=3",
    )
    ckpt = d / "checkpoints" / "step_0000003"
    manifest = json.loads((ckpt / "manifest.json").read_text())
    assert (manifest["tp"], manifest["dp"], manifest["memory_parallel"]) == (2, 2, "all")
    sd = export_and_compare(ckpt, tmp_path / "hf")
    key, table = next((k, v) for k, v in sd.items() if k.endswith("values.weight"))
    assert table.shape == (48**2, 64)  # whole again: n_keys**2 slots x hidden, from 4 column shards
    from tests.test_reshard import checkpoint_tensors

    raw = checkpoint_tensors(ckpt, f"model.{key}")[f"model.{key}"]  # read back by torch's own DCP reader
    assert torch.equal(table, raw)


def test_export_with_query_layernorm_and_dropouts(megatron_single_process, tmp_path):
    run_dir = tmp_path / "run"
    r = run_pkm(
        "pretrain",
        "--config",
        TINY_GPT,
        f"run_dir={run_dir}",
        f"data.cache_dir={tmp_path / 'cache'}",
        "train.train_steps=3",
        "logging.tensorboard=false",
        "model.pkm.query_layernorm=true",
        "model.pkm.input_dropout=0.1",
        "model.pkm.query_dropout=0.1",
        "model.pkm.value_dropout=0.1",
    )
    assert r.returncode == 0, r.stderr[-3000:]
    out = tmp_path / "hf"
    sd = export_and_compare(run_dir / "checkpoints" / "step_0000003", out)
    ln = {k: v for k, v in sd.items() if "query_layernorm" in k}
    assert {k.rsplit(".", 1)[1] for k in ln} == {"weight", "bias"}, sorted(ln)
    assert not torch.equal(ln[next(k for k in ln if k.endswith("weight"))], torch.ones(32)), (
        "the LayerNorm never trained"
    )
    pkm = json.loads((out / "config.json").read_text())["pkm"]
    assert pkm["query_layernorm"] is True and pkm["value_dropout"] == 0.1
