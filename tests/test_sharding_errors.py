"""Issue #5, clear errors: a layout the model cannot take (a value-table dimension not divisible by the
memory-parallel size, TP x DP != world size, attention heads not divisible by TP) stops every rank with
ONE line on stderr (`pkm: error: ...` naming the config field and what is wrong), no traceback, exit 2.

Through the real entry point: `python -m torch.distributed.run ... -m pkm pretrain` with two
gloo processes (each worker's stderr is read from torchrun's per-rank log files), and one process that
sees the environment of rank 0 of a 4-process world: the check runs before any process group exists,
so that process must fail at once instead of waiting for three peers that never come.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from model.config import ModelConfig, PKMConfig
from pretrain.config import ParallelConfig
from pretrain.distributed import check_layout
from pretrain.errors import PretrainError
from tests.conftest import ROOT, TINY_GPT, free_port

# Reaching model building would mean the check did not fire; keep the run tiny in case it does.
COMMON = ["train.train_steps=1", "logging.tensorboard=false"]
# `-m pkm pretrain` on the tiny GPT, after `python` alone or after torchrun's own arguments.
PKM_PRETRAIN = ["-m", "pkm", "pretrain", "--config", str(TINY_GPT)]


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}  # `python` alone, not an srun task
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def assert_one_line_error(stderr: str, *expected: str) -> None:
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{stderr[-3000:]}"
    assert lines[0].startswith("pkm: error: "), lines[0]
    for text in expected:
        assert text in lines[0], f"{text!r} not in {lines[0]!r}"


TORCHRUN_CASES = [
    # (id, overrides, what the one line must say)
    (
        "hidden-not-divisible-by-memory-parallel",
        ["model.hidden_size=63", "model.num_attention_heads=3", "parallel.memory_parallel=dp"],
        ["model.hidden_size=63", "memory-parallel size 2", "parallel.memory_parallel=dp"],
    ),
    ("tp-does-not-divide-world", ["parallel.tensor_parallel=3"], ["parallel.tensor_parallel=3", "world size 2"]),
    (
        "heads-not-divisible-by-tp",
        ["parallel.tensor_parallel=2", "model.hidden_size=66", "model.num_attention_heads=3"],
        ["model.num_attention_heads=3", "parallel.tensor_parallel=2"],
    ),
]


@pytest.mark.dist
@pytest.mark.parametrize("overrides,expected", [c[1:] for c in TORCHRUN_CASES], ids=[c[0] for c in TORCHRUN_CASES])
def test_layout_error_under_torchrun(tmp_path, overrides, expected):
    logs = tmp_path / "logs"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    torchrun += ["--master_port", str(free_port()), "--log-dir", str(logs), "--redirects", "3"]
    run = [f"run_dir={tmp_path / 'run'}", f"data.cache_dir={tmp_path / 'cache'}"]
    cmd = [*torchrun, *PKM_PRETRAIN, *run, *COMMON, *overrides]
    r = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120)
    out = r.stdout + r.stderr
    assert r.returncode != 0, out[-3000:]
    # torchrun's summary: the failing worker exited 2; a peer it stopped afterwards shows SIGTERM (-15)
    codes = [int(c) for c in re.findall(r"exitcode\s*:\s*(-?\d+)", out)]
    assert 2 in codes and set(codes) <= {2, -15}, out[-3000:]
    worker_logs = sorted(logs.rglob("stderr.log"))
    assert len(worker_logs) == 2, worker_logs
    written = [p.read_text() for p in worker_logs if p.read_text().strip()]
    assert written, "no worker wrote its error"
    for text in written:
        assert_one_line_error(text, *expected)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_memory_parallel_error_before_distributed_setup(tmp_path):
    """hidden 66 over a 4-way memory-parallel split (TP 2 x DP 2, memory_parallel=all); 66 divides by the
    TP size and 6 heads, so only the value-table split is wrong."""
    env = {
        **_env(),
        "RANK": "0",
        "WORLD_SIZE": "4",
        "LOCAL_RANK": "0",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
    }
    model = ["model.hidden_size=66", "model.num_attention_heads=6"]
    parallel = ["parallel.tensor_parallel=2", "parallel.memory_parallel=all"]
    cmd = [sys.executable, *PKM_PRETRAIN, f"run_dir={tmp_path / 'run'}", *COMMON, *model, *parallel]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, (r.stdout + r.stderr)[-3000:]
    assert_one_line_error(
        r.stderr, "model.hidden_size=66", "memory-parallel size 4", "parallel.memory_parallel=all", "TP 2 x DP 2"
    )


def _model(**kw) -> ModelConfig:
    pkm = kw.pop("pkm", PKMConfig(layers=[1]))
    return ModelConfig(num_layers=2, pkm=pkm, **kw)


LAYOUTS = [
    # (model, tensor_parallel, memory_parallel, world, error substring or None for a valid layout)
    (_model(hidden_size=66, num_attention_heads=6), 2, "tp", 4, None),
    (_model(hidden_size=66, num_attention_heads=6), 2, "all", 4, "memory-parallel size 4"),
    (_model(hidden_size=66, num_attention_heads=6), 1, "dp", 4, "memory-parallel size 4"),
    (_model(hidden_size=63, num_attention_heads=3), 1, "none", 2, None),  # replicated tables take any width
    (_model(hidden_size=63, num_attention_heads=3, pkm=PKMConfig(layers=[])), 1, "dp", 2, None),  # no PKM
    (_model(hidden_size=64, num_attention_heads=4), 2, "all", 6, "memory-parallel size 6"),
    (_model(hidden_size=64, num_attention_heads=4), 4, "all", 6, "parallel.tensor_parallel=4 does not divide"),
    (_model(hidden_size=64, num_attention_heads=4), 0, "all", 2, "parallel.tensor_parallel=0 does not divide"),
    (_model(hidden_size=64, num_attention_heads=8, num_query_groups=2), 4, "tp", 4, "model.num_query_groups=2"),
    (_model(hidden_size=64, num_attention_heads=8, num_query_groups=4), 4, "tp", 4, None),
    (_model(hidden_size=64, num_attention_heads=4, ffn_hidden_size=130), 4, "tp", 4, "model.ffn_hidden_size=130"),
]


@pytest.mark.parametrize(
    "model,tp,mode,world,error",
    LAYOUTS,
    ids=[
        f"h{m.hidden_size}-heads{m.num_attention_heads}-tp{tp}-{mode}-w{w}-{'ok' if e is None else 'error'}"
        for m, tp, mode, w, e in LAYOUTS
    ],
)
def test_check_layout(model, tp, mode, world, error):
    parallel = ParallelConfig(tensor_parallel=tp, memory_parallel=mode)
    if error is None:
        check_layout(model, parallel, world)
    else:
        with pytest.raises(PretrainError, match=re.escape(error)):
            check_layout(model, parallel, world)
