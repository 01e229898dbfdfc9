"""A larger real corpus from a package: the GCIDE dictionary (Webster 1913 + WordNet, 40 MB of text,
`apt-get install dict-gcide`), streamed from its gzip file through 2 workers in 1 MiB chunks."""

from __future__ import annotations

import gzip
import os
import random
import re

import pytest

from data_pipeline.preprocess import preprocess
from data_pipeline.tokenizer import load_tokenizer

GCIDE = "/usr/share/dictd/gcide.dict.dz"  # dictzip = gzip with an index: plain gzip readers work


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isfile(GCIDE), reason=f"{GCIDE} missing: apt-get install -y dict-gcide")
def test_gcide_dictionary_streams_through(tmp_path):
    src = tmp_path / "gcide.txt.gz"
    os.symlink(GCIDE, src)
    tok = load_tokenizer(None)
    m = preprocess(
        [str(src)], str(tmp_path / "gcide"), tok, workers=2, text_mode="blank-line", on_error="skip", progress=False
    )
    text = gzip.open(GCIDE, "rb").read()
    blocks = [b for b in re.split(rb"\n[ \t\r\f\v]*\n", text) if b.strip()]
    assert m["sources"][0]["bytes"] == len(text)
    assert m["documents"] + m["skipped_total"] == len(blocks)
    assert m["tokens"] > 5_000_000 and m["skipped_by_reason"].keys() <= {"non_utf8"}

    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(str(tmp_path / "gcide"))
    good = [b.decode("utf-8").strip("\r\n") for b in blocks if _utf8(b)]
    assert len(ds) == len(good) == m["documents"]
    for i in random.Random(0).sample(range(len(good)), 200):  # exact text back, EOD at the end
        assert ds[i][-1] == tok.eod_id and tok.decode(ds[i][:-1]) == good[i]


def _utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False
