"""The TP x DP layout check: what a model config can be split into, for a given world size.

Torch-free on purpose: the trainer runs it on every rank before any process group exists
(`pretrain.distributed`), and `pkm launch` runs it on the login node with the world size the job
will have, so a layout the trainer would refuse is refused before anything is submitted.
"""

from __future__ import annotations

from pretrain.config import ParallelConfig
from pretrain.errors import PretrainError


def memory_parallel_size(mode: str, tp: int, dp: int) -> int:
    """How many ranks split each PKM value table's columns under `parallel.memory_parallel=mode`."""
    return {"none": 1, "tp": tp, "dp": dp, "all": tp * dp}[mode]


def check_layout(model, parallel: ParallelConfig, world_size: int) -> None:
    """One-line PretrainErrors for a TP x DP layout this model cannot take (megatron would fail later
    with a traceback, or ranks would disagree)."""
    tp = parallel.tensor_parallel
    if tp < 1 or world_size % tp:
        raise PretrainError(
            f"parallel.tensor_parallel={tp} does not divide the world size {world_size} "
            f"(TP x DP must equal the number of processes)"
        )
    if model.num_attention_heads % tp:
        raise PretrainError(
            f"model.num_attention_heads={model.num_attention_heads} is not divisible by "
            f"parallel.tensor_parallel={tp} (each TP rank holds whole attention heads)"
        )
    if model.num_query_groups and model.num_query_groups % tp:
        raise PretrainError(
            f"model.num_query_groups={model.num_query_groups} is not divisible by parallel.tensor_parallel={tp}"
        )
    ffn = model.ffn_hidden_size or 4 * model.hidden_size
    if ffn % tp:
        raise PretrainError(f"model.ffn_hidden_size={ffn} is not divisible by parallel.tensor_parallel={tp}")
    dp = world_size // tp
    mode = parallel.memory_parallel
    size = memory_parallel_size(mode, tp, dp)
    if model.pkm.layers and model.hidden_size % size:
        raise PretrainError(
            f"model.hidden_size={model.hidden_size} is not divisible by the memory-parallel size "
            f"{size} (parallel.memory_parallel={mode} over TP {tp} x DP {dp}): each rank holds "
            f"hidden_size / {size} columns of the PKM value tables"
        )
