"""megatron-core GPT and BERT models with PKM at chosen layers (one process, gloo world of 1)."""

from __future__ import annotations

import copy

import pytest
import torch
from megatron.core.transformer.mlp import MLP

from model.build import build_model, lm_forward, masked_mean
from model.config import ModelConfig, PKMConfig
from model.pkm.memory import ProductKeyMemory
from model.specs import MemoryMLP, MLPWithMemory, memory_layers
from tests.conftest import run_benchmark

pytestmark = pytest.mark.usefixtures("megatron_single_process")

VOCAB, SEQ, BATCH = 97, 16, 3


def _model(family: str, placement: str, layers=(1,), num_layers=3, seed=0, **model):
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)
    cfg = ModelConfig(
        family=family,
        num_layers=num_layers,
        hidden_size=32,
        num_attention_heads=4,
        seq_length=SEQ,
        pkm=PKMConfig(layers=list(layers), placement=placement, n_keys=8, heads=2, knn=4, k_dim=16),
        **model,
    )
    return build_model(cfg, VOCAB), cfg


def _batch(family: str, seed=1):
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen)
    batch = {
        "tokens": tokens,
        "labels": torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen),
        "loss_mask": torch.ones(BATCH, SEQ),
    }
    if family == "bert":
        pad = torch.zeros(BATCH, SEQ, dtype=torch.bool)
        pad[1, 11:] = True
        pad[2, 5:] = True
        batch["padding_mask"] = pad
        batch["loss_mask"] = (~pad).float()
    return batch


def _mlps(model):
    block = model.decoder if hasattr(model, "decoder") else model.encoder  # GPTModel / BertModel
    return [layer.mlp for layer in block.layers]


@pytest.mark.parametrize("family", ["gpt", "bert"])
@pytest.mark.parametrize("placement", ["add", "replace"])
def test_forward_backward_with_pkm_at_chosen_layers(family, placement):
    model, cfg = _model(family, placement, layers=(0, 2))
    kinds = [type(m) for m in _mlps(model)]
    wanted = MLPWithMemory if placement == "add" else MemoryMLP
    assert kinds == [wanted, MLP, wanted], "PKM exactly at the chosen layers; the others are megatron's MLP"
    mems = memory_layers(model)
    assert [n.split(".")[2] for n, _ in mems] == ["0", "2"]
    batch = _batch(family)
    loss = masked_mean(lm_forward(model, family, batch), batch["loss_mask"])
    assert torch.isfinite(loss) and loss.item() > 0
    loss.backward()
    for _, mem in mems:
        assert mem.keys.grad is not None and mem.keys.grad.abs().sum() > 0
        assert mem.query_proj.weight.grad.abs().sum() > 0
        grad = mem.values.weight.grad
        assert grad is not None and grad.is_sparse and grad.coalesce().values().abs().sum() > 0
    # Every dense parameter of the model takes part in the loss.
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []


@pytest.mark.parametrize("family", ["gpt", "bert"])
def test_add_placement_is_ffn_plus_memory(family):
    """MLPWithMemory(x) == its megatron MLP(x) (+ bias) + its memory(x), bit for bit."""
    model, cfg = _model(family, "add", layers=(1,))
    mlp = _mlps(model)[1]
    assert isinstance(mlp, MLPWithMemory) and type(mlp.mlp) is MLP
    model.eval()  # BatchNorm with running statistics: three calls see the same normalisation
    x = torch.randn(SEQ, BATCH, cfg.hidden_size)
    with torch.no_grad():
        out, bias = mlp(x)
        ffn, ffn_bias = mlp.mlp(x)
        if ffn_bias is not None:
            ffn = ffn + ffn_bias
        assert bias is None
        assert torch.equal(out, ffn + mlp.memory(x))


def test_replace_placement_is_memory_only():
    model, cfg = _model("gpt", "replace", layers=(1,))
    mlp = _mlps(model)[1]
    assert not any(isinstance(m, MLP) for m in mlp.modules())
    x = torch.randn(SEQ, BATCH, cfg.hidden_size)
    model.eval()
    with torch.no_grad():
        out, bias = mlp(x)
        assert bias is None and torch.equal(out, mlp.memory(x))


def test_model_without_pkm_is_plain_megatron():
    model, _ = _model("gpt", "add", layers=())
    assert all(type(m) is MLP for m in _mlps(model))
    assert memory_layers(model) == []


