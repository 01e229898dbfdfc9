"""`pkm data ...`: tokenizer training, corpus preprocessing and inspection of indexed datasets.

    pkm data tokenizer train --input FILES... --output PREFIX [--recipe gpt|bert] [--vocab-size N]
    pkm data tokenizer info [TOKENIZER]
    pkm data preprocess --input FILES... --output PREFIX [--tokenizer T] [--workers N] [--on-error skip|fail]
        [--executor local|slurm --tasks N [--slurm-partition P --slurm-time T ...]]
    pkm data inspect PREFIX [--show N]
    pkm data build-helpers

Heavy imports (sentencepiece, megatron, torch) happen inside the command functions.
"""

from __future__ import annotations

import argparse
import json
import os

from data_pipeline.argtypes import file_prefix, non_negative_int, positive_int


def register(subparsers) -> None:
    data = subparsers.add_parser("data", help="tokenizers, preprocessing into .bin/.idx, dataset inspection")
    sub = data.add_subparsers(dest="data_command", required=True, metavar="<data command>")

    tok = sub.add_parser("tokenizer", help="train or describe tokenizers")
    tsub = tok.add_subparsers(dest="tokenizer_command", required=True, metavar="<tokenizer command>")
    t = tsub.add_parser("train", help="train a sentencepiece model (GPT or BERT recipe)")
    t.add_argument(
        "--input", nargs="+", required=True, metavar="FILE", help="corpus files or globs (as for preprocess)"
    )
    t.add_argument(
        "--output", required=True, metavar="PREFIX", type=file_prefix, help="writes PREFIX.model and PREFIX.vocab"
    )
    t.add_argument(
        "--recipe",
        choices=("gpt", "bert"),
        default="gpt",
        help="gpt: BPE, byte fallback, split digits, <eod>; bert: unigram with [PAD] [UNK] [CLS] [SEP] [MASK]",
    )
    t.add_argument("--vocab-size", type=positive_int, default=32000)
    t.add_argument("--model-type", choices=("bpe", "unigram"), default=None, help="override the recipe's model type")
    t.add_argument("--input-sentence-size", type=positive_int, default=2_000_000, help="lines sampled for training")
    t.add_argument("--json-key", default="text")
    t.add_argument("--text-mode", choices=("file", "blank-line"), default="file")
    t.add_argument("--threads", type=positive_int, default=None)
    t.set_defaults(func=cmd_tokenizer_train)

    i = tsub.add_parser("info", help="print a tokenizer's identity and special ids")
    i.add_argument("tokenizer", nargs="?", default=None, help=".model file, HF dir, gpt or bert (default: gpt)")
    i.add_argument("--encode", default=None, metavar="TEXT", help="also show how TEXT is tokenized")
    i.set_defaults(func=cmd_tokenizer_info)

    p = sub.add_parser("preprocess", help="tokenize corpora into a megatron-core indexed dataset + manifest")
    p.add_argument(
        "--input",
        nargs="+",
        required=True,
        metavar="FILE",
        help="files or globs: .jsonl/.json(.gz), .txt(.gz), .parquet, a `datasets` dir saved to disk, "
        "or datasets:<builder>:<files> for datasets.load_dataset on local files",
    )
    p.add_argument(
        "--output",
        required=True,
        metavar="PREFIX",
        type=file_prefix,
        help="writes PREFIX.bin, PREFIX.idx, PREFIX.manifest.json",
    )
    p.add_argument("--tokenizer", default=None, help="sentencepiece .model or HF dir (default: bundled GPT)")
    p.add_argument(
        "--workers",
        type=non_negative_int,
        default=None,
        help="tokenizer worker processes (default: cores - 1; 0: in this process); with --executor: "
        "tasks run at a time (slurm default: no limit)",
    )
    p.add_argument(
        "--on-error", choices=("skip", "fail"), default="fail", help="bad records: fail, or skip + list them"
    )
    p.add_argument("--json-key", default="text", help="document text field of jsonl/parquet/datasets inputs")
    p.add_argument(
        "--text-mode",
        choices=("file", "blank-line"),
        default="file",
        help="plain text: one document per file, or one per blank-line-separated block",
    )
    p.add_argument("--family", choices=("gpt", "bert"), default="gpt", help="gpt: EOD after documents; bert: sentences")
    p.add_argument("--max-sentence-tokens", type=positive_int, default=256, help="bert: longer sentences are cut")
    p.add_argument("--no-progress", action="store_true")
    x = p.add_argument_group(
        "many processes or nodes (datatrove); see README 'Preprocessing a large corpus on a cluster'"
    )
    x.add_argument(
        "--executor",
        choices=("local", "slurm"),
        default=None,
        help="run as datatrove tasks (one or more input files each) on this machine or as a SLURM "
        "job array, then merge; a rerun redoes only unfinished tasks (default: one process + workers)",
    )
    x.add_argument("--tasks", type=positive_int, default=None, help="datatrove tasks (input files are shared out)")
    x.add_argument("--slurm-partition", default=None)
    x.add_argument("--slurm-time", default=None, help="time limit per array task, as sbatch --time")
    x.add_argument("--slurm-account", default=None)
    x.add_argument("--slurm-cpus-per-task", type=positive_int, default=None, help="cores per array task (default 1)")
    x.add_argument(
        "--slurm-sbatch",
        action="append",
        default=[],
        metavar="OPTION",
        help="an extra sbatch option, e.g. --slurm-sbatch=--qos=high (repeatable)",
    )
    p.set_defaults(func=cmd_preprocess)

    n = sub.add_parser("inspect", help="summarise a preprocessed dataset (manifest, and decoded documents)")
    n.add_argument("prefix", metavar="PREFIX")
    n.add_argument("--show", type=non_negative_int, default=0, metavar="N", help="decode the first N documents")
    n.add_argument("--tokenizer", default=None, help="tokenizer for --show (default: the manifest's)")
    n.add_argument("--json", action="store_true", help="print the whole manifest as JSON")
    n.set_defaults(func=cmd_inspect)

    h = sub.add_parser("build-helpers", help="check megatron-core's C++ dataset helpers; compile them if missing")
    h.set_defaults(func=cmd_build_helpers)


