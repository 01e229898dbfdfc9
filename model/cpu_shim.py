"""Let megatron-core 0.16 model code run on CPU (gloo) when CUDA is absent.

megatron-core assumes CUDA in a few places: `torch.cuda.current_device()` as a tensor device (RoPE,
GlobalMemoryBuffer, attention masks), `torch.cuda.synchronize()` in dist_checkpointing, the default causal mask, and the
model-parallel RNG tracker. When `torch.cuda.is_available()` is false we redirect exactly those to
their CPU equivalents; on a GPU machine this module does nothing. Idempotent.
"""

from __future__ import annotations

import os

import torch

_applied = False


def apply() -> bool:
    """Install the CPU redirections if there is no CUDA. Returns True when they are active."""
    global _applied
    if torch.cuda.is_available():
        return False
    if _applied:
        return True
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

    torch.cuda.current_device = lambda: "cpu"  # used as `device=` for tensor creation
    torch.cuda.synchronize = lambda *a, **k: None

    from megatron.core.tensor_parallel import random as mrandom

    def get_rng_state(device="cuda", clone=False, graph_safe=False):
        return torch.get_rng_state()

    def set_rng_state(new_state, device=-1, graph_safe=False):
        torch.set_rng_state(new_state)

    def tracker_add(self, name, seed):
        if seed in self.seeds_:
            raise Exception(f"seed {seed} already exists")
        if name in self.states_:
            raise Exception(f"rng state {name} already exists")
        self.seeds_.add(seed)
        orig = torch.get_rng_state()
        torch.manual_seed(seed)
        self.states_[name] = torch.get_rng_state()
        torch.set_rng_state(orig)

    import functools

    from megatron.core.fusions import fused_softmax
    from megatron.core.transformer import utils as mutils

    @functools.cache
    def default_causal_mask(sq: int) -> torch.Tensor:
        return torch.triu(torch.ones(sq, sq), diagonal=1).bool()

    mutils.get_default_causal_mask = default_causal_mask
    fused_softmax.get_default_causal_mask = default_causal_mask

    mrandom._get_cuda_rng_state = get_rng_state
    mrandom._set_cuda_rng_state = set_rng_state
    mrandom.CudaRNGStatesTracker.add = tracker_add
    _applied = True
    return True
