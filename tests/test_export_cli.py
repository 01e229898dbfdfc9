"""`pkm export hf CHECKPOINT OUT_DIR [--push-to-hub REPO_ID]` on a real `pkm pretrain` checkpoint (the tiny
PKM-GPT, 3 steps on the bundled Austen corpus): the export loads with AutoModelForCausalLM and gives the
consolidated megatron model's logits (within 1e-4); the card carries the run's steps and loss; a push
without network is one clear error line after a complete export."""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import ROOT, TINY_GPT, free_port, run_pkm


@pytest.mark.slow
def test_export_cli_from_pretrain_checkpoint(megatron_single_process, tmp_path):
    from transformers import AutoModelForCausalLM

    from model.build import build_model
    from pretrain.checkpoint import load_consolidated

    run = tmp_path / "run"
    r = run_pkm(
        "pretrain",
        "--config",
        str(TINY_GPT),
        f"run_dir={run}",
        "train.train_steps=3",
        f"data.cache_dir={tmp_path / 'cache'}",
    )
    assert r.returncode == 0, r.stderr[-3000:]
    ckpt = run / "checkpoints" / "step_0000003"
    out = tmp_path / "hf"
    r = run_pkm("export", "hf", str(ckpt), str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"exported to {out}" in r.stdout

    sd, cfg, info = load_consolidated(ckpt)
    native = build_model(cfg.model, info["vocab_size"]).eval()
    native.load_state_dict(sd, strict=False)
    hf = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    text = (ROOT / "data_pipeline" / "assets" / "austen" / "persuasion.txt").read_text()[5000:9000]
    from data_pipeline.tokenizer import load_tokenizer

    ids = torch.tensor(load_tokenizer(None).encode(text)[: 2 * 64]).view(2, 64)
    with torch.no_grad():
        ref = native(input_ids=ids, position_ids=torch.arange(64).unsqueeze(0).expand(2, -1), attention_mask=None)
        got = hf(ids).logits
    assert (got - ref).abs().max().item() < 1e-4
    card = (out / "README.md").read_text()
    assert "| steps | 3 |" in card and f"| final training loss | {info['final_loss']:.4g} |" in card
    assert json.loads((out / "config.json").read_text())["pkm"]["layers"] == [1]
    assert (out / "tokenizer.json").is_file()  # the run's sentencepiece tokenizer, converted

    # --push-to-hub without a reachable Hub: the export is complete, the push is one clear error line
    again = tmp_path / "hf2"
    r = run_pkm(
        "export",
        "hf",
        str(ckpt),
        str(again),
        "--push-to-hub",
        "someone/tiny-pkm-gpt",
        env={"HF_ENDPOINT": f"http://127.0.0.1:{free_port()}", "HF_TOKEN": "hf_not_a_real_token"},
    )
    assert r.returncode == 2, r.stderr[-2000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("pkm: error:")]
    assert len(errors) == 1 and "is unreachable (no network?)" in errors[0] and "Traceback" not in r.stderr
    assert (again / "model.safetensors").is_file()
    r = run_pkm("export", "hf", str(ckpt), str(again))
    assert r.returncode == 2 and "exists and is not empty" in r.stderr
