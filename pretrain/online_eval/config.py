"""What one online-evaluation run does: a plain dataclass (no torch import), validated up front.

A *run* is one (mode, strategy, adapt, optimizer) combination over the whole corpus; `pkm eval online`
builds one run per combination asked for and compares them side by side.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from pretrain.errors import PretrainError

MODES = ("static", "dynamic")
STRATEGIES = ("txl", "overlapping")
RESETS = ("per-document", "never")
ADAPTS = ("all", "mlp", "lora", "pkm-values")
OPTIMIZERS = ("sgd", "adamw", "rms")


@dataclass
class OnlineEvalConfig:
    mode: str = "static"  # static: no updates; dynamic: score a chunk, then take a gradient step on it
    strategy: str = "txl"  # txl: chunks of `chunk` tokens + previous chunk as cached K/V; overlapping: sliding window
    chunk: int = 256  # txl: chunk length; overlapping: stride S (new tokens scored per window)
    window: int = 512  # overlapping: window length L (each token scored with up to L - S context)
    reset: str = "per-document"  # dynamic: restore the initial weights at each document, or never (continual)
    adapt: str = "all"  # which weights change: all, mlp, lora, pkm-values
    optimizer: str = "sgd"  # sgd, adamw, rms (Krause et al.: RMS-normalised SGD with decay to the initial weights)
    lr: float = 1e-4
    update_every: int = 1  # take a gradient step on every k-th chunk; the others are only scored (no backward)
    weight_decay: float = 0.0  # adamw only
    betas: tuple[float, float] = (0.9, 0.999)  # adamw; rms uses betas[1] for its running mean square
    eps: float = 1e-8
    rms_decay: float = 0.0  # rms: lambda, the pull back towards the initial weights per step
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_targets: list[str] | None = None  # None: peft's default for the architecture, else all linear layers
    sink: int = 4  # txl: the document's first tokens stay in the memory (attention sinks, Xiao et al. 2023)
    max_positions: int | None = None  # txl: restart positions before this (default: the model's limit)
    doc_start: str = "auto"  # token prepended to each document: auto (bos, else eos), none, or a token id
    position_bin: int = 1024  # width of the loss-by-position bins, in tokens
    seed: int = 0  # LoRA initialisation

    @property
    def name(self) -> str:
        if self.mode == "static":
            return f"static/{self.strategy}"
        parts = [f"dynamic/{self.strategy}", self.adapt, self.optimizer]
        if self.update_every != 1:
            parts.append(f"every{self.update_every}")
        if self.reset == "never":
            parts.append("continual")
        return "/".join(parts)

    def replace(self, **kw) -> OnlineEvalConfig:
        return dataclasses.replace(self, **kw)

    def validate(self) -> OnlineEvalConfig:
        def choice(field: str, allowed: tuple[str, ...]) -> None:
            value = getattr(self, field)
            if value not in allowed:
                raise PretrainError(f"online eval: {field}={value!r} is not one of {', '.join(allowed)}")

        choice("mode", MODES)
        choice("strategy", STRATEGIES)
        choice("reset", RESETS)
        choice("adapt", ADAPTS)
        choice("optimizer", OPTIMIZERS)
        if self.chunk < 1:
            raise PretrainError(f"online eval: chunk={self.chunk} must be >= 1")
        if self.strategy == "overlapping" and self.window < self.chunk:
            raise PretrainError(
                f"online eval: window={self.window} must be >= the stride chunk={self.chunk} "
                "(each window scores `chunk` new tokens)"
            )
        if self.sink < 0:
            raise PretrainError(f"online eval: sink={self.sink} must be >= 0")
        if self.update_every < 1:
            raise PretrainError(f"online eval: update_every={self.update_every} must be >= 1")
        if self.lr < 0:
            raise PretrainError(f"online eval: lr={self.lr} must be >= 0")
        if not 0.0 <= self.rms_decay < 1.0:
            raise PretrainError(f"online eval: rms_decay={self.rms_decay} must be in [0, 1)")
        if self.lora_rank < 1:
            raise PretrainError(f"online eval: lora_rank={self.lora_rank} must be >= 1")
        if self.position_bin < 1:
            raise PretrainError(f"online eval: position_bin={self.position_bin} must be >= 1")
        if self.doc_start not in ("auto", "none") and not str(self.doc_start).isdigit():
            raise PretrainError(f"online eval: doc_start={self.doc_start!r} must be auto, none or a token id")
        return self


def run_names(configs: list[OnlineEvalConfig]) -> list[str]:
    """One name per run, unique within the comparison: `cfg.name`, followed, where several runs share
    it, by each field whose value differs among them (`dynamic/txl/all/adamw/lr=0.0003`)."""
    names = [c.name for c in configs]
    out = list(names)
    for base in set(names):
        group = [i for i, n in enumerate(names) if n == base]
        if len(group) < 2:
            continue
        fields = [
            f.name
            for f in dataclasses.fields(OnlineEvalConfig)
            if len({repr(getattr(configs[i], f.name)) for i in group}) > 1
        ]
        for i in group:
            out[i] = "/".join([base] + [f"{f}={getattr(configs[i], f)}" for f in fields])
    repeated = {n for n in out if out.count(n) > 1}  # identical configurations: numbered
    seen: dict[str, int] = {}
    for i, n in enumerate(out):
        if n in repeated:
            seen[n] = seen.get(n, 0) + 1
            out[i] = f"{n}#{seen[n]}"
    return out


@dataclass
class OnlineEvalJob:
    """What `pkm eval online` does, as data: the model, the documents, the runs compared side by side, and
    where the results go. `run_online_eval(job)` (pretrain.online_eval.evaluate) carries it out."""

    model: str  # HF directory, .gguf file, `smollm2`, or a native checkpoint directory
    runs: list[OnlineEvalConfig]
    corpus: str = "books"
    tokenizer: str | None = None  # default: the model's
    json_key: str = "text"
    max_docs: int | None = None
    max_tokens: int | None = None  # per document
    rms_calibration: str | None = None  # a corpus for Krause's mean squared gradients
    interleave: bool = False  # all runs chunk by chunk side by side (fair timings on a shared machine)
    device: str | None = None  # default: cuda if available
    dtype: str = "float32"
    threads: int | None = None
    out: str = "runs/online_eval"
    progress: bool = True
