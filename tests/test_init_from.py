"""Initialising megatron-core GPT/BERT (with PKM layers) from HF GPT-2, Llama and BERT checkpoints.

The HF models are transformers' own classes, randomly initialised with large weights (std 0.15 for
every tensor, LayerNorm gains included, so a swapped or transposed tensor changes the logits) and saved
locally; the text is real (Persuasion, tokenised with the bundled Austen tokenizer). Tolerance: logits
within 1e-4 absolute (fp32), as the issue asks.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from model.build import build_model
from model.config import ModelConfig, PKMConfig
from model.errors import ModelError
from model.hf.init_from import load_pretrained_into, model_config_from_hf
from tests.conftest import ROOT, tiny_hf_models

pytestmark = pytest.mark.usefixtures("megatron_single_process")

VOCAB, SEQ = 8192, 48  # tiny_hf_models' vocabulary
TOL = 1e-4


def austen_ids(n: int, length: int = SEQ) -> torch.Tensor:
    from data_pipeline.tokenizer import load_tokenizer

    text = open(os.path.join(ROOT, "data_pipeline", "assets", "austen", "persuasion.txt")).read()[20000:40000]
    ids = load_tokenizer(None).encode(text)
    return torch.tensor(ids[: n * length]).view(n, length)


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    from transformers import BertForPreTraining

    root = tmp_path_factory.mktemp("hf")
    llama = dict(intermediate_size=160, max_position_embeddings=128, rope_theta=5000.0, rms_norm_eps=1e-6)
    # BertForPreTraining: encoder, pooler, MLM head and next-sentence head: every BERT rule is used.
    models = tiny_hf_models(root, 3, BertForPreTraining, gpt2=dict(bos_token_id=1, eos_token_id=2), llama=llama)
    return {name: (str(root / name), model) for name, model in models.items()}


def _build(hf_dir: str, pkm: PKMConfig = PKMConfig(), vocab: int = None, **overrides):
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    cfg = model_config_from_hf(hf_dir, base=ModelConfig(seq_length=SEQ), pkm=pkm)
    cfg = dataclasses.replace(cfg, **overrides)
    torch.manual_seed(0)
    model_parallel_cuda_manual_seed(0)
    return build_model(cfg, vocab or cfg.vocab_size).eval(), cfg


def megatron_logits(model, family: str, ids: torch.Tensor, mask: torch.Tensor = None):
    with torch.no_grad():
        if family == "gpt":
            pos = torch.arange(ids.shape[1]).unsqueeze(0).expand_as(ids)
            return model(input_ids=ids, position_ids=pos, attention_mask=None), None
        mask = torch.ones_like(ids) if mask is None else mask
        return model(input_ids=ids, attention_mask=mask, tokentype_ids=torch.zeros_like(ids))


@pytest.mark.parametrize("name", ["gpt2", "llama", "bert"])
def test_logits_equal_transformers(hf_dirs, name):
    hf_dir, hf = hf_dirs[name]
    model, cfg = _build(hf_dir)
    report = load_pretrained_into(model, cfg, hf_dir)
    assert report.tensors > 0 and not report.fresh_heads and not report.fresh_memory
    ids = austen_ids(3)
    mask = torch.ones_like(ids)
    if name == "bert":
        mask[1, 30:] = 0  # padded tail: only real tokens are compared
        mask[2, 12:] = 0
    logits, binary = megatron_logits(model, cfg.family, ids, mask)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask)
    ref_logits = ref.logits if name != "bert" else ref.prediction_logits
    assert ref_logits.std() > 1.0, "weights large enough that a wrong mapping shows"
    keep = mask.bool()
    assert (logits - ref_logits)[keep].abs().max().item() < TOL
    if name == "bert":  # the pooler and next-sentence head went to megatron's pooler + binary head
        assert cfg.binary_head
        assert (binary - ref.seq_relationship_logits).abs().max().item() < TOL


def test_pkm_add_keeps_pretrained_ffn_and_fresh_memory(hf_dirs):
    hf_dir, hf = hf_dirs["llama"]
    pkm = PKMConfig(layers=[1], placement="add", n_keys=16, heads=2, knn=4, k_dim=16)
    model, cfg = _build(hf_dir, pkm)
    before = {n: t.clone() for n, t in model.state_dict().items() if ".memory." in n}
    report = load_pretrained_into(model, cfg, hf_dir)
    sd = model.state_dict()
    assert sorted(report.fresh_memory) == sorted(before) and before
    assert all(torch.equal(sd[n], t) for n, t in before.items()), "PKM weights keep their initialisation"
    gate_up = torch.cat([hf.model.layers[1].mlp.gate_proj.weight, hf.model.layers[1].mlp.up_proj.weight])
    assert torch.equal(sd["decoder.layers.1.mlp.mlp.linear_fc1.weight"], gate_up.detach())
    assert "PKM freshly initialised in 1 layer" in str(report)


def test_pkm_replace_drops_that_layers_ffn(hf_dirs):
    hf_dir, _ = hf_dirs["gpt2"]
    pkm = PKMConfig(layers=[2], placement="replace", n_keys=16, heads=2, knn=4, k_dim=16)
    model, cfg = _build(hf_dir, pkm)
    report = load_pretrained_into(model, cfg, hf_dir)
    assert sorted(report.dropped) == sorted(
        f"transformer.h.2.mlp.{n}.{p}" for n in ("c_fc", "c_proj") for p in ("weight", "bias")
    )
    logits, _ = megatron_logits(model, "gpt", austen_ids(1))
    assert torch.isfinite(logits).all()


def test_vocabulary_padded_for_tensor_parallel(hf_dirs):
    hf_dir, hf = hf_dirs["gpt2"]
    model, cfg = _build(hf_dir, vocab=VOCAB + 6)  # e.g. the trainer rounds the vocabulary up to a TP multiple
    report = load_pretrained_into(model, cfg, hf_dir)
    assert report.vocab_padding == 6 and "padded by 6" in str(report)
    ids = austen_ids(2)
    logits, _ = megatron_logits(model, "gpt", ids)
    with torch.no_grad():
        ref = hf(ids).logits
    assert logits.shape[-1] == VOCAB + 6
    assert (logits[..., :VOCAB] - ref).abs().max().item() < TOL
    assert torch.equal(logits[..., VOCAB:], torch.zeros_like(logits[..., VOCAB:]))  # zero rows


def _edited_copy(src: str, dst, edit_weights=None, edit_config=None) -> str:
    shutil.copytree(src, dst)
    if edit_weights:
        path = os.path.join(dst, "model.safetensors")
        sd = load_file(path)
        edit_weights(sd)
        save_file(sd, path, metadata={"format": "pt"})
    if edit_config:
        path = os.path.join(dst, "config.json")
        cfg = json.load(open(path))
        edit_config(cfg)
        json.dump(cfg, open(path, "w"))
    return str(dst)


def test_missing_unexpected_and_misshapen_weights_are_listed(hf_dirs, tmp_path):
    hf_dir, _ = hf_dirs["llama"]
    model, cfg = _build(hf_dir)
    before = {n: t.clone() for n, t in model.state_dict().items() if torch.is_tensor(t)}

    def edit(sd):
        del sd["model.layers.2.mlp.down_proj.weight"]
        sd["model.layers.0.self_attn.extra_proj.weight"] = torch.zeros(2, 2)
        sd["model.layers.1.self_attn.o_proj.weight"] = torch.zeros(64, 60)

    bad = _edited_copy(hf_dir, tmp_path / "bad", edit_weights=edit)
    with pytest.raises(ModelError) as e:
        load_pretrained_into(model, cfg, bad)
    msg = str(e.value)
    assert "1 missing weights: decoder.layers.2.mlp.linear_fc2.weight <- model.layers.2.mlp.down_proj.weight" in msg
    assert "1 unexpected weights: model.layers.0.self_attn.extra_proj.weight" in msg
    assert "decoder.layers.1.self_attention.linear_proj.weight: checkpoint (64, 60) vs model (64, 64)" in msg
    after = model.state_dict()
    assert all(torch.equal(after[n], t) for n, t in before.items()), "nothing is copied when loading fails"


def test_vocabulary_mismatch(hf_dirs, tmp_path):
    hf_dir, _ = hf_dirs["bert"]
    small, cfg = _build(hf_dir, vocab=VOCAB - 100)
    with pytest.raises(ModelError, match=r"vocabulary mismatch: .*the model's vocabulary \(8092\) is smaller"):
        load_pretrained_into(small, cfg, hf_dir)
    # a checkpoint whose embedding disagrees with its own config.json
    odd = _edited_copy(hf_dir, tmp_path / "odd", edit_config=lambda c: c.update(vocab_size=VOCAB - 1))
    model, cfg = _build(odd, vocab=VOCAB)
    with pytest.raises(ModelError, match=r"bert\.embeddings\.word_embeddings\.weight has 8192 rows but config"):
        load_pretrained_into(model, cfg, odd)


def test_model_built_from_another_config_is_refused(hf_dirs):
    hf_dir, _ = hf_dirs["gpt2"]
    model, cfg = _build(hf_dir)
    with pytest.raises(
        ModelError, match=r"model config does not match .*activation='gelu' \(checkpoint: 'gelu_tanh'\)"
    ):
        load_pretrained_into(model, dataclasses.replace(cfg, activation="gelu"), hf_dir)


def test_model_config_from_hf(hf_dirs, tmp_path):
    hf_dir, _ = hf_dirs["llama"]
    base = ModelConfig(
        seq_length=32,
        hidden_dropout=0.1,
        num_query_groups=1,
        normalization="LayerNorm",
        pkm=PKMConfig(layers=[2], n_keys=64),
    )
    cfg = model_config_from_hf(hf_dir, base=base)
    assert (cfg.family, cfg.normalization, cfg.activation, cfg.position_embedding) == (
        "gpt",
        "RMSNorm",
        "swiglu",
        "rope",
    )
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_query_groups, cfg.ffn_hidden_size) == (3, 64, 2, 160)
    assert (cfg.rotary_base, cfg.tie_embeddings, cfg.add_bias_linear, cfg.vocab_size) == (5000, False, False, VOCAB)
    assert cfg.seq_length == 32 and cfg.hidden_dropout == 0.1 and cfg.pkm.layers == [2]  # the run's choices
    with pytest.raises(ModelError, match=r"model.pkm.layers=\[5\]: \[5\] outside 0..2"):
        model_config_from_hf(hf_dir, pkm=PKMConfig(layers=[5]))
    gpt2_dir, _ = hf_dirs["gpt2"]
    with pytest.raises(ModelError, match="seq_length=128 exceeds the checkpoint's max_position_embeddings=64"):
        model_config_from_hf(gpt2_dir, base=ModelConfig(seq_length=128))
    scaled = _edited_copy(
        hf_dir,
        tmp_path / "scaled",
        edit_config=lambda c: c.update(rope_parameters={"rope_type": "llama3", "rope_theta": 5e5}),
    )
    with pytest.raises(ModelError, match=r"rope_parameters.rope_type='llama3' is not supported"):
        model_config_from_hf(scaled)
    relu = _edited_copy(gpt2_dir, tmp_path / "relu", edit_config=lambda c: c.update(activation_function="relu"))
    with pytest.raises(ModelError, match=r"activation_function='relu' is not supported"):
        model_config_from_hf(relu)
    other = _edited_copy(gpt2_dir, tmp_path / "t5", edit_config=lambda c: c.update(model_type="t5"))
    with pytest.raises(ModelError, match=r"model_type 't5' is not supported \(supported: bert, gpt2, llama\)"):
        model_config_from_hf(other)
