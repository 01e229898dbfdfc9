"""`pkm data ...`: tokenizer training, corpus preprocessing and inspection of indexed datasets.

Heavy imports (sentencepiece, megatron, torch) happen inside the command functions.
"""
from __future__ import annotations

import argparse


def register(subparsers) -> None:
    data = subparsers.add_parser("data", help="tokenizers, preprocessing into .bin/.idx, dataset inspection")
    sub = data.add_subparsers(dest="data_command", required=True, metavar="<data command>")

    p = sub.add_parser("preprocess", help="tokenize corpora into a megatron-core indexed dataset + manifest")
    p.add_argument("--input", nargs="+", required=True, metavar="FILE",
                   help="input files or globs (.jsonl/.json, .txt, .parquet, a datasets dir saved to disk)")
    p.add_argument("--output", required=True, metavar="PREFIX", help="writes PREFIX.bin, PREFIX.idx, PREFIX.manifest.json")
    p.add_argument("--tokenizer", default=None, help="sentencepiece .model or HF tokenizer directory (default: bundled demo GPT tokenizer)")
    p.add_argument("--workers", type=int, default=1, help="tokenizer worker processes")
    p.add_argument("--on-error", choices=("skip", "fail"), default="fail", help="bad records: skip and report, or stop at the first one")
    p.add_argument("--json-key", default="text", help="field holding the document text in jsonl/parquet/datasets inputs")
    p.add_argument("--text-mode", choices=("file", "blank-line"), default="file",
                   help="plain text: one document per file, or one per blank-line-separated block")
    p.add_argument("--family", choices=("gpt", "bert"), default="gpt",
                   help="gpt appends an EOD token per document; bert keeps sentence boundaries (one sequence per sentence)")
    p.set_defaults(func=_cmd_preprocess)


def _cmd_preprocess(args: argparse.Namespace) -> int:
    from data_pipeline.preprocess import preprocess
    from data_pipeline.tokenizer import load_tokenizer

    tok = load_tokenizer(args.tokenizer)
    manifest = preprocess(args.input, args.output, tok, workers=args.workers, on_error=args.on_error,
                          json_key=args.json_key, text_mode=args.text_mode, family=args.family)
    print(f"{args.output}: {manifest['documents']} documents, {manifest['tokens']} tokens, "
          f"{len(manifest['skipped'])} skipped")
    return 0
