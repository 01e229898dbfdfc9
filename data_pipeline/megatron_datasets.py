"""Glue to megatron-core's datasets: a tokenizer adapter and the masked-LM (BERT) dataset.

GPT samples come straight from megatron-core's `GPTDataset`. For BERT we reuse megatron's
`MaskedWordPieceDataset` (its sentence-packing sample index, built by the C++ helpers, and its
masking: 15% of tokens, 80% [MASK] / 10% random / 10% unchanged, optional whole words) but
produce our own item format, without next-sentence prediction:
`tokens`, `labels`, `loss_mask` (1 at masked positions), `padding_mask` (True = padding), `types`.
"""

from __future__ import annotations

import logging
import os
from functools import cached_property

import numpy
import torch
from megatron.core.datasets.masked_dataset import MaskedWordPieceDataset

from data_pipeline.tokenizer import Tokenizer

log = logging.getLogger("pkm.data")


class MegatronTokenizerAdapter:
    """The attributes megatron-core's datasets read from a tokenizer.

    `inv_vocab` follows the WordPiece convention megatron's whole-word masking expects: pieces that
    continue a word start with "##" (for sentencepiece: pieces without a leading '▁').
    `unique_identifiers` makes the tokenizer part of megatron's index-cache key.
    """

    def __init__(self, tok: Tokenizer):
        self.tok = tok
        self.vocab_size = tok.vocab_size
        self.eod = tok.eod_id
        self.eos = tok.eod_id
        if tok.pad_id is not None:
            self.pad = tok.pad_id
        self.cls, self.sep, self.mask = tok.cls_id, tok.sep_id, tok.mask_id
        self.unique_identifiers = {
            "class": type(tok).__name__,
            "sha256": tok.identity["sha256"],
            "vocab_size": tok.vocab_size,
        }

    @cached_property
    def inv_vocab(self) -> dict:
        starts = self.tok.word_start
        return {i: ("" if starts[i] else "##") + str(i) for i in range(self.vocab_size)}


class MaskedLMDataset(MaskedWordPieceDataset):
    """BERT masked-LM samples: [CLS] sentences-of-one-document [SEP], padded to sequence_length."""

    def __init__(self, indexed_dataset, dataset_path, indexed_indices, num_samples, index_split, config):
        super().__init__(indexed_dataset, dataset_path, indexed_indices, num_samples, index_split, config)
        tok: Tokenizer = config.tokenizer.tok
        # Random replacements draw from ordinary pieces only (never [PAD]/[CLS]/[MASK]...).
        special = tok.special_ids
        self.token_lookup = numpy.array([i for i in range(tok.vocab_size) if i not in special], dtype=numpy.int64)
        self._pad = tok.pad_id if tok.pad_id is not None else 0
        # room for [CLS] and [SEP]
        self.sample_index = self._build_sample_index(self.config.sequence_length - 2, 1)

    def _build_sample_index(self, sequence_length: int, min_sentences_per_sample: int) -> numpy.ndarray:
        """megatron's build_mapping, cached under path_to_cache; written atomically and usable
        without torch.distributed (one process)."""
        from megatron.core.datasets import helpers

        cache = self.config.path_to_cache or os.path.join(self.dataset.path_prefix + "-cache")
        base = os.path.join(cache, f"{self.unique_description_hash}-{type(self).__name__}")
        path = base + "-sample_index.npy"
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        if not os.path.isfile(path) and rank == 0:
            os.makedirs(cache, exist_ok=True)
            with open(base + "-description.txt", "w") as f:
                f.write(self.unique_description)
            # a requested number of samples: as many epochs as needed; else exactly one epoch
            if self.num_samples is not None:
                num_epochs, max_samples = numpy.iinfo(numpy.int32).max - 1, self.num_samples
            else:
                num_epochs, max_samples = 1, numpy.iinfo(numpy.int64).max - 1
            indices = numpy.append(self.indices, self.indices[-1] + 1)
            sample_index = helpers.build_mapping(
                self.dataset.document_indices[indices],
                self.dataset.sequence_lengths,
                num_epochs,
                max_samples,
                sequence_length,
                self.config.short_sequence_probability,
                self.config.random_seed,
                False,
                min_sentences_per_sample,
            )
            tmp = f"{base}-tmp{os.getpid()}.npy"
            numpy.save(tmp, sample_index, allow_pickle=False)
            os.replace(tmp, path)
            return sample_index
        # other ranks: megatron's builder has rank 0 build first and then calls a barrier
        return numpy.load(path, allow_pickle=False, mmap_mode="r")

    def __len__(self) -> int:
        return self.sample_index.shape[0]

    def _get_token_mask(self, rng: numpy.random.RandomState) -> int | None:
        if rng.random() < 0.8:
            return self.config.tokenizer.mask
        if rng.random() >= 0.5:
            return int(self.token_lookup[rng.randint(0, len(self.token_lookup))])
        return None  # keep the original token

    def __getitem__(self, idx: int) -> dict:
        beg, end, target = (int(x) for x in self.sample_index[idx])
        rng = numpy.random.RandomState(seed=(self.config.random_seed + idx) % 2**32)
        content = numpy.concatenate([self.dataset[i] for i in range(beg, end)]).tolist()
        if len(content) > target:  # trim a random amount from the front, the rest from the back
            front = rng.randint(0, len(content) - target + 1)
            content = content[front : front + target]
        tok = self.config.tokenizer
        original = [tok.cls, *content, tok.sep]
        masked, positions, _, _, _ = self._create_masked_lm_predictions(original, target, rng)

        s = self.config.sequence_length
        n = len(original)
        tokens = numpy.full(s, self._pad, dtype=numpy.int64)
        tokens[:n] = masked
        labels = numpy.full(s, self._pad, dtype=numpy.int64)
        labels[:n] = original  # valid ids everywhere; the loss only counts where loss_mask == 1
        loss_mask = numpy.zeros(s, dtype=numpy.float32)
        loss_mask[positions] = 1.0
        padding_mask = numpy.zeros(s, dtype=bool)
        padding_mask[n:] = True
        return {
            "tokens": torch.from_numpy(tokens),
            "labels": torch.from_numpy(labels),
            "loss_mask": torch.from_numpy(loss_mask),
            "padding_mask": torch.from_numpy(padding_mask),
            "types": torch.zeros(s, dtype=torch.int64),
        }
