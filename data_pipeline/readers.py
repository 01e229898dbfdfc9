"""Corpus readers: turn input files into chunks of raw records, streaming, in input order.

The main process only reads bytes and cuts them at record boundaries; decoding, JSON parsing and
validation happen in the worker processes (`parse_chunk`), so reading never becomes the bottleneck
and memory stays bounded by (chunk size x chunks in flight), whatever the corpus size.

Inputs (globs allowed):
- `*.jsonl`, `*.json` (one JSON object per line), optionally `.gz`: field `json_key`;
- `*.txt` and other files: plain text, one document per file (`text_mode="file"`) or one per
  blank-line-separated block (`text_mode="blank-line"`), optionally `.gz`;
- `*.parquet`: column `json_key`, read in row batches;
- a directory written by `datasets.Dataset.save_to_disk`;
- `datasets:<builder>:<files or glob>` runs `datasets.load_dataset(builder, data_files=..., streaming=True)`
  on local files (e.g. `datasets:csv:data/*.csv`).
Bad records are returned with their file:line and a reason, never silently dropped.
"""

from __future__ import annotations

import glob
import gzip
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field

from data_pipeline.errors import DataError

JSONL_EXT = (".jsonl", ".json", ".ndjson")
_BLANK_LINE = re.compile(rb"\n[ \t\r\f\v]*\n")


@dataclass
class Chunk:
    source: str
    kind: str  # "jsonl" | "text" | "blocks" | "rows"
    first_line: int  # 1-based line (or row) number of the first record
    data: object  # bytes for jsonl/text/blocks, list[(row, value)] for rows
    json_key: str = "text"
    nbytes: int = 0


@dataclass
class BadRecord:
    source: str
    line: int | None
    reason: str
    kind: str  # malformed_json | missing_field | not_a_string | non_utf8 | empty_document

    def where(self) -> str:
        return f"{self.source}:{self.line}" if self.line is not None else self.source

    def to_json(self) -> dict:
        return {"source": self.source, "line": self.line, "kind": self.kind, "reason": self.reason}


@dataclass
class Records:
    """What a worker gets out of a chunk: (line, text) documents and the bad records."""

    docs: list = field(default_factory=list)
    bad: list = field(default_factory=list)


def expand_inputs(patterns: list[str]) -> list[str]:
    """Globs -> sorted, de-duplicated list of input sources (files, dataset dirs, datasets: specs)."""
    out: list[str] = []
    for pat in patterns:
        if pat.startswith("datasets:"):
            out.append(pat)
            continue
        matches = sorted(glob.glob(os.path.expanduser(pat), recursive=True))
        if not matches:
            raise DataError(f"input {pat!r}: no such file (glob matched nothing)")
        for m in matches:
            if os.path.isdir(m) and not is_saved_dataset(m):
                raise DataError(
                    f"input {m}: a directory that is not a saved `datasets` dataset "
                    "(give files or a glob like DIR/*.jsonl)"
                )
            if m not in out:
                out.append(m)
    return out


def is_saved_dataset(path: str) -> bool:
    return os.path.isdir(path) and any(
        os.path.isfile(os.path.join(path, f)) for f in ("dataset_info.json", "state.json", "dataset_dict.json")
    )


def _open_binary(path: str):
    return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")


def _base(path: str) -> str:
    return path[:-3] if path.endswith(".gz") else path


def iter_chunks(
    sources: list[str], json_key: str = "text", text_mode: str = "file", chunk_bytes: int = 1 << 20
) -> Iterator[Chunk]:
    for src in sources:
        if src.startswith("datasets:"):
            yield from _dataset_rows(src, json_key, load=True)
        elif is_saved_dataset(src):
            yield from _dataset_rows(src, json_key, load=False)
        elif _base(src).endswith(".parquet"):
            yield from _parquet_rows(src, json_key)
        elif _base(src).endswith(JSONL_EXT):
            yield from _split_bytes(src, "jsonl", json_key, chunk_bytes, boundary=b"\n")
        elif text_mode == "blank-line":
            yield from _split_bytes(src, "blocks", json_key, chunk_bytes, boundary=None)
        elif text_mode == "file":
            with _open_binary(src) as f:
                data = f.read()
            yield Chunk(src, "text", 1, data, json_key, len(data))
        else:
            raise DataError(f"text_mode {text_mode!r}: expected 'file' or 'blank-line'")


def _split_bytes(src: str, kind: str, json_key: str, chunk_bytes: int, boundary: bytes | None):
    """Cut a file into ~chunk_bytes pieces at line (jsonl) or blank-line (blocks) boundaries."""
    line = 1
    rest = b""
    want = chunk_bytes
    with _open_binary(src) as f:
        while True:
            block = f.read(want)
            buf = rest + block
            if not block:
                if buf:
                    yield Chunk(src, kind, line, buf, json_key, len(buf))
                return
            if boundary is not None:
                cut = buf.rfind(boundary) + 1
            else:
                last = None
                for last in _BLANK_LINE.finditer(buf):  # noqa: B007 - the last match is what we want
                    pass
                cut = last.end() if last else 0
            if cut <= 0:  # no boundary yet (one huge record): read as much again, so time stays linear
                rest, want = buf, max(chunk_bytes, len(buf))
                continue
            want = chunk_bytes
            piece, rest = buf[:cut], buf[cut:]
            yield Chunk(src, kind, line, piece, json_key, len(piece))
            line += piece.count(b"\n")


