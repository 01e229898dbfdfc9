"""Issue #17 (part B): nothing the size of a full value table on one rank.

- Initialisation: a rank draws only its own columns, yet the shards of any layout put together are the
  single-process table exactly (each (block of rows, column) has its own seeded stream); the largest
  tensor a shard's initialisation makes is the shard itself.
- Checkpoint save and load: tests/workers/sharded_train.py builds (init, resume) and trains every
  sharded run of test_sharding / test_reshard under a dispatch guard that fails on a dense tensor with
  the table's rows and more than one shard's elements.
- Export: `pkm export hf`'s reader and writer, run under the same guard with small checkpoint blocks,
  never hold more than one block of rows of a table, and write exactly the checkpoint's table.
The memory figures at 1.07e9 parameters are benchmarks/scale.py's.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from model.pkm.value_table import MemoryParallel, ValueTable


class LargestStorage(TorchDispatchMode):
    """Records the largest storage (bytes) any op's output lives in."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and not t.is_meta:
                self.largest = max(self.largest, t.untyped_storage().nbytes())
        return out


# (tp size, dp size): memory-parallel groups of 2, 4 (over DP, or TP x DP) and 8
LAYOUTS = [(1, 2), (1, 4), (2, 2), (2, 4)]


@pytest.mark.parametrize("tp,dp", LAYOUTS, ids=[f"tp{t}xdp{d}" for t, d in LAYOUTS])
def test_init_draws_only_own_columns_and_equals_single_process_table(tp, dp):
    n_slots, dim, seed = 5000, 64, 1001  # 5000: a last block of rows shorter than the others
    full = ValueTable(n_slots, dim, init_seed=seed).weight.detach()
    assert abs(full.std().item() - dim**-0.5) < 0.01 * dim**-0.5
    shards = []
    for t in range(tp):
        for d in range(dp):
            guard = LargestStorage()
            with guard:
                table = ValueTable(
                    n_slots, dim, MemoryParallel(tp_size=tp, tp_rank=t, dp_size=dp, dp_rank=d), init_seed=seed
                )
            shard_bytes = table.weight.numel() * 4
            assert guard.largest <= shard_bytes, f"init made a {guard.largest}-byte tensor, the shard is {shard_bytes}"
            shards.append((table.column_start, table.weight.detach()))
    together = torch.cat([w for _, w in sorted(shards, key=lambda s: s[0])], dim=1)
    assert torch.equal(together, full)
    other = ValueTable(n_slots, dim, init_seed=seed + 1).weight.detach()
    assert not torch.equal(other, full)


def test_shape_only_tables_hold_no_storage():
    from model.pkm.value_table import shape_only_tables

    with shape_only_tables():
        table = ValueTable(1 << 20, 1024)  # 4 GiB if it were real
    assert table.weight.is_meta and table.weight.shape == (1 << 20, 1024)
    assert not ValueTable(16, 8).weight.is_meta


