"""Tokenize corpora into a megatron-core indexed dataset (PREFIX.bin/.idx) plus PREFIX.manifest.json.

Why it is faster than Megatron-LM's tools/preprocess_data.py with the same number of workers:
workers get ~1 MiB chunks of raw bytes instead of one line each (less IPC), parse and tokenize
a whole chunk in one batched tokenizer call, and hand back numpy arrays that the main process
writes with one `write` per chunk. At most a few chunks are in flight, so memory stays flat as
the corpus grows.

Atomicity: everything is written under PREFIX.tmp<pid>.*, then renamed: .bin, .idx and finally
.manifest.json. A dataset counts as complete only when its manifest exists and matches the file
sizes, so an interrupted run never looks complete; re-running removes the leftovers and restarts.
"""

from __future__ import annotations

import array
import contextlib
import fcntl
import gc
import glob
import itertools
import json
import logging
import multiprocessing as mp
import os
import re
import time
from collections import Counter, deque
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from data_pipeline.errors import DataError
from data_pipeline.readers import BadRecord, expand_inputs, iter_chunks, parse_chunk
from data_pipeline.sentences import cut_long, split_sentences
from data_pipeline.tokenizer import ASSETS, Tokenizer, load_tokenizer

log = logging.getLogger("pkm.data")

MANIFEST_FORMAT = "pkm-data-manifest/1"
MAX_LISTED_SKIPS = 10_000  # the manifest lists this many bad records; counts are always complete
AUSTEN_DIR = os.path.join(ASSETS, "austen")
DEMO_BOOKS = (
    "emma",
    "mansfield_park",
    "northanger_abbey",
    "persuasion",
    "pride_and_prejudice",
    "sense_and_sensibility",
)


@dataclass
class ChunkResult:
    source: str
    nbytes: int
    tokens: np.ndarray
    seq_lengths: np.ndarray  # int32, one per sequence (GPT: per document; BERT: per sentence)
    doc_seqs: np.ndarray  # int32, sequences per document
    bad: list = field(default_factory=list)


@dataclass
class Tally:
    """What a dataset (or one part of it) holds, per source: documents, sequences, tokens, bytes,
    skipped records. The single-node path fills one; each part of a distributed run fills one and
    the merge adds them up in input order, so both give the same manifest."""

    sources: list
    per_source: dict = field(default_factory=dict)
    skipped: list = field(default_factory=list)  # the first MAX_LISTED_SKIPS bad records (dicts)
    skipped_by_reason: Counter = field(default_factory=Counter)
    skipped_total: int = 0

    def __post_init__(self):
        for s in self.sources:
            self.per_source.setdefault(s, Counter())

    def bad(self, b: BadRecord, on_error: str) -> None:
        if on_error == "fail":
            raise DataError(f"{b.where()}: {b.reason} (use --on-error skip to skip and report bad records)")
        self.skipped_total += 1
        self.skipped_by_reason[b.kind] += 1
        self.per_source[b.source]["skipped"] += 1
        if len(self.skipped) < MAX_LISTED_SKIPS:
            self.skipped.append(b.to_json())

    def add(self, other: Tally) -> None:
        for s, c in other.per_source.items():
            self.per_source[s].update(c)
        self.skipped.extend(other.skipped[: MAX_LISTED_SKIPS - len(self.skipped)])
        self.skipped_by_reason.update(other.skipped_by_reason)
        self.skipped_total += other.skipped_total

    def total(self, key: str) -> int:
        return sum(c[key] for c in self.per_source.values())

    def to_json(self) -> dict:
        return {
            "sources": self.sources,
            "per_source": {s: dict(c) for s, c in self.per_source.items()},
            "skipped": self.skipped,
            "skipped_by_reason": dict(self.skipped_by_reason),
            "skipped_total": self.skipped_total,
        }

    @classmethod
    def from_json(cls, d: dict) -> Tally:
        return cls(
            d["sources"],
            {s: Counter(c) for s, c in d["per_source"].items()},
            d["skipped"],
            Counter(d["skipped_by_reason"]),
            d["skipped_total"],
        )


class IntArray(array.array):
    """array.array (4/8 bytes per entry, so the index of a huge corpus stays small) whose `extend`
    copies a numpy array in one go: megatron's `IndexedDatasetBuilder.add_index` extends with them."""

    def extend(self, values) -> None:
        if isinstance(values, np.ndarray):
            self.frombytes(values.astype(np.dtype(self.typecode), copy=False).tobytes())
        else:
            super().extend(values)


