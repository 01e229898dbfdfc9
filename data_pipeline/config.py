"""Data configuration for training (plain dataclass, no torch import; ranges as in model/config.py)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class DataConfig:
    # Indexed dataset prefixes (PREFIX.bin/.idx/.manifest.json); empty = the bundled demo corpus.
    paths: list[str] = field(default_factory=list)
    weights: list[float] | None = field(
        default=None, metadata={"gt": 0.0}
    )  # blend weights, one per path (None = proportional to size)
    split: str = "98,1,1"  # train,valid,test
    tokenizer: str | None = None  # sentencepiece .model or HF tokenizer dir; None = the bundled one
    mlm_probability: float = field(default=0.15, metadata={"gt": 0.0, "lt": 1.0})  # BERT only
    whole_word_masking: bool = False  # BERT only
    cache_dir: str | None = None  # where megatron index caches go (None = next to run_dir)