def _rows_to_chunks(src: str, json_key: str, batches) -> Iterator[Chunk]:
    row = 1
    for values in batches:
        data = list(enumerate(values, start=row))
        row += len(values)
        yield Chunk(
            src, "rows", data[0][0] if data else row, data, json_key, sum(len(v) for _, v in data if isinstance(v, str))
        )


def _parquet_rows(src: str, json_key: str) -> Iterator[Chunk]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(src)
    except Exception as e:  # pyarrow raises ArrowInvalid/OSError for broken files
        raise DataError(f"{src}: cannot read parquet ({e})") from None
    if json_key not in pf.schema_arrow.names:
        yield Chunk(
            src, "rows", None, f"no column {json_key!r} (columns: {', '.join(pf.schema_arrow.names)})", json_key
        )
        return
    batches = (b.column(0).to_pylist() for b in pf.iter_batches(batch_size=2048, columns=[json_key]))
    yield from _rows_to_chunks(src, json_key, batches)


def _dataset_rows(src: str, json_key: str, load: bool) -> Iterator[Chunk]:
    import datasets

    if load:
        try:
            _, builder, files = src.split(":", 2)
        except ValueError:
            raise DataError(f"input {src!r}: expected datasets:<builder>:<files or glob>") from None
        data_files = sorted(glob.glob(files)) or files
        try:
            ds = datasets.load_dataset(builder, data_files=data_files, split="train", streaming=True)
        except Exception as e:  # datasets raises many types for bad local inputs
            raise DataError(f"input {src}: datasets.load_dataset failed ({type(e).__name__}: {e})") from None
    else:
        try:
            ds = datasets.load_from_disk(src)
        except Exception as e:
            raise DataError(f"input {src}: datasets.load_from_disk failed ({type(e).__name__}: {e})") from None
        if isinstance(ds, datasets.DatasetDict):
            raise DataError(f"input {src}: a DatasetDict ({', '.join(ds)}); give one split's directory")
    names = ds.column_names if ds.column_names is not None else None
    if names is not None and json_key not in names:
        yield Chunk(src, "rows", None, f"no column {json_key!r} (columns: {', '.join(names)})", json_key)
        return
    batches = (b[json_key] for b in ds.iter(batch_size=2048))
    yield from _rows_to_chunks(src, json_key, batches)


def parse_chunk(chunk: Chunk) -> Records:
    """Decode and validate one chunk (runs in a worker). Documents keep their text exactly."""
    out = Records()
    src = chunk.source
    if chunk.kind == "rows" and isinstance(chunk.data, str):  # file-level problem (missing column)
        out.bad.append(BadRecord(src, None, chunk.data, "missing_field"))
        return out
    if chunk.kind == "jsonl":
        key = chunk.json_key
        for i, raw in enumerate(chunk.data.split(b"\n")):
            if not raw.strip():
                continue  # blank lines between json records are not documents
            line = chunk.first_line + i
            try:
                obj = json.loads(raw)
            except UnicodeDecodeError as e:
                out.bad.append(BadRecord(src, line, f"non-UTF-8 bytes at byte {e.start} of the line", "non_utf8"))
                continue
            except ValueError as e:
                out.bad.append(BadRecord(src, line, f"malformed JSON ({e.args[0] if e.args else e})", "malformed_json"))
                continue
            if not isinstance(obj, dict) or key not in obj:
                out.bad.append(BadRecord(src, line, f"missing field {key!r}", "missing_field"))
            else:
                _add_field(out, src, line, key, obj[key])
    elif chunk.kind == "text":
        _add_text(out, src, 1, chunk.data)
    elif chunk.kind == "blocks":
        pos, line = 0, chunk.first_line
        for m in _BLANK_LINE.finditer(chunk.data):
            _add_block(out, src, line, chunk.data[pos : m.start()])
            line += chunk.data.count(b"\n", pos, m.end())
            pos = m.end()
        _add_block(out, src, line, chunk.data[pos:])
    elif chunk.kind == "rows":
        for row, value in chunk.data:
            if value is None:
                out.bad.append(BadRecord(src, row, f"missing field {chunk.json_key!r}", "missing_field"))
            else:
                _add_field(out, src, row, chunk.json_key, value)
    else:
        raise ValueError(chunk.kind)
    return out


def _add_field(out: Records, src: str, line: int, key: str, value) -> None:
    """A record's text field (JSON lines and table rows alike): a document, or the reason it is not one."""
    if not isinstance(value, str):
        out.bad.append(BadRecord(src, line, f"field {key!r} is {type(value).__name__}, not a string", "not_a_string"))
    elif not value.strip():
        out.bad.append(BadRecord(src, line, "empty document", "empty_document"))
    else:
        out.docs.append((line, value))


def _add_block(out: Records, src: str, line: int, block: bytes) -> None:
    if block.strip():
        lead = len(block) - len(block.lstrip(b"\r\n"))  # leading blank lines: report the text's line
        _add_text(out, src, line + block.count(b"\n", 0, lead), block)


def _add_text(out: Records, src: str, line: int, raw: bytes) -> None:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        bad_line = line + raw[: e.start].count(b"\n")
        out.bad.append(BadRecord(src, bad_line, f"non-UTF-8 bytes ({raw[e.start : e.start + 4]!r})", "non_utf8"))
        return
    text = text.strip("\r\n")
    if not text.strip():
        out.bad.append(BadRecord(src, line, "empty document", "empty_document"))
    else:
        out.docs.append((line, text))