def test_bert_padding_reaches_memory_and_stays_out_of_its_statistics():
    """BERT's padding mask reaches the PKM layers (megatron does not pass it to the MLP); what padded
    positions hold changes neither the BatchNorm running statistics nor the real tokens' loss."""
    model, _ = _model("bert", "add", layers=(1,))
    mem = memory_layers(model)[0][1]
    mem.record_lookups = True
    start = copy.deepcopy(model.state_dict())
    batch = _batch("bert")
    pad = batch["padding_mask"]
    results = []
    for seed in (5, 6):
        model.load_state_dict(start)
        junk = torch.randint(0, VOCAB, pad.shape, generator=torch.Generator().manual_seed(seed))
        b = dict(batch, tokens=torch.where(pad, junk, batch["tokens"]))
        loss = lm_forward(model, "bert", b)
        # The layer sees [s, b] tokens flattened; keep is the transposed non-padding mask.
        assert torch.equal(mem.last_lookup.keep, (~pad).t().reshape(-1))
        bn = mem.query_batchnorm
        results.append((loss[~pad].detach(), bn.running_mean.clone(), bn.running_var.clone()))
    assert not torch.equal(results[0][1], start[_key(model, mem, "running_mean")]), "statistics did move"
    for a, b in zip(results[0], results[1]):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


@pytest.mark.parametrize("binary_head", [False, True])
def test_bert_head_on_masked_positions_only_matches_the_whole_head(binary_head):
    """lm_forward hands BERT's LM head only the positions the loss reads: the per-token loss there and
    every gradient match megatron's head over all positions (tolerance 1e-5: GEMMs over fewer rows may
    round differently), also with the pooler and binary head that a MiniLM init brings; a batch with
    nothing masked runs."""
    model, _ = _model("bert", "add", layers=(1,), binary_head=binary_head)
    model.eval()  # no dropout: both forwards see the same network
    batch = _batch("bert")
    mask = torch.zeros(BATCH, SEQ)
    mask[0, [1, 4, 9]] = 1
    mask[1, [0, 10]] = 1
    mask[2, 3] = 1
    batch["loss_mask"] = mask

    def run(b):
        model.zero_grad()
        per_token = lm_forward(model, "bert", b)
        masked_mean(per_token, mask).backward()
        return per_token.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    sparse, sparse_grads = run(batch)
    full, full_grads = run({k: v for k, v in batch.items() if k != "loss_mask"})
    where = mask > 0
    torch.testing.assert_close(sparse[where], full[where], rtol=1e-5, atol=1e-5)
    assert torch.equal(sparse[~where], torch.zeros_like(sparse[~where]))
    assert sparse_grads.keys() == full_grads.keys()
    for name, grad in full_grads.items():
        torch.testing.assert_close(sparse_grads[name], grad, rtol=1e-5, atol=1e-6, msg=name)
    nothing = lm_forward(model, "bert", dict(batch, loss_mask=torch.zeros(BATCH, SEQ)))
    assert nothing.shape == (BATCH, SEQ) and masked_mean(nothing, torch.zeros(BATCH, SEQ)) == 0
    assert model.loss_positions.mask is None, "the positions hold for one forward only"


def test_bert_head_benchmark_times_both_heads_on_the_same_loss():
    """benchmarks/bert_head.py --quick: the recipe's model, head on masked positions vs on all, one loss."""
    r = run_benchmark("bert_head.py", "--quick", "--threads", "1")
    assert r["masked_positions"] > 0 and r["loss_difference"] < 1e-5, r
    assert r["ms_masked_positions"] > 0 and r["ms_all_positions"] > 0 and r["speedup"] > 0 and r["cpu_speedup"] > 0


def _key(model, module, buffer: str) -> str:
    for name, m in model.named_modules():
        for child_name, child in m.named_children():
            if child is module.query_batchnorm:
                return f"{name}.{child_name}.{buffer}".lstrip(".")
    raise KeyError(buffer)


def test_gpt_padding_mask_reaches_memory():
    model, _ = _model("gpt", "replace", layers=(0,))
    mem = memory_layers(model)[0][1]
    mem.record_lookups = True
    batch = _batch("gpt")
    pad = torch.zeros(BATCH, SEQ, dtype=torch.bool)
    pad[0, 12:] = True
    lm_forward(model, "gpt", dict(batch, padding_mask=pad))
    assert torch.equal(mem.last_lookup.keep, (~pad).t().reshape(-1))


def test_value_tables_are_buffers_with_per_layer_seeds():
    """Tables stay out of model.parameters() (the DP engine must not touch them) and differ per layer."""
    model, _ = _model("gpt", "add", layers=(0, 1))
    tables = [m.values.weight for _, m in memory_layers(model)]
    params = {id(p) for p in model.parameters()}
    assert all(id(t) not in params for t in tables)
    assert all(t.requires_grad and t.is_leaf for t in tables)
    assert not torch.equal(tables[0], tables[1])
    names = [n for n, _ in model.named_buffers() if n.endswith("values.weight")]
    assert len(names) == 2


def test_build_is_deterministic():
    a, _ = _model("gpt", "add", layers=(1,), seed=3)
    b, _ = _model("gpt", "add", layers=(1,), seed=3)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa if isinstance(sa[k], torch.Tensor))


def test_memory_class_is_product_key_memory():
    model, _ = _model("bert", "replace", layers=(2,))
    assert isinstance(_mlps(model)[2].memory, ProductKeyMemory)
