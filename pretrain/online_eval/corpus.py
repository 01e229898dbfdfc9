"""Long documents to read online: the bundled books, text files, jsonl, or a preprocessed indexed dataset.

A `Document` is either text (tokenized with the model's tokenizer) or token ids (an indexed dataset
made by `pkm data preprocess` with the model's tokenizer). Bits per byte need the UTF-8 size of what
was scored, so ids are decoded once to count it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pretrain.errors import PretrainError

BOOKS_DIR = Path(__file__).resolve().parent / "assets" / "books"
BOOK_NAMES = ("great_expectations", "the_war_of_the_worlds", "twenty_thousand_leagues_under_the_sea")
# distribution-shift documents (archaic scripture, extract_kjv.py): read by name only, never part of `books`
SHIFT_NAMES = ("kjv_genesis", "kjv_luke")


@dataclass
class Document:
    name: str
    text: str | None = None
    ids: list[int] | None = None  # pre-tokenized (indexed dataset)


@dataclass
class TokenizedDocument:
    name: str
    ids: list[int]  # what the model reads: [doc-start token] + document tokens
    n_scored: int  # targets scored = len(ids) - 1
    n_bytes: int  # UTF-8 bytes of the scored text (for bits per byte)
    meta: dict = field(default_factory=dict)


def bundled_books(names: Sequence[str] | None = None) -> list[Document]:
    """The public-domain evaluation books shipped with the package (never part of training data);
    by default BOOK_NAMES, the KJV excerpts (SHIFT_NAMES) only when named."""
    names = list(names or BOOK_NAMES)
    docs = []
    for name in names:
        path = BOOKS_DIR / f"{name}.txt"
        if not path.is_file():
            known = ", ".join(BOOK_NAMES + SHIFT_NAMES)
            raise PretrainError(f"bundled book {name!r} not found at {path} (known: {known})")
        docs.append(Document(name=name, text=path.read_text(encoding="utf-8")))
    return docs


def load_corpus(spec: str, json_key: str = "text", max_docs: int | None = None) -> list[Document]:
    """`books` / `books:NAME[,NAME]` (bundled), a .txt file (one document), a .jsonl/.json file (one
    document per record, field `json_key`), a directory (its .txt files, one document each, sorted),
    or an indexed-dataset prefix (PREFIX.bin + PREFIX.idx, one document per indexed document)."""
    if spec == "books" or spec.startswith("books:"):
        docs = bundled_books(spec.split(":", 1)[1].split(",") if ":" in spec else None)
    elif os.path.isfile(spec + ".idx") and os.path.isfile(spec + ".bin"):
        docs = _indexed_documents(spec)
    elif spec.endswith((".bin", ".idx")) and os.path.isfile(spec[:-4] + ".idx"):
        docs = _indexed_documents(spec[:-4])
    elif os.path.isdir(spec):
        files = sorted(Path(spec).glob("*.txt"))
        if not files:
            raise PretrainError(f"{spec}: directory holds no .txt documents")
        docs = [Document(name=f.stem, text=_read_text(f)) for f in files]
    elif os.path.isfile(spec):
        if spec.endswith((".jsonl", ".json")):
            docs = _jsonl_documents(spec, json_key)
        else:
            docs = [Document(name=Path(spec).stem, text=_read_text(Path(spec)))]
    else:
        raise PretrainError(
            f"{spec}: no such corpus (give `books`, a .txt/.jsonl file, a directory, or an indexed-dataset prefix)"
        )
    docs = [d for d in docs if (d.text if d.text is not None else d.ids)]
    if not docs:
        raise PretrainError(f"{spec}: every document is empty")
    return docs[:max_docs] if max_docs else docs


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise PretrainError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def _jsonl_documents(path: str, json_key: str) -> list[Document]:
    docs = []
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise PretrainError(f"{path}:{line_no}: not UTF-8 text ({e.reason} at byte {e.start})") from None
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except ValueError as e:
                raise PretrainError(f"{path}:{line_no}: not a JSON object ({e})") from None
            if not isinstance(rec, dict) or not isinstance(rec.get(json_key), str):
                raise PretrainError(f"{path}:{line_no}: record has no string field {json_key!r}")
            name = str(rec.get("id", rec.get("title", f"{Path(path).stem}:{line_no}")))
            docs.append(Document(name=name, text=rec[json_key]))
    return docs


def _indexed_documents(prefix: str) -> list[Document]:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    try:
        ds = IndexedDataset(prefix, mmap=True)
    except Exception as e:  # a truncated or foreign .idx
        raise PretrainError(f"{prefix}.idx: cannot read the indexed dataset ({e})") from None
    bounds = ds.document_indices
    docs = []
    for d in range(len(bounds) - 1):
        ids: list[int] = []
        for s in range(int(bounds[d]), int(bounds[d + 1])):
            ids.extend(int(t) for t in ds[s])
        docs.append(Document(name=f"{Path(prefix).name}:{d}", ids=ids))
    return docs


def doc_start_id(tokenizer, doc_start: str) -> int | None:
    """The token each document is read after: bos (else eos) for `auto`, nothing for `none`."""
    if doc_start == "none":
        return None
    if doc_start != "auto":
        return int(doc_start)
    for tok_id in (getattr(tokenizer, "bos_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if tok_id is not None:
            return int(tok_id)
    return None


def tokenize(
    docs: Sequence[Document],
    tokenizer,
    doc_start: str = "auto",
    max_tokens: int | None = None,
    vocab_size: int | None = None,
) -> list[TokenizedDocument]:
    """Token ids per document (truncated to `max_tokens` document tokens) and the bytes they cover."""
    start = doc_start_id(tokenizer, doc_start)
    out = []
    for doc in docs:
        if doc.ids is not None:
            ids = list(doc.ids)
        else:
            ids = tokenizer(doc.text, add_special_tokens=False, verbose=False)["input_ids"]
        if max_tokens is not None:
            ids = ids[:max_tokens]
        if vocab_size is not None and ids and max(ids) >= vocab_size:
            raise PretrainError(
                f"document {doc.name}: token id {max(ids)} >= the model's vocabulary size "
                f"{vocab_size} (was it tokenized with another tokenizer?)"
            )
        scored = ids if start is not None else ids[1:]
        if doc.ids is None and max_tokens is None and start is not None:
            n_bytes = len(doc.text.encode("utf-8"))
        else:  # truncated, pre-tokenized or without a start token: count what the scored ids spell
            n_bytes = len(tokenizer.decode(scored, skip_special_tokens=True).encode("utf-8"))
        full = ([start] if start is not None else []) + ids
        if len(full) < 2:
            continue
        out.append(TokenizedDocument(name=doc.name, ids=full, n_scored=len(full) - 1, n_bytes=n_bytes))
    if not out:
        raise PretrainError("online eval: no document has a token to score")
    return out
