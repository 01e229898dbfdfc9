"""init_from at tensor-parallel size 2 (torchrun, 2 ranks, gloo): every weight is sliced by megatron's own
partition attributes (fused QKV by query groups with GQA, gated fc1 per half, vocabulary rows padded to
a TP multiple). The gathered logits equal transformers' within 1e-4 on real text."""

from __future__ import annotations

import json
import os

import pytest
import torch

from tests.conftest import ROOT, tiny_hf_models, torchrun

SEQ = 40

WORKER = r"""
import json, os, sys
import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region, model_parallel_cuda_manual_seed

from model import cpu_shim
from model.build import build_model
from model.config import ModelConfig
from model.hf.init_from import load_pretrained_into, model_config_from_hf

root = sys.argv[1]
dist.init_process_group("gloo")
cpu_shim.apply()
parallel_state.initialize_model_parallel(2)
torch.manual_seed(0)
model_parallel_cuda_manual_seed(0)
rank = dist.get_rank()
ids, mask = torch.load(os.path.join(root, "ids.pt"))
for name in ("gpt2", "llama", "bert"):
    d = os.path.join(root, name)
    cfg = model_config_from_hf(d, base=ModelConfig(seq_length=ids.shape[1]))
    vocab = -(-cfg.vocab_size // 2) * 2  # as the trainer does: a multiple of TP
    model = build_model(cfg, vocab).eval()
    report = load_pretrained_into(model, cfg, d)
    shard = {n: list(p.shape) for n, p in model.named_parameters() if "linear_qkv.weight" in n or "word_emb" in n}
    with torch.no_grad():
        if cfg.family == "gpt":
            pos = torch.arange(ids.shape[1]).unsqueeze(0).expand_as(ids)
            logits = model(input_ids=ids, position_ids=pos, attention_mask=None, runtime_gather_output=True)
        else:
            logits, _ = model(input_ids=ids, attention_mask=mask, tokentype_ids=torch.zeros_like(ids))
            logits = gather_from_tensor_model_parallel_region(logits)
    if rank == 0:
        torch.save(logits, os.path.join(root, f"{name}.logits.pt"))
    with open(os.path.join(root, f"{name}.rank{rank}.json"), "w") as f:
        json.dump({"padding": report.vocab_padding, "tensors": report.tensors, "shapes": shard}, f)
dist.barrier()
dist.destroy_process_group()
"""


@pytest.mark.dist
def test_init_from_at_tensor_parallel_2(tmp_path):
    from transformers import BertForMaskedLM

    from data_pipeline.tokenizer import load_tokenizer

    text = open(os.path.join(ROOT, "data_pipeline", "assets", "austen", "mansfield_park.txt")).read()[9000:20000]
    ids = torch.tensor(load_tokenizer(None).encode(text)[: 2 * SEQ]).view(2, SEQ)
    mask = torch.ones_like(ids)
    mask[1, 27:] = 0
    torch.save((ids, mask), tmp_path / "ids.pt")
    # GPT-2 with 8193 entries: padded to 8194 for TP=2, so the last vocabulary shard ends in a zero row
    llama = dict(intermediate_size=96, max_position_embeddings=64)
    models = tiny_hf_models(tmp_path, 2, BertForMaskedLM, gpt2=dict(vocab_size=8193), llama=llama)
    with torch.no_grad():
        refs = {name: model(input_ids=ids, attention_mask=mask).logits for name, model in models.items()}
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    r = torchrun(script, tmp_path, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    keep = mask.bool()
    for name, ref in refs.items():
        logits = torch.load(tmp_path / f"{name}.logits.pt")
        vocab = ref.shape[-1]
        assert (logits[..., :vocab] - ref)[keep].abs().max().item() < 1e-4, name
        ranks = [json.loads((tmp_path / f"{name}.rank{i}.json").read_text()) for i in range(2)]
        assert ranks[0]["padding"] == (1 if name == "gpt2" else 0)
        qkv = [
            shape for n, shape in ranks[0]["shapes"].items() if n.endswith("layers.0.self_attention.linear_qkv.weight")
        ]
        groups = 2 if name == "llama" else 4
        assert qkv == [[(4 + 2 * groups) * 16 // 2, 64]], "each rank holds half of the query groups"