@pytest.mark.dist
@pytest.mark.slow
def test_export_streams_tables_in_blocks_of_rows(megatron_single_process, tmp_path, monkeypatch):
    """A world-2 checkpoint (table split in 2) written and exported with 8 checkpoint blocks of rows: no
    tensor with all the table's rows is ever made (not even when reading a saved chunk); the export
    holds the checkpoint's table exactly and loads in transformers."""
    from safetensors import safe_open

    import model.pkm.value_table as vt
    from model.hf.export import export_hf
    from pretrain.checkpoint import CheckpointReader, checkpoint_tokenizer
    from tests.test_sharding import run, value_table

    n_slots, dim = 48**2, 64  # test_sharding's n_keys, tiny_gpt's hidden size
    monkeypatch.setenv("PKM_TEST_CHECKPOINT_BLOCK_BYTES", str(n_slots * dim * 4 // 8))
    monkeypatch.setattr(vt, "CHECKPOINT_BLOCK_BYTES", n_slots * dim * 4 // 8)
    d = run(
        "tiny_gpt.yaml",
        2,
        tmp_path / "run",
        "parallel.tensor_parallel=1",
        "parallel.memory_parallel=dp",
        "train.micro_batch_size=4",
        "train.train_steps=2",
    )
    table = value_table(d)
    assert table.shape == (n_slots, dim)
    rows, count = vt.checkpoint_row_blocks(n_slots, dim)
    assert count == 8
    ckpt = d / "checkpoints" / (d / "checkpoints" / "latest").read_text().strip()
    with _NoTableRows(n_slots):
        with CheckpointReader(ckpt) as reader:
            out = export_hf(
                reader.state_dict(),
                reader.cfg.model,
                checkpoint_tokenizer(reader.path),
                str(tmp_path / "hf"),
                max_shard_size="100KB",
            )
    files = os.listdir(out)
    index = json.loads((Path(out) / "model.safetensors.index.json").read_text())
    name = next(k for k in index["weight_map"] if k.endswith("memory.values.weight"))
    with safe_open(os.path.join(out, index["weight_map"][name]), "pt") as f:
        assert torch.equal(f.get_tensor(name), table)
    for f in files:
        if f.endswith(".safetensors"):
            assert os.stat(os.path.join(out, f)).st_mode & 0o777 == 0o644, f

    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    assert torch.equal(dict(hf.named_parameters())[name].detach(), table)


class _NoTableRows(TorchDispatchMode):
    """Fails any op whose output has all n_slots rows of a table (only blocks of rows are allowed)."""

    def __init__(self, n_slots: int):
        super().__init__()
        self.n_slots = n_slots

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and not t.is_meta and t.dim() == 2 and t.shape[0] == self.n_slots:
                raise AssertionError(f"{func} produced a {tuple(t.shape)} tensor: a whole table's rows")
        return out


@pytest.mark.dist
@pytest.mark.slow
def test_resume_in_row_blocks_at_another_layout(tmp_path, monkeypatch):
    """Resumes read tables in place, block by block, under the no-full-table guard of the worker, and the
    next step's loss matches the uninterrupted run within 1e-5 (relative, fp32):
    - a world-2 checkpoint of 8 row blocks per table resumes at world 4 (each rank reads only pieces
      of blocks);
    - a checkpoint whose tables are one chunk per rank (what the code before row blocks wrote, and
      what a table of under one block still is) resumes at world 1 in 8 row blocks. (Such a chunk is
      read whole, so a rank briefly holds one saved shard: bounded by the saving layout's shard.)"""
    import shutil

    from tests.test_sharding import loss_curve, run

    blocks8 = str(48**2 * 64 * 4 // 8)
    for name, saved_blocks, world in (("blocks", blocks8, 4), ("single_chunk", "", 1)):
        monkeypatch.setenv("PKM_TEST_CHECKPOINT_BLOCK_BYTES", saved_blocks)
        a = run(
            "tiny_gpt.yaml",
            2,
            tmp_path / f"{name}_w2",
            "parallel.tensor_parallel=1",
            "parallel.memory_parallel=dp",
            "train.micro_batch_size=4",
            "train.train_steps=3",
            "checkpoint.save_interval=2",
            "checkpoint.keep_last=2",
        )
        b = tmp_path / f"{name}_w{world}"
        shutil.copytree(a / "checkpoints" / "step_0000002", b / "checkpoints" / "step_0000002")
        monkeypatch.setenv("PKM_TEST_CHECKPOINT_BLOCK_BYTES", blocks8)
        run(
            "tiny_gpt.yaml",
            world,
            b,
            "parallel.tensor_parallel=1",
            "parallel.memory_parallel=dp",
            f"train.micro_batch_size={8 // world}",
            "train.train_steps=3",
            "checkpoint.resume=auto",
        )
        (continued,), (resumed,) = loss_curve(a)[2:], loss_curve(b)
        assert abs(resumed - continued) <= 1e-5 * abs(continued), (name, resumed, continued)
