"""The data pipeline under torchrun (2 ranks, gloo, megatron parallel_state with DP=2): rank 0 builds
the demo corpus and megatron's index caches while the other waits; both ranks see the same samples,
and the global batch sampler gives each its own disjoint part of every step."""

from __future__ import annotations

import json
import os

import pytest

from tests.conftest import torchrun

WORKER = r"""
import json, os, sys, hashlib
import torch
import torch.distributed as dist
from megatron.core import parallel_state

from data_pipeline.config import DataConfig
from data_pipeline.samplers import GlobalBatchSampler, build_datasets, collate
from data_pipeline.tokenizer import load_tokenizer

cache, out = sys.argv[1], sys.argv[2]
dist.init_process_group("gloo")
parallel_state.initialize_model_parallel(1)
rank, dp = parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()
result = {"dp": dp}
for family, tok in (("gpt", load_tokenizer(None)), ("bert", load_tokenizer("bert"))):
    train, valid, _ = build_datasets(DataConfig(), family, 64, tok, dict(train=96, valid=16, test=16), 11, cache)
    digest = hashlib.sha256(b"".join(train[i]["tokens"].numpy().tobytes() for i in range(96))).hexdigest()
    sampler = GlobalBatchSampler(96, 16, 2, rank, dp)  # the 96 samples asked for: 6 steps
    steps = []
    for micro_batches in sampler:
        for idx in micro_batches:
            assert collate([train[i] for i in idx])["tokens"].shape == (2, 64)
        steps.append([i for mb in micro_batches for i in mb])
    result[family] = {"len": len(train), "digest": digest, "steps": steps, "consumed": sampler.state_dict()}
with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
    json.dump(result, f)
dist.barrier()
dist.destroy_process_group()
"""


@pytest.mark.dist
@pytest.mark.slow
def test_build_datasets_under_torchrun(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    cache = tmp_path / "cache"
    r = torchrun(script, cache, tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{i}.json").read_text()) for i in range(2)]
    assert [x["dp"] for x in ranks] == [2, 2]
    for family in ("gpt", "bert"):
        a, b = ranks[0][family], ranks[1][family]
        assert a["len"] == b["len"] >= 96 and a["digest"] == b["digest"]  # same samples on both ranks
        assert len(a["steps"]) == len(b["steps"]) == 96 // 16
        for k, (sa, sb) in enumerate(zip(a["steps"], b["steps"])):
            assert not set(sa) & set(sb) and sorted(sa + sb) == list(range(16 * k, 16 * (k + 1)))
        assert a["consumed"] == b["consumed"] == {"consumed_samples": 16 * len(a["steps"])}
    # the demo corpus was built once (by rank 0), nothing half-written is left (the .lock files stay: a lock
    # file removed while another run waits on it would let a third run build beside it)
    demo = sorted(os.listdir(cache / "demo_corpus"))
    assert len(demo) == 8 and not [f for f in demo if ".tmp" in f], demo
    assert sorted(f.rsplit(".", 1)[-1] for f in demo) == sorted(["bin", "idx", "json", "lock"] * 2), demo