def cmd_tokenizer_train(args: argparse.Namespace) -> int:
    import itertools
    import logging

    from data_pipeline.errors import DataError
    from data_pipeline.outputs import check_writable
    from data_pipeline.readers import expand_inputs, iter_chunks, parse_chunk
    from data_pipeline.tokenizer_train import train_sentencepiece

    sources = expand_inputs(args.input)
    check_writable(args.output + ".model")
    bad = []  # records not trained on (undecodable, empty, malformed): counted and reported

    def texts():
        for chunk in iter_chunks(sources, json_key=args.json_key, text_mode=args.text_mode):
            records = parse_chunk(chunk)
            bad.extend(records.bad)
            for _, text in records.docs:
                yield text

    docs = texts()
    first = next(docs, None)
    if first is None:  # sentencepiece would only say `!sentences_.empty()`, about the output
        why = (
            f"{len(bad)} record{'s' * (len(bad) != 1)} skipped, the first {bad[0].where()}: {bad[0].reason}"
            if bad
            else "empty"
        )
        raise DataError(f"{', '.join(sources)}: no text to train a tokenizer on ({why})")
    path = train_sentencepiece(
        itertools.chain([first], docs),
        args.output,
        args.recipe,
        args.vocab_size,
        args.input_sentence_size,
        model_type=args.model_type,
        num_threads=args.threads,
    )
    if bad:
        logging.getLogger("pkm.data").warning(
            "not trained on %d bad records (the first %s: %s)", len(bad), bad[0].where(), bad[0].reason
        )
    print(path)
    return 0


def cmd_tokenizer_info(args: argparse.Namespace) -> int:
    from data_pipeline.tokenizer import load_tokenizer

    tok = load_tokenizer(args.tokenizer)
    specials = ("eod", "pad", "cls", "sep", "mask", "unk")
    info = dict(tok.identity, **{f"{name}_id": getattr(tok, f"{name}_id") for name in specials})
    if args.encode is not None:
        ids = tok.encode(args.encode)
        info["encode"] = {"ids": ids, "pieces": [tok.id_to_piece(i) for i in ids]}
    print(json.dumps(info, indent=1, ensure_ascii=False))
    return 0


# --slurm-* option (argparse dest) -> SlurmJob field
_SLURM_FLAGS = {
    "slurm_partition": "partition",
    "slurm_time": "time",
    "slurm_account": "account",
    "slurm_cpus_per_task": "cpus_per_task",
    "slurm_sbatch": "sbatch_lines",
}
# options handed to the preprocessing functions as they are
_PREPROCESS_OPTIONS = ("on_error", "json_key", "text_mode", "family", "max_sentence_tokens")


