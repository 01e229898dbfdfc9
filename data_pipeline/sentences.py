"""Sentence splitting for BERT preprocessing (no NLTK data ships in any package, so a rule).

Megatron's BERT sampler packs whole sentences of one document into a sample and skips documents
that contain a sentence longer than 512 tokens, so long sentences are cut into pieces.
"""

from __future__ import annotations

import re

# End of sentence: . ! ? (repeated), optional closing quotes/brackets, then whitespace and the start
# of the next sentence (capital letter, digit, quote or bracket). Abbreviations like "Mr." and
# "Mrs." followed by a capitalised name are the common exception in English prose.
_END = re.compile(
    r"""(?<!\bMr)(?<!\bMrs)(?<!\bDr)(?<!\bSt)(?<!\bMs)([.!?]+["'\u201d\u2019)\]]*)\s+(?=["'\u201c\u2018(\[A-Z0-9_])"""
)


def split_sentences(text: str) -> list[str]:
    """Sentences with internal whitespace runs (hard line wraps) collapsed to one space."""
    text = " ".join(text.split())
    out, start = [], 0
    for m in _END.finditer(text):
        out.append(text[start : m.end(1)])
        start = m.end()
    if start < len(text):
        out.append(text[start:])
    return [s for s in out if s]


def cut_long(ids: list[int], max_len: int) -> list[list[int]]:
    return [ids[i : i + max_len] for i in range(0, len(ids), max_len)] or [[]]
