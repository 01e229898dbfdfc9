"""Data pipeline spine on real text (the bundled Austen novels): tokenizers, preprocessing,
GPT / masked-LM samples and the resumable global batch sampler. Runs in ~30 s on 2 cores."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch

from data_pipeline.config import DataConfig
from data_pipeline.errors import DataError
from data_pipeline.preprocess import (
    AUSTEN_DIR,
    check_tokenizer_matches,
    demo_files,
    ensure_demo_corpus,
    is_complete,
    preprocess,
    read_manifest,
    remove_leftovers,
)
from data_pipeline.samplers import GlobalBatchSampler, build_datasets, collate
from data_pipeline.tokenizer import load_tokenizer
from tests.conftest import ROOT

BOOK = os.path.join(AUSTEN_DIR, "persuasion.txt")


def paragraphs(path: str) -> list[str]:
    """Independent reference for blank-line documents: split on lines holding only whitespace."""
    text = open(path, encoding="utf-8").read()
    return [b.strip("\r\n") for b in re.split(r"\n[ \t]*\n", text) if b.strip()]


@pytest.fixture(scope="module")
def gpt_tok():
    return load_tokenizer(None)


@pytest.fixture(scope="module")
def bert_tok():
    return load_tokenizer("bert")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("data_cache"))


@pytest.mark.parametrize("recipe", ["gpt", "bert"])
def test_round_trip_whole_novels(recipe):
    tok = load_tokenizer(recipe)
    for path in demo_files():
        doc = open(path, encoding="utf-8").read()
        ids = tok.encode(doc)
        assert tok.decode(ids) == doc, path
        assert max(ids) < tok.vocab_size and tok.unk_id not in ids  # byte fallback: nothing unknown
    # unseen characters and odd whitespace also survive (byte fallback, identity normalisation)
    odd = "  Café 1814 — “quoted” ☃\ttab\n\nlast  "
    assert tok.decode(tok.encode(odd)) == odd


def test_special_ids(gpt_tok, bert_tok):
    assert gpt_tok.vocab_size == 8192 and gpt_tok.id_to_piece(gpt_tok.eod_id) == "<eod>"
    assert gpt_tok.pad_id is not None and gpt_tok.pad_id != gpt_tok.eod_id
    assert [
        bert_tok.id_to_piece(i)
        for i in (bert_tok.pad_id, bert_tok.unk_id, bert_tok.cls_id, bert_tok.sep_id, bert_tok.mask_id)
    ] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    assert gpt_tok.identity["sha256"] != bert_tok.identity["sha256"]


def test_preprocess_counts_and_contents(tmp_path, gpt_tok):
    prefix = str(tmp_path / "persuasion")
    m = preprocess([BOOK], prefix, gpt_tok, workers=2, text_mode="blank-line", progress=False)
    docs = paragraphs(BOOK)
    expected = [gpt_tok.encode(d) + [gpt_tok.eod_id] for d in docs]
    assert m["documents"] == len(docs) == m["sources"][0]["documents"]
    assert m["tokens"] == sum(map(len, expected))
    assert m["skipped_total"] == 0 and m["tokenizer"]["sha256"] == gpt_tok.identity["sha256"]
    assert read_manifest(prefix) == json.load(open(prefix + ".manifest.json"))
    assert not [f for f in os.listdir(tmp_path) if ".tmp" in f]  # temporaries renamed or removed

    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(prefix)
    assert len(ds) == len(docs)
    for i in (0, 1, len(docs) // 2, len(docs) - 1):
        assert ds[i].tolist() == expected[i]
        assert gpt_tok.decode(ds[i][:-1]) == docs[i]
    # same bytes with in-process tokenization (workers=0)
    preprocess([BOOK], str(tmp_path / "inline"), gpt_tok, workers=0, text_mode="blank-line", progress=False)
    assert open(prefix + ".bin", "rb").read() == open(str(tmp_path / "inline.bin"), "rb").read()


def test_demo_corpus_cached(cache, gpt_tok):
    prefix = ensure_demo_corpus(cache, "gpt")
    m = read_manifest(prefix)
    assert m["documents"] == sum(len(paragraphs(f)) for f in demo_files())
    mtime = os.path.getmtime(prefix + ".bin")
    assert ensure_demo_corpus(cache, "gpt") == prefix and os.path.getmtime(prefix + ".bin") == mtime


BUILD_DEMO = """
import logging, sys
from data_pipeline.preprocess import ensure_demo_corpus
logging.basicConfig(level=logging.INFO, format="%(message)s")
print(ensure_demo_corpus(sys.argv[1], "gpt"))
"""


def test_two_runs_sharing_a_cache_build_the_demo_corpus_once(tmp_path):
    """Two runs started together on one data.cache_dir: one builds, the other waits and reuses it (without
    the lock both built, and the second's start-up cleanup deleted the first's temporary files)."""
    cmd = [sys.executable, "-c", BUILD_DEMO, str(tmp_path)]
    procs = [subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in "ab"]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outs]
    prefixes = {out.strip().splitlines()[-1] for out, _ in outs}
    assert len(prefixes) == 1 and is_complete(prefixes.pop())
    assert sum(err.count("building the demo corpus") for _, err in outs) == 1, outs


def test_leftovers_of_live_processes_are_kept(tmp_path):
    """Start-up cleanup removes the temporary files of this process and of dead ones, not a live run's."""
    finished = subprocess.Popen(["true"])
    finished.wait()
    live = subprocess.Popen(["sleep", "60"])
    try:
        prefix = str(tmp_path / "corpus")
        files = {
            who: f"{prefix}.tmp{pid}.bin"
            for who, pid in (("live", live.pid), ("gone", finished.pid), ("own", os.getpid()))
        }
        for f in files.values():
            open(f, "wb").close()
        remove_leftovers(prefix)
        assert {who: os.path.exists(f) for who, f in files.items()} == {"live": True, "gone": False, "own": False}
    finally:
        live.kill()
        live.wait()