def cmd_preprocess(args: argparse.Namespace) -> int:
    from data_pipeline.errors import DataError
    from data_pipeline.outputs import check_writable
    from data_pipeline.tokenizer import load_tokenizer

    if args.executor is None and args.tasks is not None:
        raise DataError("--tasks needs --executor local or --executor slurm")
    if args.executor != "slurm":
        for name in _SLURM_FLAGS:
            if getattr(args, name):
                raise DataError(f"--{name.replace('_', '-')} needs --executor slurm")
    if args.executor is not None and args.tasks is None:
        raise DataError(f"--executor {args.executor} needs --tasks N")
    check_writable(args.output + ".bin")  # before the corpus is read
    default_workers = -1 if args.executor == "slurm" else max(1, (os.cpu_count() or 2) - 1)
    workers = default_workers if args.workers is None else args.workers
    tok = load_tokenizer(args.tokenizer)
    common = {name: getattr(args, name) for name in _PREPROCESS_OPTIONS}
    if args.executor is not None:
        from data_pipeline.distributed_preprocess import preprocess_distributed
        from data_pipeline.slurm_job import SlurmJob

        job = SlurmJob(**{field: getattr(args, flag) for flag, field in _SLURM_FLAGS.items()})
        m = preprocess_distributed(
            args.input, args.output, tok, executor=args.executor, tasks=args.tasks, workers=workers, job=job, **common
        )
        if args.executor == "slurm":
            print(
                f"Submitted SLURM job array {m['array_job']} ({m['tasks_left']} of {args.tasks} tasks"
                f"{', resuming' if m['resumed'] else ''}) and merge job {m['merge_job']}"
            )
            print(f"  output:     {args.output}.bin/.idx/.manifest.json, when job {m['merge_job']} has finished")
            print(f"  task logs:  {m['logs']}/logs/ (SLURM's in {m['slurm_logs']})")
            print("  a failed task: fix the cause, run the same command again (finished tasks are kept)")
            return 0
    else:
        from data_pipeline.preprocess import preprocess

        m = preprocess(args.input, args.output, tok, workers=workers, progress=not args.no_progress, **common)
    print(
        f"{args.output}: {m['documents']} documents, {m['tokens']} tokens, {m['skipped_total']} skipped "
        f"({m['tokens_per_s'] / 1e3:.0f}k tokens/s with {workers} workers"
        f"{f' over {args.tasks} tasks' if args.executor else ''})"
    )
    for s in m["skipped"][:20]:
        print(f"  skipped {s['source']}:{s['line']}: {s['reason']}")
    if m["skipped_total"] > 20:
        print(f"  ... {m['skipped_total'] - 20} more in {args.output}.manifest.json")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from data_pipeline.preprocess import check_files, check_tokenizer_matches

    for ext in (".bin", ".idx", ".manifest.json"):  # a file of the dataset given instead of its prefix
        if args.prefix.endswith(ext) and os.path.isfile(args.prefix[: -len(ext)] + ".manifest.json"):
            args.prefix = args.prefix[: -len(ext)]
    m = check_files(args.prefix)
    if args.json:
        print(json.dumps(m, indent=1))
    else:
        t = m["tokenizer"]
        print(
            f"{args.prefix}: {m['family']} dataset, {m['documents']} documents, {m['sequences']} sequences, "
            f"{m['tokens']} tokens ({m['dtype']})"
        )
        print(f"  tokenizer: {t['kind']} {t['name']} vocab {m['vocab_size']} sha256 {t['sha256'][:16]}")
        for s in m["sources"]:
            print(f"  source {s['path']}: {s['documents']} documents, {s['tokens']} tokens, {s['skipped']} skipped")
        for reason, n in m["skipped_by_reason"].items():
            print(f"  skipped {n} x {reason}")
    if args.show:
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        from data_pipeline.tokenizer import load_tokenizer

        tok = load_tokenizer(args.tokenizer or m["tokenizer"]["path"])
        if args.tokenizer:
            check_tokenizer_matches(args.prefix, tok, user=f"--tokenizer {args.tokenizer}")
        ds = IndexedDataset(args.prefix)
        for d in range(min(args.show, m["documents"])):
            lo, hi = ds.document_indices[d], ds.document_indices[d + 1]
            text = " | ".join(tok.decode(ds[i]) for i in range(lo, hi))
            print(f"--- document {d} ({hi - lo} sequences)\n{text}")
    return 0


def cmd_build_helpers(args: argparse.Namespace) -> int:
    from data_pipeline.helpers_build import ensure_helpers

    print(ensure_helpers())
    return 0
