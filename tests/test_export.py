"""`export_hf`: megatron-core PKM models (built in memory with `build_model`) exported as self-contained
HF repositories, loaded back with transformers' Auto classes (trust_remote_code).

Four layouts: GPT-2-like (learned positions, tied, GELU-tanh, PKM added), Llama-like (RoPE, GQA, SwiGLU,
RMSNorm, untied, PKM replacing the FFN), BERT pre-LN (PKM added), BERT post-LN with pooler (as initialised
from HF BERT). BatchNorm running statistics are made non-trivial by a few training-mode forwards first.
Tolerance: logits within 1e-4 absolute (fp32); files byte-identical after save -> load -> save.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from model.build import build_model, lm_forward
from model.config import ModelConfig, PKMConfig
from model.errors import ModelError
from model.hf.export import export_hf
from model.specs import memory_layers
from tests.conftest import ROOT, free_port

pytestmark = pytest.mark.usefixtures("megatron_single_process")

TOK_DIR = os.path.join(ROOT, "data_pipeline", "assets", "tokenizer")
TOL = 1e-4
SEQ = 32


def _pkm(layers, placement="add"):
    return PKMConfig(layers=layers, placement=placement, n_keys=16, heads=2, knn=4, k_dim=16)


def _case(family: str, pkm: PKMConfig, **layout) -> tuple[ModelConfig, str]:
    """(a two-layer, 64 wide model, its bundled tokenizer)."""
    cfg = ModelConfig(
        family=family, num_layers=2, hidden_size=64, num_attention_heads=4, seq_length=SEQ, pkm=pkm, **layout
    )
    return cfg, f"austen_{family}.model"


# Llama's layout: grouped queries, a SwiGLU FFN, RMSNorm, rotary positions, no biases, an untied output layer
LLAMA = dict(num_query_groups=2, ffn_hidden_size=96, normalization="RMSNorm", activation="swiglu")
LLAMA.update(position_embedding="rope", rotary_base=5000, add_bias_linear=False, tie_embeddings=False)
CASES = {
    "gpt2like": _case("gpt", _pkm([1]), activation="gelu_tanh"),
    "llamalike": _case("gpt", _pkm([0], "replace"), **LLAMA),
    "bert_pre": _case("bert", _pkm([1])),
    "bert_post": _case("bert", _pkm([0]), norm_position="post", binary_head=True, layernorm_epsilon=1e-12),
}


def austen_ids(tokenizer: str, n: int, length: int = SEQ) -> torch.Tensor:
    from data_pipeline.tokenizer import load_tokenizer

    text = open(os.path.join(ROOT, "data_pipeline", "assets", "austen", "emma.txt")).read()[30000:50000]
    ids = load_tokenizer(os.path.join(TOK_DIR, tokenizer)).encode(text)
    return torch.tensor(ids[: n * length]).view(n, length)


def native(model, family, ids, mask=None):
    """megatron logits [b, s, V] (eval or train mode, as the model is)."""
    with torch.no_grad():
        if family == "gpt":
            pos = torch.arange(ids.shape[1]).unsqueeze(0).expand_as(ids)
            return model(input_ids=ids, position_ids=pos, attention_mask=None)
        mask = torch.ones_like(ids) if mask is None else mask
        return model(input_ids=ids, attention_mask=mask, tokentype_ids=torch.zeros_like(ids))[0]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """{case: (megatron model, cfg, export dir, tokenizer)}, BatchNorm statistics warmed up."""
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    root = tmp_path_factory.mktemp("export")
    out = {}
    for i, (name, (cfg, tok)) in enumerate(CASES.items()):
        torch.manual_seed(i)
        model_parallel_cuda_manual_seed(i)
        model = build_model(cfg, 8192)
        ids = austen_ids(tok, 6)
        model.train()
        with torch.no_grad():
            for k in range(3):
                lm_forward(model, cfg.family, {"tokens": ids[2 * k : 2 * k + 2], "labels": ids[2 * k : 2 * k + 2]})
        model.eval()
        card = {
            "train_steps": 3,
            "final_loss": 9.0123,
            "training_data": ["emma"],
            "memory_usage": {"layer 1": {"slots read %": 12.5, "KL(uniform)": 0.31}},
        }
        path = export_hf(model.state_dict(), cfg, os.path.join(TOK_DIR, tok), str(root / name), card)
        out[name] = (model, cfg, path, tok)
    return out


def _auto(family):
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    return AutoModelForCausalLM if family == "gpt" else AutoModelForMaskedLM


@pytest.mark.parametrize("name", list(CASES))
def test_exported_logits_equal_native_and_memory_contract(exported, name):
    model, cfg, path, tok = exported[name]
    hf = _auto(cfg.family).from_pretrained(path, trust_remote_code=True).eval()
    ids = austen_ids(tok, 3)
    mask = torch.ones_like(ids)
    if cfg.family == "bert":
        mask[1, 20:] = 0
    for _, mem in memory_layers(model):
        mem.record_lookups = True
    ref = native(model, cfg.family, ids, mask)
    with torch.no_grad():
        got = hf(input_ids=ids, attention_mask=mask).logits
    keep = mask.bool()
    assert ref.std() > 0.1 and (got - ref)[keep].abs().max().item() < TOL
    # The contract the online evaluation relies on.
    mems = [m for m in hf.modules() if type(m).__name__ == "ProductKeyMemory"]
    assert len(mems) == len(cfg.pkm.layers) == len(memory_layers(model))
    b, s = ids.shape
    for mem, (_, ours) in zip(mems, memory_layers(model)):
        assert isinstance(mem.values, torch.nn.EmbeddingBag) and mem.values.mode == "sum"
        assert tuple(mem.values.weight.shape) == (cfg.pkm.n_keys**2, cfg.hidden_size)
        k = cfg.pkm.heads * cfg.pkm.knn
        assert mem.last_indices.dtype == torch.long and tuple(mem.last_indices.shape) == (b * s, k)
        megatron_order = ours.last_lookup.indices.view(s, b, k).transpose(0, 1).reshape(b * s, k)  # [s,b] -> [b,s]
        assert torch.equal(mem.last_indices[keep.reshape(-1)], megatron_order[keep.reshape(-1)])


def test_training_mode_matches_too(exported):
    """BatchNorm on batch statistics of real tokens only, in both implementations."""
    from transformers import AutoModelForMaskedLM

    model, cfg, path, tok = exported["bert_pre"]
    hf = AutoModelForMaskedLM.from_pretrained(path, trust_remote_code=True)
    ids = austen_ids(tok, 2)
    mask = torch.ones_like(ids)
    mask[0, 25:] = 0
    saved = {k: v.clone() for k, v in model.state_dict().items() if torch.is_tensor(v)}
    model.train()
    hf.train()
    try:
        ref = native(model, "bert", ids, mask)
        with torch.no_grad():
            got = hf(input_ids=ids, attention_mask=mask).logits
    finally:  # training mode moved the running statistics: the other tests compare with the export
        model.load_state_dict(saved, strict=False)
        model.eval()
    assert (got - ref)[mask.bool()].abs().max().item() < TOL


@pytest.mark.parametrize("name", ["gpt2like", "llamalike"])
def test_generate_with_kv_cache(exported, name):
    from transformers import AutoModelForCausalLM

    _, _, path, tok = exported[name]
    hf = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()
    prompt = austen_ids(tok, 2, 10)
    cached = hf.generate(prompt, max_new_tokens=12, do_sample=False, use_cache=True, pad_token_id=0)
    plain = hf.generate(prompt, max_new_tokens=12, do_sample=False, use_cache=False, pad_token_id=0)
    assert cached.shape == (2, 22) and torch.equal(cached, plain)
    # step-by-step logits through the cache equal one full forward
    with torch.no_grad():
        full = hf(cached).logits
        out = hf(cached[:, :10], use_cache=True)
        steps = [out.logits]
        for t in range(10, 22):
            out = hf(cached[:, t : t + 1], past_key_values=out.past_key_values, use_cache=True)
            steps.append(out.logits)
    assert (torch.cat(steps, dim=1) - full).abs().max().item() < TOL


def test_heads_load_and_train(exported):
    from transformers import AutoModel, AutoModelForQuestionAnswering, AutoModelForSequenceClassification

    model, cfg, path, tok = exported["bert_post"]
    ids = austen_ids(tok, 2)
    cls = AutoModelForSequenceClassification.from_pretrained(path, trust_remote_code=True, num_labels=3)
    sd = model.state_dict()
    assert torch.equal(cls.model.pooler.dense.weight, sd["pooler.dense.weight"]), "the trained pooler is kept"
    out = cls(input_ids=ids, labels=torch.tensor([0, 2]))
    out.loss.backward()
    values = [m.values.weight for m in cls.modules() if type(m).__name__ == "ProductKeyMemory"]
    assert out.logits.shape == (2, 3) and values[0].grad is not None and values[0].grad.abs().sum() > 0
    qa = AutoModelForQuestionAnswering.from_pretrained(path, trust_remote_code=True)
    out = qa(input_ids=ids, start_positions=torch.tensor([1, 3]), end_positions=torch.tensor([4, 9]))
    assert out.start_logits.shape == (2, SEQ) and torch.isfinite(out.loss)
    base = AutoModel.from_pretrained(path, trust_remote_code=True)
    assert base(input_ids=ids).last_hidden_state.shape == (2, SEQ, cfg.hidden_size)


STANDALONE = r"""
import json, os, sys, filecmp
for name in ("megatron", "deepspeed", "model", "pretrain", "data_pipeline"):
    sys.modules[name] = None  # any import of these now fails: the export must not need them
