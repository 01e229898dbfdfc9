"""One `Tokenizer` interface over sentencepiece models and HF tokenizer directories.

`load_tokenizer(None)` is the bundled demo GPT tokenizer (sentencepiece BPE, 8192 pieces, trained
on the six bundled Austen novels); `"bert"`/`"gpt"` name the bundled recipes; a `.model` path is sentencepiece;
a directory is an HF tokenizer (e.g. the WordPiece `vocab.txt`/`tokenizer.json` that ships with a
pretrained BERT checkpoint: a model initialised from it must train with its vocabulary).

`identity` (kind, name, path, sha256 of the files, vocab size) goes into every preprocessed
dataset's manifest, so a dataset made with another vocabulary is refused at training start.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from functools import cached_property

import numpy as np

from data_pipeline.errors import DataError

ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")
BUNDLED = {
    "gpt": os.path.join(ASSETS, "tokenizer", "austen_gpt.model"),
    "bert": os.path.join(ASSETS, "tokenizer", "austen_bert.model"),
}
# Files of an HF tokenizer directory that determine the ids (hashed into the identity).
_HF_FILES = (
    "tokenizer.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "spiece.model",
    "sentencepiece.bpe.model",
    "tokenizer.model",
    "special_tokens_map.json",
    "tokenizer_config.json",
    "added_tokens.json",
)


def _sha256(paths: Sequence[str]) -> str:
    """Content hash: of the file itself for one file (= `sha256sum`), of names and contents for several."""
    h = hashlib.sha256()
    for p in paths:
        if len(paths) > 1:
            h.update(os.path.basename(p).encode() + b"\0")
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


class Tokenizer:
    """Common interface. Special ids are None when the vocabulary has no such token."""

    kind: str = ""
    path: str = ""
    vocab_size: int
    eod_id: int | None = None
    pad_id: int | None = None
    cls_id: int | None = None
    sep_id: int | None = None
    mask_id: int | None = None
    unk_id: int | None = None

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: Sequence[int]) -> str:
        raise NotImplementedError

    def id_to_piece(self, i: int) -> str:
        raise NotImplementedError

    @property
    def special_ids(self) -> set[int]:
        return {
            i for i in (self.eod_id, self.pad_id, self.cls_id, self.sep_id, self.mask_id, self.unk_id) if i is not None
        }

    @cached_property
    def word_start(self) -> np.ndarray:
        """bool [vocab_size]: True where a piece begins a new word (for whole-word masking)."""
        raise NotImplementedError

    @cached_property
    def identity(self) -> dict:
        raise NotImplementedError

    def __getstate__(self):  # sent to worker processes: reload from the path there
        return {"path": self.path}

    def __setstate__(self, state):
        self.__init__(state["path"])

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.path!r}, vocab_size={self.vocab_size})"


class SentencePieceTokenizer(Tokenizer):
    kind = "sentencepiece"

    def __init__(self, path: str):
        import sentencepiece as spm

        self.path = os.path.abspath(path)
        if not os.path.isfile(self.path):
            raise DataError(f"{path}: sentencepiece model not found")
        try:
            self.sp = spm.SentencePieceProcessor(model_file=self.path)
        except (RuntimeError, OSError) as e:
            raise DataError(f"{path}: not a sentencepiece model ({e})") from None
        self.vocab_size = self.sp.get_piece_size()
        piece = {
            self.sp.id_to_piece(i): i for i in range(self.vocab_size) if self.sp.is_control(i) or self.sp.is_unknown(i)
        }
        eos = self.sp.eos_id()
        self.eod_id = piece.get("<eod>", eos if eos >= 0 else None)
        self.pad_id = self.sp.pad_id() if self.sp.pad_id() >= 0 else None
        self.unk_id = self.sp.unk_id() if self.sp.unk_id() >= 0 else None
        self.cls_id = piece.get("[CLS]", piece.get("<cls>"))
        self.sep_id = piece.get("[SEP]", piece.get("<sep>"))
        self.mask_id = piece.get("[MASK]", piece.get("<mask>"))
        if self.eod_id is None:  # BERT vocabularies: documents end with [SEP]
            self.eod_id = self.sep_id

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        # one C++ call per batch; one thread: parallelism comes from worker processes
        return self.sp.encode(list(texts), num_threads=1)

    def decode(self, ids: Sequence[int]) -> str:
        return self.sp.decode([int(i) for i in ids])

    def id_to_piece(self, i: int) -> str:
        return self.sp.id_to_piece(int(i))

    @cached_property
    def word_start(self) -> np.ndarray:
        # A word starts at a piece beginning with '▁' (sentencepiece's whitespace mark); control
        # symbols are boundaries of their own.
        out = np.zeros(self.vocab_size, dtype=bool)
        for i in range(self.vocab_size):
            out[i] = self.sp.id_to_piece(i).startswith("\u2581") or self.sp.is_control(i) or self.sp.is_unknown(i)
        return out

    @cached_property
    def identity(self) -> dict:
        return {
            "kind": self.kind,
            "name": os.path.basename(self.path),
            "path": self.path,
            "sha256": _sha256([self.path]),
            "vocab_size": self.vocab_size,
        }


class HFTokenizer(Tokenizer):
    kind = "hf"

    def __init__(self, path: str):
        self.path = os.path.abspath(path)
        files = [os.path.join(self.path, f) for f in _HF_FILES if os.path.isfile(os.path.join(self.path, f))]
        if not files:
            raise DataError(f"{path}: no tokenizer files (expected one of tokenizer.json, vocab.txt, ...)")
        self._files = files
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # parallelism comes from workers
        try:
            from transformers import AutoTokenizer

            self.tok = AutoTokenizer.from_pretrained(self.path, local_files_only=True)
        except Exception as e:  # transformers raises many types for a broken directory
            raise DataError(f"{path}: cannot load HF tokenizer ({type(e).__name__}: {e})") from None
        t = self.tok
        self.vocab_size = len(t)
        self.pad_id = t.pad_token_id
        self.cls_id = t.cls_token_id
        self.sep_id = t.sep_token_id
        self.mask_id = t.mask_token_id
        self.unk_id = t.unk_token_id
        self.eod_id = t.eos_token_id if t.eos_token_id is not None else t.sep_token_id

    def encode(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self.tok(list(texts), add_special_tokens=False)["input_ids"]

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode([int(i) for i in ids])

    def id_to_piece(self, i: int) -> str:
        return self.tok.convert_ids_to_tokens(int(i))

    @cached_property
    def word_start(self) -> np.ndarray:
        # WordPiece marks continuations with '##'; byte-level BPE marks word starts with 'Ġ'.
        pieces = self.tok.convert_ids_to_tokens(list(range(self.vocab_size)))
        if any(p.startswith("##") for p in pieces if p):
            return np.array([not (p or "").startswith("##") for p in pieces], dtype=bool)
        return np.array([(p or "").startswith(("\u0120", "\u2581")) for p in pieces], dtype=bool) | np.isin(
            np.arange(self.vocab_size), list(self.special_ids)
        )

    @cached_property
    def identity(self) -> dict:
        return {
            "kind": self.kind,
            "name": os.path.basename(self.path.rstrip("/")),
            "path": self.path,
            "sha256": _sha256(self._files),
            "vocab_size": self.vocab_size,
            "files": [os.path.basename(f) for f in self._files],
        }


def load_tokenizer(spec: str | None = None) -> Tokenizer:
    """None = the bundled demo GPT tokenizer; "gpt"/"bert" = the bundled recipes;
    a `.model` file = sentencepiece; a directory = HF tokenizer."""
    if spec is None or spec in BUNDLED:
        return SentencePieceTokenizer(BUNDLED[spec or "gpt"])
    if os.path.isdir(spec):
        return HFTokenizer(spec)
    if os.path.isfile(spec):
        return SentencePieceTokenizer(spec)
    raise DataError(
        f"tokenizer {spec!r}: no such file or directory (expected a sentencepiece .model, "
        f"an HF tokenizer directory, or one of {sorted(BUNDLED)})"
    )