def new_builder(bin_path: str, dtype):
    """megatron-core's IndexedDatasetBuilder with compact index arrays."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(bin_path, dtype=np.dtype(dtype).type)
    builder.sequence_lengths = IntArray("i")
    builder.document_indices = IntArray("q", [0])
    return builder


class ChunkWriter:
    """Appends chunk results to a builder, in the order given, and tallies them."""

    def __init__(self, builder, tally: Tally, on_error: str):
        self.builder, self.tally, self.on_error = builder, tally, on_error

    def add(self, r: ChunkResult) -> None:
        for b in r.bad:
            self.tally.bad(b, self.on_error)
        builder = self.builder
        builder.data_file.write(r.tokens.tobytes())
        builder.sequence_lengths.frombytes(r.seq_lengths.tobytes())
        ends = np.cumsum(r.doc_seqs, dtype=np.int64) + builder.document_indices[-1]
        builder.document_indices.frombytes(ends.tobytes())
        c = self.tally.per_source[r.source]
        c["documents"] += len(r.doc_seqs)
        c["sequences"] += len(r.seq_lengths)
        c["tokens"] += len(r.tokens)
        c["bytes"] += r.nbytes


# ---------------------------------------------------------------- worker side
_W: dict = {}


def init_worker(tokenizer: Tokenizer, family: str, dtype: str, max_sentence_tokens: int) -> None:
    _W.update(tok=tokenizer, family=family, dtype=np.dtype(dtype), max_sentence_tokens=max_sentence_tokens)


def process_chunk(chunk) -> ChunkResult:
    tok, family, dtype = _W["tok"], _W["family"], _W["dtype"]
    records = parse_chunk(chunk)
    texts = [t for _, t in records.docs]
    if family == "gpt":
        ids = tok.encode_batch(texts) if texts else []
        eod = tok.eod_id
        for doc in ids:
            doc.append(eod)
        seq_lengths = np.fromiter(map(len, ids), dtype=np.int32, count=len(ids))
        doc_seqs = np.ones(len(ids), dtype=np.int32)
    else:  # bert: one sequence per sentence, so the sampler keeps sentence boundaries
        sents, per_doc = [], []
        for t in texts:
            s = split_sentences(t)
            sents.extend(s)
            per_doc.append(len(s))
        sent_ids = tok.encode_batch(sents) if sents else []
        ids, counts, k = [], [], 0
        for n in per_doc:
            pieces = [p for s in sent_ids[k : k + n] for p in cut_long(s, _W["max_sentence_tokens"]) if p]
            k += n
            ids.extend(pieces)
            counts.append(len(pieces))
        seq_lengths = np.fromiter(map(len, ids), dtype=np.int32, count=len(ids))
        doc_seqs = np.asarray(counts, dtype=np.int32)
        keep = doc_seqs > 0  # a document of whitespace-only sentences has no tokens
        for (line, _), ok in zip(records.docs, keep):
            if not ok:
                records.bad.append(BadRecord(chunk.source, line, "empty document", "empty_document"))
        doc_seqs = doc_seqs[keep]
    total = int(seq_lengths.sum())
    tokens = np.fromiter(itertools.chain.from_iterable(ids), dtype=dtype, count=total)
    return ChunkResult(chunk.source, chunk.nbytes, tokens, seq_lengths, doc_seqs, records.bad)


# ---------------------------------------------------------------- main side
def dataset_paths(prefix: str) -> dict:
    return {"bin": prefix + ".bin", "idx": prefix + ".idx", "manifest": prefix + ".manifest.json"}


def read_manifest(prefix: str) -> dict:
    path = dataset_paths(prefix)["manifest"]
    if not os.path.isfile(path):
        raise DataError(f"{path}: no manifest (not made by `pkm data preprocess`, or the run did not finish)")
    return read_versioned_json(path, MANIFEST_FORMAT, "manifest", "unreadable manifest ({})")


def read_versioned_json(path: str, fmt: str, what: str, unreadable: str) -> dict:
    """A JSON record we wrote, with its `format` checked. `unreadable`: the error text, `{}` = the cause."""
    try:
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: {unreadable.format(e)}") from None
    if not isinstance(record, dict) or record.get("format") != fmt:
        found = record.get("format") if isinstance(record, dict) else None
        raise DataError(f"{path}: unknown {what} format {found!r} (expected {fmt})")
    return record


def is_complete(prefix: str) -> bool:
    """True when PREFIX.{bin,idx} exist with the sizes the manifest recorded."""
    try:
        check_files(prefix)
    except DataError:
        return False
    return True


def remove_leftovers(prefix: str) -> None:
    """Remove PREFIX.tmp<pid>.* files of this process and of processes that are gone (a crash, a kill),
    never those of a live one: another run may be writing the same output (a shared cache_dir)."""
    for path in glob.glob(glob.escape(prefix) + ".tmp*"):
        pid = re.match(r"\d+", path[len(prefix) + len(".tmp") :])
        if pid is None or int(pid.group()) == os.getpid() or not _alive(int(pid.group())):
            with contextlib.suppress(FileNotFoundError):  # its owner may just have renamed it
                os.remove(path)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def check_options(on_error: str, family: str, workers: int) -> None:
    if on_error not in ("skip", "fail"):
        raise DataError(f"on_error {on_error!r}: expected 'skip' or 'fail'")
    if family not in ("gpt", "bert"):
        raise DataError(f"family {family!r}: expected 'gpt' or 'bert'")
    if workers < 0:
        raise DataError(f"--workers {workers}: expected 0 or more")


def check_tokenizer(tok: Tokenizer, family: str) -> None:
    if family == "gpt" and tok.eod_id is None:
        raise DataError(f"tokenizer {tok.path}: no end-of-document token (<eod>, </s> or [SEP]) to append")


def prepare_output_dir(output_prefix: str) -> None:
    """Create the output's directory and check that files can be written there (one-line error if not)."""
    out_dir = os.path.dirname(os.path.abspath(output_prefix))
    try:
        os.makedirs(out_dir, exist_ok=True)
        probe = f"{output_prefix}.tmp{os.getpid()}.probe"
        open(probe, "wb").close()
        os.remove(probe)
    except OSError as e:
        raise DataError(f"--output {output_prefix}: cannot write in {out_dir} ({e.strerror or e})") from None


