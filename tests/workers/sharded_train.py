"""torchrun worker for the sharding tests: builds (value-table init, resume) and trains the real Trainer
while a dispatch mode checks that no rank ever materialises the full value table or a dense full-table
gradient.

usage: torchrun --nproc_per_node N tests/workers/sharded_train.py CONFIG [overrides...]
"""

from __future__ import annotations

import os
import sys

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class NoFullTable(TorchDispatchMode):
    """Fails any op whose dense output has the table's row count and more than one shard's elements
    (sparse gradients are fine: their size follows the tokens read, not the table)."""

    def __init__(self, n_slots: int, shard_numel: int):
        super().__init__()
        self.n_slots, self.shard_numel = n_slots, shard_numel
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor) or t.is_sparse or self.n_slots not in t.shape:
                continue
            numel = t.numel()
            self.largest = max(self.largest, numel)
            if numel > self.shard_numel:
                raise AssertionError(
                    f"{func} produced a dense {tuple(t.shape)} tensor ({numel} elements) "
                    f"> one value shard ({self.shard_numel})"
                )
        return out


def shard_shape(cfg) -> tuple[int, int]:
    """The value shard this rank should hold under cfg's layout (world from torchrun)."""
    world, tp = int(os.environ["WORLD_SIZE"]), cfg.parallel.tensor_parallel
    size = {"none": 1, "tp": tp, "dp": world // tp, "all": world}[cfg.parallel.memory_parallel]
    return cfg.model.pkm.n_keys**2, cfg.model.hidden_size // size


def main() -> int:
    from pretrain.config import load_config
    from pretrain.trainer import Trainer

    if os.environ.get("PKM_TEST_CHECKPOINT_BLOCK_BYTES"):  # several row blocks even for a tiny table
        import model.pkm.value_table as vt

        vt.CHECKPOINT_BLOCK_BYTES = int(os.environ["PKM_TEST_CHECKPOINT_BLOCK_BYTES"])
    cfg = load_config(sys.argv[1], sys.argv[2:])
    n_slots, shard_dim = shard_shape(cfg)
    guard = NoFullTable(n_slots, n_slots * shard_dim)
    with guard:
        tr = Trainer(cfg)
    (_, mem), *_ = tr.pkm_layers
    table = mem.values
    assert table.weight.shape == (n_slots, shard_dim), table.weight.shape
    with guard:
        code = tr.train().exit_code
    print(
        f"rank {tr.env.rank}: value shard {tuple(table.weight.shape)}, largest dense table-shaped tensor "
        f"{guard.largest} elements",
        flush=True,
    )
    from pretrain.distributed import shutdown

    shutdown()
    return code


if __name__ == "__main__":
    sys.exit(main())