import torch
from transformers import AutoModelForCausalLM, AutoModelForMaskedLM
cases = json.loads(sys.argv[1])
for name, (path, family, ids_file) in cases.items():
    auto = AutoModelForCausalLM if family == "gpt" else AutoModelForMaskedLM
    m = auto.from_pretrained(path, trust_remote_code=True).eval()
    ids, ref = torch.load(ids_file)
    with torch.no_grad():
        diff = (m(input_ids=ids).logits - ref).abs().max().item()
    again, twice = path + ".resaved", path + ".resaved2"
    m.save_pretrained(again)
    auto.from_pretrained(again, trust_remote_code=True).save_pretrained(twice)
    same = {f: filecmp.cmp(os.path.join(path, f), os.path.join(again, f), shallow=False)
            and filecmp.cmp(os.path.join(again, f), os.path.join(twice, f), shallow=False)
            for f in ("model.safetensors", "config.json", "modeling_pkm.py", "configuration_pkm.py")}
    print(json.dumps({"name": name, "diff": diff, "same": same}))
"""


def test_standalone_load_and_byte_stable_resave(exported, tmp_path):
    """In a fresh interpreter where megatron, deepspeed and our packages cannot be imported."""
    cases = {}
    for name, (model, cfg, path, tok) in exported.items():
        ids = austen_ids(tok, 2)
        ids_file = str(tmp_path / f"{name}.pt")
        torch.save((ids, native(model, cfg.family, ids)), ids_file)
        cases[name] = (path, cfg.family, ids_file)
    r = subprocess.run(
        [sys.executable, "-c", STANDALONE, json.dumps(cases)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=str(tmp_path),
    )
    assert r.returncode == 0, r.stderr[-3000:]
    results = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    assert len(results) == len(cases)
    for res in results:
        assert res["diff"] < TOL, res
        assert all(res["same"].values()), res
    for path, _, _ in cases.values():
        for f in ("configuration_pkm.py", "modeling_pkm.py"):
            src = open(os.path.join(path, f)).read()
            imports = {
                line.split()[1].split(".")[0]
                for line in src.splitlines()
                if line.startswith(("import ", "from ")) and not line.startswith("from .")
            }
            assert imports <= {"math", "typing", "torch", "transformers"}, imports


def test_files_config_and_card(exported):
    _, cfg, path, _ = exported["llamalike"]
    files = set(os.listdir(path))
    assert {
        "model.safetensors",
        "config.json",
        "configuration_pkm.py",
        "modeling_pkm.py",
        "README.md",
        "tokenizer.json",
        "tokenizer_config.json",
    } <= files
    config = json.load(open(os.path.join(path, "config.json")))
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_pkm.PKMGPTForCausalLM"
    assert config["pkm"]["layers"] == [0] and config["pkm"]["placement"] == "replace"
    assert (config["num_key_value_heads"], config["position_embedding"], config["activation"]) == (2, "rope", "swiglu")
    card = open(os.path.join(path, "README.md")).read()
    for text in (
        "## Product Key Memory",
        "16^2 = 256",
        "| placement | replace",
        "| steps | 3 |",
        "| final training loss | 9.012 |",
        "| layer 1 | 0.31 | 12.5 |",
        "| tokens seen | not recorded |",
    ):
        assert text in card, text
    _, _, bert_path, _ = exported["bert_post"]
    auto = json.load(open(os.path.join(bert_path, "config.json")))["auto_map"]
    assert set(auto) == {
        "AutoConfig",
        "AutoModel",
        "AutoModelForMaskedLM",
        "AutoModelForSequenceClassification",
        "AutoModelForQuestionAnswering",
    }


def test_bf16_value_table_exports_and_loads_in_bf16(tmp_path):
    """A bf16 value table (model.pkm.value_dtype) is written as BF16 (half the bytes of an fp32 export), loads as
    a bf16 table with the same bits, and is read as in training (bf16 weights): logits within TOL of native.
    Online evaluation loads it in its dtype (fp32)."""
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
    from safetensors import safe_open

    cfg, tok = _case("gpt", PKMConfig(layers=[1], n_keys=16, heads=2, knn=4, k_dim=16, value_dtype="bf16"))
    torch.manual_seed(0)
    model_parallel_cuda_manual_seed(0)
    model = build_model(cfg, 8192).eval()
    table = memory_layers(model)[0][1].values.weight
    assert table.dtype == torch.bfloat16
    path = export_hf(model.state_dict(), cfg, os.path.join(TOK_DIR, tok), str(tmp_path / "bf16"))
    with safe_open(os.path.join(path, "model.safetensors"), "pt") as f:
        dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}
    values = [k for k in dtypes if k.endswith("values.weight")]
    assert len(values) == 1 and dtypes[values[0]] == "BF16"
    assert {d for k, d in dtypes.items() if k not in values} == {"F32"}
    hf = _auto("gpt").from_pretrained(path, trust_remote_code=True).eval()
    (mem,) = [m for m in hf.modules() if type(m).__name__ == "ProductKeyMemory"]
    assert mem.values.weight.dtype == torch.bfloat16 and torch.equal(mem.values.weight, table.detach())
    ids = austen_ids(tok, 2)
    ref = native(model, "gpt", ids)
    with torch.no_grad():
        got = hf(input_ids=ids).logits
    assert ref.std() > 0.1 and (got - ref).abs().max().item() < TOL
    # online evaluation adapts the values in its own dtype (fp32 here), as for an fp32 table
    from pretrain.online_eval.models import load_causal_lm

    adapted, _ = load_causal_lm(path)
    (mem,) = [m for m in adapted.modules() if type(m).__name__ == "ProductKeyMemory"]
    assert mem.values.weight.dtype == torch.float32 and torch.equal(mem.values.weight, table.detach().float())


def test_sharded_safetensors(exported, tmp_path):
    from transformers import AutoModelForCausalLM

    model, cfg, _, tok = exported["gpt2like"]
    path = export_hf(
        model.state_dict(), cfg, os.path.join(TOK_DIR, tok), str(tmp_path / "sharded"), max_shard_size="1MB"
    )
    shards = [f for f in os.listdir(path) if f.startswith("model-") and f.endswith(".safetensors")]
    assert len(shards) >= 2 and "model.safetensors.index.json" in os.listdir(path)
    hf = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()
    ids = austen_ids(tok, 1)
    with torch.no_grad():
        assert (hf(ids).logits - native(model, "gpt", ids)).abs().max().item() < TOL


def test_refusals(exported, tmp_path):
    model, cfg, path, tok = exported["gpt2like"]
    sd = model.state_dict()
    with pytest.raises(ModelError, match="exists and is not empty"):
        export_hf(sd, cfg, os.path.join(TOK_DIR, tok), path)
    shard = dict(sd)
    name = next(k for k in sd if k.endswith("memory.values.weight"))
    shard[name] = sd[name][:, :32]  # one column shard of a TP=2 layout
    with pytest.raises(ModelError, match=r"value tables are not full \[256, 64\] tables .*consolidated"):
        export_hf(shard, cfg, os.path.join(TOK_DIR, tok), str(tmp_path / "x"))
    with pytest.raises(
        ModelError,
        match=r"does not fit the gpt config: missing \[\], unexpected "
        r"\['model.layers.0.extra.weight'\]",
    ):
        export_hf(
            {**sd, "decoder.layers.0.extra.weight": torch.zeros(1)},
            cfg,
            os.path.join(TOK_DIR, tok),
            str(tmp_path / "y"),
        )
    with pytest.raises(ModelError, match="'lm_head.dense.weight' has no exported name"):  # a BERT weight
        export_hf({**sd, "lm_head.dense.weight": torch.zeros(1)}, cfg, os.path.join(TOK_DIR, tok), str(tmp_path / "y"))
    assert not os.path.exists(tmp_path / "x") and not os.path.exists(tmp_path / "y")


@pytest.mark.parametrize("name", ["austen_gpt.model", "austen_bert.model"])
def test_sentencepiece_tokenizer_conversion_keeps_ids(name):
    import sentencepiece as spm

    from model.hf.tokenizer_export import check_same_ids, sentencepiece_to_fast

    path = os.path.join(TOK_DIR, name)
    fast = sentencepiece_to_fast(path)
    text = open(os.path.join(ROOT, "data_pipeline", "assets", "austen", "persuasion.txt")).read()[:100000]
    check_same_ids(fast, spm.SentencePieceProcessor(model_file=path).encode, path, text)  # raises on a difference
    assert len(fast) == 8192
    enc = fast("Emma Woodhouse", "handsome, clever, and rich")
    pieces = fast.convert_ids_to_tokens(enc["input_ids"])
    if "bert" in name:  # BERT inputs: [CLS] A [SEP] B [SEP] with segment ids, as in pretraining
        assert pieces[0] == "[CLS]" and pieces.count("[SEP]") == 2 and pieces[-1] == "[SEP]"
        assert enc["token_type_ids"][-1] == 1 and enc["token_type_ids"][0] == 0
    else:  # GPT: no special tokens added (documents are separated by <eod> in the data)
        assert not set(pieces) & {"<s>", "</s>", "<eod>"} and fast.eos_token == "<eod>"


def test_push_to_hub_errors_are_clear(exported, tmp_path):
    from model.hf.hub import push_to_hub

    _, _, path, _ = exported["bert_pre"]
    with pytest.raises(ModelError, match="not a valid repository id"):
        push_to_hub(path, "not a repo id!")
    with pytest.raises(ModelError, match=r"not an exported model \(missing config.json, README.md"):
        push_to_hub(str(tmp_path), "someone/pkm-bert")
    endpoint = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(ModelError, match=rf"cannot push to the Hub: {endpoint} is unreachable \(no network\?\)"):
        push_to_hub(path, "someone/pkm-bert", token="hf_not_a_real_token", endpoint=endpoint)