def test_tokenizer_mismatch_refused(cache, bert_tok):
    prefix = ensure_demo_corpus(cache, "gpt")
    with pytest.raises(DataError, match="austen_gpt.model .*austen_bert.model"):
        check_tokenizer_matches(prefix, bert_tok)
    with pytest.raises(DataError, match="austen_gpt"):
        build_datasets(DataConfig(paths=[prefix]), "bert", 64, bert_tok, dict(train=8), 1, cache)


def _gpt(cache, tok, seed=1234, cache_dir=None):
    return build_datasets(DataConfig(), "gpt", 64, tok, dict(train=512, valid=32, test=32), seed, cache_dir or cache)


def test_gpt_samples(cache, gpt_tok, tmp_path):
    train, valid, test = _gpt(cache, gpt_tok)
    assert len(train) >= 512 and len(valid) >= 32 and len(test) >= 32
    batch = collate([train[i] for i in range(8)])
    assert batch["tokens"].shape == batch["labels"].shape == batch["loss_mask"].shape == (8, 64)
    assert batch["tokens"].dtype == batch["labels"].dtype == torch.int64 and batch["loss_mask"].dtype == torch.float32
    assert torch.equal(batch["tokens"][:, 1:], batch["labels"][:, :-1])  # labels = next token
    assert batch["loss_mask"].min() == 1  # nothing is padding in a full sample
    # samples cross document boundaries: EOD inside samples
    assert (torch.stack([train[i]["tokens"] for i in range(64)]) == gpt_tok.eod_id).any()
    # determinism: the same seed in another cache directory gives the same samples, another seed not
    again = _gpt(cache, gpt_tok, cache_dir=str(tmp_path))[0]
    other = _gpt(cache, gpt_tok, seed=99, cache_dir=str(tmp_path))[0]
    for i in (0, 7, 300):
        assert torch.equal(train[i]["tokens"], again[i]["tokens"])
    assert not all(torch.equal(train[i]["tokens"], other[i]["tokens"]) for i in range(4))


