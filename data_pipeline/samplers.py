"""Training samples: GPT / masked-LM datasets over indexed corpora, and the global batch sampler.

    train, valid, test = build_datasets(cfg, "gpt", seq_length, tokenizer,
                                        dict(train=N, valid=M, test=K), seed, cache_dir)
    sampler = GlobalBatchSampler(len(train), global_batch_size, micro_batch_size, dp_rank, dp_size,
                                 consumed_samples=state["consumed_samples"])
    for micro_batches in sampler:            # one training step
        for idx in micro_batches:            # this rank's micro-batches
            batch = collate([train[i] for i in idx])

Datasets are deterministic given the seed (megatron-core builds and caches the shuffled sample
indices). The sampler's global order is 0, 1, 2, ... over those samples, so its whole state is
`consumed_samples`: a resumed run continues with exactly the next samples, whatever its
data-parallel size.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator

import torch

from data_pipeline.config import DataConfig
from data_pipeline.errors import DataError
from data_pipeline.preprocess import check_dataset, check_tokenizer_matches, ensure_demo_corpus, read_manifest
from data_pipeline.tokenizer import Tokenizer

__all__ = ["build_datasets", "GlobalBatchSampler", "collate", "check_tokenizer_matches"]
log = logging.getLogger("pkm.data")

GPT_KEYS = ("tokens", "labels", "loss_mask")


class _Fields(torch.utils.data.Dataset):
    """A megatron dataset seen through the keys the trainer uses."""

    def __init__(self, ds, keys=GPT_KEYS):
        self.ds, self.keys = ds, keys

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, idx: int) -> dict:
        item = self.ds[int(idx)]
        return {k: item[k] for k in self.keys}


def _dist_rank() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _demo_prefix(cache_dir: str, family: str, tokenizer: Tokenizer) -> str:
    """Rank 0 preprocesses the bundled books; the other ranks wait, then reuse its output."""
    rank, world = _dist_rank()
    out = os.path.join(cache_dir, "demo_corpus")
    if rank == 0:
        prefix = ensure_demo_corpus(out, family, tokenizer)
    if world > 1:
        torch.distributed.barrier()
    if rank != 0:
        prefix = ensure_demo_corpus(out, family, tokenizer)
    return prefix


def build_datasets(
    cfg: DataConfig, family: str, seq_length: int, tokenizer: Tokenizer, num_samples: dict, seed: int, cache_dir: str
):
    """(train, valid, test) torch Datasets; a split is None when `cfg.split` gives it no documents.

    GPT items: tokens, labels (next token), loss_mask. BERT items: tokens, labels, loss_mask (1 at
    masked positions), padding_mask (True = padding), types. `cfg.paths` empty = the bundled
    Austen books. Every dataset's manifest must name the model's tokenizer. Call on all ranks.
    """
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder

    from data_pipeline.megatron_datasets import MaskedLMDataset, MegatronTokenizerAdapter

    if family not in ("gpt", "bert"):
        raise DataError(f"family {family!r}: expected 'gpt' or 'bert'")
    cache_dir = cfg.cache_dir or cache_dir
    paths = list(cfg.paths) or [_demo_prefix(cache_dir, family, tokenizer)]
    manifests = [check_dataset(p, tokenizer) for p in paths]
    for p, m in zip(paths, manifests):
        if m["family"] != family:
            raise DataError(f"{p}: preprocessed for {m['family']} (--family {m['family']}) but the model is {family}")
    weights = cfg.weights
    if weights is not None and len(weights) != len(paths):
        raise DataError(f"data.weights: {len(weights)} weights for {len(paths)} data.paths")
    if weights is None and len(paths) > 1:
        weights = [float(m["tokens"]) for m in manifests]  # proportional to size, any number of epochs
    blend = (paths, weights if len(paths) > 1 else None)
    if len(paths) > 1:
        if _dist_rank() == (0, 1) and not torch.distributed.is_initialized():
            raise DataError(
                "blending several data.paths needs torch.distributed initialised "
                "(megatron's BlendedDataset asks for the rank; the trainer initialises it)"
            )
        sizes = [int(num_samples.get(k) or 0) for k in ("train", "valid", "test")]
    else:  # one corpus: an unrequested split gets one epoch
        sizes = [num_samples.get(k) or None for k in ("train", "valid", "test")]
    adapter = MegatronTokenizerAdapter(tokenizer)
    common = dict(
        random_seed=seed,
        sequence_length=seq_length,
        blend=blend,
        split=cfg.split,
        path_to_cache=os.path.join(cache_dir, "megatron_indices"),
        tokenizer=adapter,
    )
    if family == "gpt":
        from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

        config = GPTDatasetConfig(
            reset_position_ids=False,
            reset_attention_mask=False,
            eod_mask_loss=False,
            create_attention_mask=False,
            **common,
        )
        cls, keys = GPTDataset, GPT_KEYS
    else:
        from megatron.core.datasets.masked_dataset import MaskedWordPieceDatasetConfig

        for name in ("cls_id", "sep_id", "mask_id"):
            if getattr(tokenizer, name) is None:
                raise DataError(
                    f"tokenizer {tokenizer.path}: no {name[:-3].upper()} token, needed for BERT "
                    "(use a BERT-recipe sentencepiece model or a BERT HF tokenizer)"
                )
        config = MaskedWordPieceDatasetConfig(
            masking_probability=cfg.mlm_probability,
            short_sequence_probability=0.1,
            masking_max_ngram=1,
            masking_do_full_word=cfg.whole_word_masking,
            masking_do_permutation=False,
            masking_use_longer_ngrams=False,
            masking_use_geometric_distribution=False,
            **common,
        )
        cls, keys = MaskedLMDataset, ("tokens", "labels", "loss_mask", "padding_mask", "types")
    # every rank builds its own view (rank 0 first: it writes the index caches, then a barrier)
    built = BlendedMegatronDatasetBuilder(cls, sizes, lambda: True, config).build()
    return tuple(None if d is None else _Fields(d, keys) for d in built)


class GlobalBatchSampler:
    """Per training step, the micro-batches (lists of sample indices) of one data-parallel rank.

    Step k covers the global samples [c + k*G, c + (k+1)*G) where c = consumed_samples at start and
    G = global_batch_size; rank r takes the r-th of dp_size equal slices, cut into micro-batches.
    Iteration ends when fewer than G samples remain. `consumed_samples` counts every step handed
    out, so saving it after a step and resuming (with any dp_size dividing G/micro_batch_size)
    continues with exactly the next samples.
    """

    def __init__(
        self,
        num_samples: int,
        global_batch_size: int,
        micro_batch_size: int,
        dp_rank: int = 0,
        dp_size: int = 1,
        consumed_samples: int = 0,
    ):
        if global_batch_size % (micro_batch_size * dp_size):
            raise DataError(
                f"global_batch_size {global_batch_size} is not a multiple of micro_batch_size "
                f"{micro_batch_size} x data-parallel size {dp_size}"
            )
        if not 0 <= dp_rank < dp_size:
            raise DataError(f"data-parallel rank {dp_rank} out of range for size {dp_size}")
        self.num_samples = num_samples
        self.global_batch_size = global_batch_size
        self.micro_batch_size = micro_batch_size
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.consumed_samples = consumed_samples

    @property
    def num_micro_batches(self) -> int:
        return self.global_batch_size // (self.micro_batch_size * self.dp_size)

    def __len__(self) -> int:
        """Steps left."""
        return max(0, (self.num_samples - self.consumed_samples) // self.global_batch_size)

    def __iter__(self) -> Iterator[list[list[int]]]:
        per_rank = self.global_batch_size // self.dp_size
        mbs = self.micro_batch_size
        while self.consumed_samples + self.global_batch_size <= self.num_samples:
            start = self.consumed_samples + self.dp_rank * per_rank
            mine = list(range(start, start + per_rank))
            self.consumed_samples += self.global_batch_size
            yield [mine[i : i + mbs] for i in range(0, per_rank, mbs)]

    def state_dict(self) -> dict:
        return {"consumed_samples": self.consumed_samples}

    def load_state_dict(self, state: dict) -> None:
        self.consumed_samples = int(state["consumed_samples"])


def collate(items: list[dict]) -> dict:
    """Stack a list of sample dicts into a batch dict ([b, s] tensors)."""
    if not items:
        raise ValueError("collate: empty list of samples")
    return {k: torch.stack([torch.as_tensor(it[k]) for it in items]) for k in items[0]}


def dataset_summary(prefix: str) -> dict:
    """Manifest counts of a preprocessed dataset (for logs and `pkm data inspect`)."""
    m = read_manifest(prefix)
    return {k: m[k] for k in ("family", "documents", "sequences", "tokens", "vocab_size", "skipped_total")}
