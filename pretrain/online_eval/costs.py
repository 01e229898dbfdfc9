"""What a run costs: an analytical FLOP estimate per chunk and a peak-memory probe.

FLOPs (multiply-adds count 2): a forward over q query tokens attending to c keys on average costs
2 * (weights of all linear layers but the output head) * q + 2 * head * (tokens whose logits are kept)
+ 4 * layers * attention width * (sum of keys attended). A backward costs the forward again for the
activation gradients, but only through the head and the layers at or above the lowest one that holds
a trainable weight, plus 2 * (trainable matmul weights) * q for the weight gradients; an update adds
~10 FLOPs per trainable element. `test_online_eval` checks the estimate against torch's FlopCounterMode.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import torch
from torch import nn


def _is_matmul(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"  # GPT-2's Conv1D


def _config_get(config, *names, default=None):
    for n in names:
        v = getattr(config, n, None)
        if v is not None:
            return v
    return default


@dataclass
class FlopModel:
    body: int  # weights of linear layers other than the output head
    head: int  # output head weights (vocab x hidden)
    layers: int
    attn_width: int  # heads * head_dim of the queries
    pkm_per_token: int  # product-key search + value reads, per token, over all PKM layers

    @classmethod
    def of(cls, model: nn.Module) -> FlopModel:
        config = getattr(model, "config", None)
        head_module = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        hidden = _config_get(config, "hidden_size", "n_embd", "d_model", default=0)
        if head_module is not None:
            head = int(head_module.weight.numel())
        else:  # an output head computed from the tied input embedding (F.linear), as in our PKM-GPT
            head = int(_config_get(config, "vocab_size", default=0)) * int(hidden)
        body = 0
        seen = set()
        for m in model.modules():
            if _is_matmul(m) and m is not head_module and id(m.weight) not in seen:
                seen.add(id(m.weight))
                body += int(m.weight.numel())
        layers = _config_get(config, "num_hidden_layers", "n_layer", "num_layers", default=0)
        heads = _config_get(config, "num_attention_heads", "n_head", default=1)
        head_dim = _config_get(config, "head_dim", default=hidden // max(heads, 1))
        pkm = 0
        for m in model.modules():
            if type(m).__name__ == "ProductKeyMemory":
                cfg = getattr(m, "cfg", m)
                h, knn = _config_get(cfg, "heads", default=1), _config_get(cfg, "knn", default=32)
                n_keys, k_dim = _config_get(cfg, "n_keys", default=0), _config_get(cfg, "k_dim", default=0)
                dim = _config_get(m, "dim", "v_dim", default=hidden)
                pkm += 2 * h * n_keys * k_dim + 2 * h * knn * dim
        return cls(body=body, head=head, layers=int(layers), attn_width=int(heads * head_dim), pkm_per_token=pkm)

    def forward(self, queries: int, keys_attended: int, logits_kept: int) -> float:
        """`keys_attended`: the sum over queries of the keys each one attends to (causal)."""
        return (
            2.0 * self.body * queries
            + 2.0 * self.head * logits_kept
            + 4.0 * self.layers * self.attn_width * keys_attended
            + self.pkm_per_token * queries
        )

    def backward(
        self, queries: int, keys_attended: int, logits_kept: int, trainable_matmul: int, depth: float = 1.0
    ) -> float:
        """`depth`: the fraction of the layers the activation gradients must go through (those at and
        above the lowest layer holding a trainable weight); the output head is always crossed."""
        body = 2.0 * self.body * queries + 4.0 * self.layers * self.attn_width * keys_attended
        return (
            depth * (body + self.pkm_per_token * queries)
            + 2.0 * self.head * logits_kept
            + 2.0 * trainable_matmul * queries
        )


def causal_keys(queries: int, memory: int) -> int:
    """Keys attended in total by `queries` causal queries after `memory` cached keys."""
    return queries * memory + queries * (queries + 1) // 2


class _RssSampler:
    """One background thread (shared by all probes) keeping the largest resident set seen since `reset`."""

    def __init__(self):
        import psutil

        self._proc = psutil.Process()
        self.value = self.rss()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def rss(self) -> int:
        return self._proc.memory_info().rss

    def _loop(self) -> None:
        while True:
            time.sleep(0.005)
            self.value = max(self.value, self.rss())

    def reset(self) -> None:
        self.value = self.rss()


_SAMPLER = None


class PeakMemory:
    """Peak memory in bytes over `start()`..`stop()` blocks: CUDA's allocator peak on a GPU, else the
    process resident set sampled every 5 ms (it includes everything the process holds, and can miss
    spikes shorter than the sampling period)."""

    def __init__(self, device: torch.device):
        global _SAMPLER
        self.cuda = device.type == "cuda"
        self.peak = 0
        if not self.cuda and _SAMPLER is None:
            _SAMPLER = _RssSampler()

    def start(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        else:
            _SAMPLER.reset()

    def stop(self) -> None:
        if self.cuda:
            self.peak = max(self.peak, torch.cuda.max_memory_allocated())
        else:
            self.peak = max(self.peak, _SAMPLER.value, _SAMPLER.rss())


def now() -> float:
    return time.perf_counter()