def test_bert_masking(cache, bert_tok):
    train, _, _ = build_datasets(DataConfig(), "bert", 128, bert_tok, dict(train=400, valid=16, test=16), 7, cache)
    items = [train[i] for i in range(400)]
    b = collate(items)
    tokens, labels, loss, pad = b["tokens"], b["labels"], b["loss_mask"], b["padding_mask"]
    assert pad.dtype == torch.bool and b["types"].abs().sum() == 0
    assert (labels[:, 0] == bert_tok.cls_id).all() and (tokens[:, 0] == bert_tok.cls_id).all()
    lengths = (~pad).sum(1)
    assert (labels[torch.arange(len(labels)), lengths - 1] == bert_tok.sep_id).all()  # [CLS] ... [SEP]
    assert (tokens[pad] == bert_tok.pad_id).all() and (loss[pad] == 0).all()
    assert not pad[:, :2].any() and pad.any()  # some short samples are padded
    masked = loss.bool()
    content = (~pad).sum() - 2 * len(items)  # tokens without [CLS]/[SEP]
    # 15% of the tokens (megatron rounds per sample: tolerance 1.5 points)
    assert abs(masked.sum().item() / content.item() - 0.15) < 0.015
    n = masked.sum().item()
    as_mask = (tokens[masked] == bert_tok.mask_id).sum().item() / n
    unchanged = (tokens[masked] == labels[masked]).sum().item() / n
    # 80/10/10 over ~7000 masked tokens: 3 standard deviations ~ 1.5 points
    assert abs(as_mask - 0.8) < 0.02 and abs(unchanged - 0.1) < 0.015 and abs(1 - as_mask - unchanged - 0.1) < 0.015
    assert (tokens[~masked] == labels[~masked]).all()
    # deterministic
    again = train[5]
    assert all(torch.equal(again[k], items[5][k]) for k in again)


def test_whole_word_masking(cache, bert_tok):
    train, _, _ = build_datasets(
        DataConfig(whole_word_masking=True), "bert", 128, bert_tok, dict(train=200, valid=16, test=16), 7, cache
    )
    starts = bert_tok.word_start
    split_words = 0
    for i in range(200):
        it = train[i]
        labels, loss, n = it["labels"].tolist(), it["loss_mask"].tolist(), int((~it["padding_mask"]).sum())
        for j in range(1, n - 2):
            if not starts[labels[j + 1]] and labels[j + 1] != bert_tok.sep_id:  # j+1 continues j's word
                split_words += loss[j] != loss[j + 1]
    # a whole word is masked or not; only a word cut by truncation at the sample edge may differ
    assert split_words <= 2


def test_sampler_resume_with_other_dp_size():
    total, gbs, mbs = 200, 16, 2

    def steps(dp_size, consumed, n):
        ranks = [GlobalBatchSampler(total, gbs, mbs, r, dp_size, consumed) for r in range(dp_size)]
        its = [iter(s) for s in ranks]
        out = []
        for _ in range(n):
            per_rank = [next(it) for it in its]
            assert all(len(mb) == gbs // (mbs * dp_size) and all(len(x) == mbs for x in mb) for mb in per_rank)
            out.append(sorted(i for mb in per_rank for x in mb for i in x))
        assert len({s.consumed_samples for s in ranks}) == 1
        return out, ranks[0].state_dict()

    reference, _ = steps(1, 0, 12)
    first, state = steps(2, 0, 5)
    assert state == {"consumed_samples": 5 * gbs}
    second, _ = steps(4, state["consumed_samples"], 7)
    assert first + second == reference  # exactly the next samples after the dp change
    assert reference[0] == list(range(16))
    s = GlobalBatchSampler(total, gbs, mbs)
    s.load_state_dict({"consumed_samples": 192})
    assert len(s) == 0 and list(s) == []
    with pytest.raises(DataError, match="multiple"):
        GlobalBatchSampler(total, 16, 3, 0, 2)