def dataset_dtype(tok: Tokenizer):
    """megatron's DType.optimal_dtype: uint16 ids when the vocabulary allows."""
    return np.uint16 if tok.vocab_size < 65500 else np.int32


def build_manifest(
    tally: Tally, tok: Tokenizer, family: str, dtype, options: dict, files: dict, elapsed: float, **extra
) -> dict:
    """The manifest of a finished dataset (PREFIX.manifest.json); `extra` keys are added as they are."""
    n_tokens = tally.total("tokens")
    return {
        "format": MANIFEST_FORMAT,
        "family": family,
        "tokenizer": tok.identity,
        "vocab_size": tok.vocab_size,
        "eod_id": tok.eod_id if family == "gpt" else None,
        "append_eod": family == "gpt",
        "dtype": np.dtype(dtype).name,
        "documents": tally.total("documents"),
        "sequences": tally.total("sequences"),
        "tokens": n_tokens,
        "sources": [
            {
                "path": os.path.abspath(s) if not s.startswith("datasets:") else s,
                **{k: tally.per_source[s][k] for k in ("documents", "sequences", "tokens", "bytes", "skipped")},
            }
            for s in tally.sources
        ],
        "skipped_total": tally.skipped_total,
        "skipped_by_reason": dict(tally.skipped_by_reason),
        "skipped": tally.skipped,
        "options": options,
        "files": files,
        **extra,
        "elapsed_s": round(elapsed, 3),
        "tokens_per_s": round(n_tokens / max(elapsed, 1e-9), 1),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def publish(tmp_prefix: str, output_prefix: str, manifest: dict) -> None:
    """Write the manifest under its temporary name, then rename .bin, .idx and the manifest last."""
    tmp, final = dataset_paths(tmp_prefix), dataset_paths(output_prefix)
    with open(tmp["manifest"], "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1)
    if os.path.exists(final["manifest"]):
        os.remove(final["manifest"])  # the old dataset stops looking complete before its files change
    os.replace(tmp["bin"], final["bin"])
    os.replace(tmp["idx"], final["idx"])
    os.replace(tmp["manifest"], final["manifest"])


def preprocess(
    inputs: Iterable[str],
    output_prefix: str,
    tokenizer: Tokenizer | str | None = None,
    workers: int = 1,
    on_error: str = "fail",
    json_key: str = "text",
    text_mode: str = "file",
    family: str = "gpt",
    max_sentence_tokens: int = 256,
    chunk_bytes: int | None = None,
    progress: bool = True,
) -> dict:
    """Tokenize `inputs` (files/globs, see readers.py) into OUTPUT_PREFIX.{bin,idx,manifest.json}.

    GPT: one sequence per document with the EOD id appended. BERT: one sequence per sentence
    (sentences longer than `max_sentence_tokens` are cut), documents keep their sentences together.
    on_error="fail" stops at the first bad record with "file:line: problem"; "skip" skips and
    reports it in the manifest. workers=0 tokenizes in this process. Returns the manifest.
    """
    from tqdm import tqdm

    check_options(on_error, family, workers)
    tok = tokenizer if isinstance(tokenizer, Tokenizer) else load_tokenizer(tokenizer)
    check_tokenizer(tok, family)
    sources = expand_inputs(list(inputs))
    prepare_output_dir(output_prefix)
    remove_leftovers(output_prefix)
    tmp_prefix = f"{output_prefix}.tmp{os.getpid()}"
    tmp = dataset_paths(tmp_prefix)
    dtype = dataset_dtype(tok)
    known_size = sum(os.path.getsize(s) for s in sources if os.path.isfile(s))
    if chunk_bytes is None:  # >= 8 chunks per worker so they share the work evenly; 64 KiB..1 MiB
        chunk_bytes = min(1 << 20, max(64 << 10, known_size // (8 * max(1, workers))))
    init_args = (tok, family, np.dtype(dtype).name, max_sentence_tokens)
    pool = None
    if workers > 0:
        # Fork the workers before megatron/torch are imported here (lean workers), with the
        # parent's objects frozen: the workers' garbage collector then never writes to (and
        # copies) the inherited pages, so their memory does not creep up over a long run.
        gc.freeze()
        pool = mp.get_context("fork").Pool(workers, initializer=init_worker, initargs=init_args)
        gc.unfreeze()
    try:
        builder = new_builder(tmp["bin"], dtype)
    except BaseException:
        if pool is not None:
            pool.terminate()
        raise

    tally = Tally(sources)
    writer = ChunkWriter(builder, tally, on_error)
    bar = tqdm(
        total=known_size or None,
        unit="B",
        unit_scale=True,
        desc=f"preprocess {os.path.basename(output_prefix)}",
        disable=not progress or None,
        mininterval=1.0,
    )
    t0 = time.time()
    n_tokens = 0

    def consume(r: ChunkResult) -> None:
        nonlocal n_tokens
        writer.add(r)
        n_tokens += len(r.tokens)
        bar.update(r.nbytes)
        bar.set_postfix_str(f"{n_tokens / max(time.time() - t0, 1e-9) / 1e3:.0f}k tok/s", refresh=False)

    chunks = iter_chunks(sources, json_key=json_key, text_mode=text_mode, chunk_bytes=chunk_bytes)
    try:
        if pool is None:
            init_worker(*init_args)
            for chunk in chunks:
                consume(process_chunk(chunk))
        else:
            pending: deque = deque()
            for chunk in chunks:
                pending.append(pool.apply_async(process_chunk, (chunk,)))
                while len(pending) > 2 * workers:  # bounded: memory flat whatever the corpus size
                    consume(pending.popleft().get())
            while pending:
                consume(pending.popleft().get())
            pool.close()
        builder.finalize(tmp["idx"])
    except BaseException:
        if pool is not None:
            pool.terminate()
        builder.data_file.close()
        remove_leftovers(output_prefix)
        raise
    finally:
        bar.close()
        if pool is not None:
            pool.join()
    elapsed = time.time() - t0

    n_docs = len(builder.document_indices) - 1
    if n_docs == 0:
        remove_leftovers(output_prefix)
        raise DataError(
            f"{output_prefix}: no documents in {', '.join(sources)} ({tally.skipped_total} bad records skipped)"
        )
    manifest = build_manifest(
        tally,
        tok,
        family,
        dtype,
        run_options(json_key, text_mode, on_error, family, max_sentence_tokens),
        {"bin": os.path.getsize(tmp["bin"]), "idx": os.path.getsize(tmp["idx"])},
        elapsed,
        workers=workers,
    )
    publish(tmp_prefix, output_prefix, manifest)
    log.info(
        "%s: %d documents, %d tokens, %d skipped, %.0f tokens/s",
        output_prefix,
        n_docs,
        n_tokens,
        tally.skipped_total,
        manifest["tokens_per_s"],
    )
    return manifest


def run_options(json_key: str, text_mode: str, on_error: str, family: str, max_sentence_tokens: int) -> dict:
    return {
        "json_key": json_key,
        "text_mode": text_mode,
        "on_error": on_error,
        "max_sentence_tokens": max_sentence_tokens if family == "bert" else None,
    }


def demo_files() -> list[str]:
    return [os.path.join(AUSTEN_DIR, f"{b}.txt") for b in DEMO_BOOKS]


def ensure_demo_corpus(out_dir: str, family: str = "gpt", tokenizer: Tokenizer | str | None = None) -> str:
    """Preprocess the bundled Austen novels (one document per paragraph) once; return the prefix.

    tokenizer None = the bundled tokenizer of `family`. A complete existing output made with the
    same tokenizer from the same books is reused.
    """
    tok = tokenizer if isinstance(tokenizer, Tokenizer) else load_tokenizer(tokenizer or family)
    prefix = os.path.join(out_dir, f"austen-{family}-{tok.identity['sha256'][:12]}")
    files = demo_files()
    try:
        os.makedirs(out_dir, exist_ok=True)
        lock = open(prefix + ".lock", "a")
    except OSError as e:
        raise DataError(f"{out_dir}: cannot write the demo corpus there ({e.strerror or e})") from None
    # runs sharing a cache_dir build it once: the others wait for the lock, then reuse the output
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if is_complete(prefix):
            m = read_manifest(prefix)
            same_books = [(s["path"], s["bytes"]) for s in m["sources"]] == [(f, os.path.getsize(f)) for f in files]
            if m["tokenizer"]["sha256"] == tok.identity["sha256"] and m["family"] == family and same_books:
                return prefix
        log.info("building the demo corpus %s (6 Austen novels, %s tokenizer)", prefix, tok.identity["name"])
        preprocess(files, prefix, tok, workers=0, text_mode="blank-line", family=family, progress=False)
    return prefix


def check_tokenizer_matches(prefix: str, tokenizer: Tokenizer, user: str = "the model") -> dict:
    """Refuse a dataset tokenized with another vocabulary than `user`'s (ids decoded with another
    vocabulary are plausible-looking garbage). Returns the manifest."""
    m = read_manifest(prefix)
    made, have = m["tokenizer"], tokenizer.identity
    if made["sha256"] != have["sha256"] or m["vocab_size"] != tokenizer.vocab_size:
        if user == "the model":
            holder = "the model uses"
            fix = f"re-run `pkm data preprocess --tokenizer {have['path']}` or train with data.tokenizer={made['path']}"
        else:
            holder, fix = f"{user} is", f"leave out {user} to use the dataset's own ({made['path']})"
        raise DataError(
            f"{prefix}: tokenized with {made['kind']} tokenizer {made['name']} (vocab {m['vocab_size']}, "
            f"sha256 {made['sha256'][:12]}) but {holder} {have['kind']} tokenizer {have['name']} "
            f"(vocab {tokenizer.vocab_size}, sha256 {have['sha256'][:12]}): {fix}"
        )
    return m


def check_files(prefix: str) -> dict:
    """The manifest of a complete dataset: `.bin`/`.idx` present with the sizes it records (a truncated
    or replaced file is named here, not met as a numpy error mid-run). Returns the manifest."""
    m = read_manifest(prefix)
    for kind in ("bin", "idx"):
        path = dataset_paths(prefix)[kind]
        if not os.path.isfile(path):
            raise DataError(f"{path}: missing (the dataset's manifest lists it)")
        size, expected = os.path.getsize(path), m["files"][kind]
        if size != expected:
            raise DataError(
                f"{path}: {size} bytes, but its manifest records {expected} (truncated or "
                "overwritten: re-run `pkm data preprocess`)"
            )
    return m


def check_dataset(prefix: str, tokenizer: Tokenizer) -> dict:
    """What training checks before it opens a dataset: its files, then its tokenizer. Returns the manifest."""
    check_files(prefix)
    return check_tokenizer_matches(prefix, tokenizer)
