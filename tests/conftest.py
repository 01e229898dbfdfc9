"""Shared pytest fixtures and helpers (import the helpers with `from tests.conftest import ...`)."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY_GPT = ROOT / "configs" / "tiny_gpt.yaml"
TINY_BERT = ROOT / "configs" / "tiny_bert.yaml"
PY = os.path.abspath(sys.executable)  # this venv's interpreter, as `pkm launch` writes it into commands


def run_pkm(
    *args: str, env: dict | None = None, cwd: Path | str = ROOT, timeout: int = 900, stdin: str | None = None
) -> subprocess.CompletedProcess:
    """The real `pkm` entry point in a subprocess (the interpreter of this venv, this checkout's code)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "2", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "pkm", *map(str, args)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        input=stdin,
    )


def run_benchmark(script: str, *args, timeout: int = 1800) -> dict:
    """`python benchmarks/SCRIPT ARGS --json` (this checkout); asserts it succeeded; its last line, parsed."""
    cmd = [sys.executable, str(ROOT / "benchmarks" / script), *map(str, args), "--json"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def descendants(pid: int) -> set[int]:
    """The pids of every live process below `pid`."""
    import psutil

    try:
        return {c.pid for c in psutil.Process(pid).children(recursive=True)}
    except psutil.NoSuchProcess:
        return set()


def survivors(pids: set[int], grace: float = 3.0) -> list[str]:
    """Which of `pids` still run (not zombies) after `grace` seconds, as 'pid: command' lines."""
    import time

    import psutil

    time.sleep(grace)
    alive = []
    for pid in pids:
        try:
            p = psutil.Process(pid)
            if p.status() != psutil.STATUS_ZOMBIE:
                alive.append(f"{pid}: {' '.join(p.cmdline())[:120]}")
        except psutil.NoSuchProcess:
            pass
    return alive


def assert_user_error(r: subprocess.CompletedProcess, *names: str, code: int = 2) -> str:
    """A user mistake: exit `code`, exactly one line on stderr (`pkm: error: ...`) naming each of
    `names` (a key, file or path), and no traceback anywhere. Returns the line."""
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == code, f"exit {r.returncode}, expected {code}\nstderr:\n{r.stderr[-3000:]}"
    assert "Traceback" not in r.stderr + r.stdout, r.stderr[-3000:]
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{r.stderr[-3000:]}"
    assert lines[0].startswith("pkm: error: "), lines[0]
    for name in names:
        assert str(name) in lines[0], f"{name!r} not named in: {lines[0]}"
    return lines[0]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(script: Path | str, *args, nproc: int = 2, timeout: int = 900) -> subprocess.CompletedProcess:
    """`python -m torch.distributed.run` of `script` with `nproc` local ranks on a free port, from this
    checkout with its code importable (one OpenMP thread a rank: the CPU is shared)."""
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        str(nproc),
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(free_port()),
        str(script),
        *map(str, args),
    ]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def losses(run_dir: Path) -> dict[int, float]:
    """step -> lm loss from the run's metrics.jsonl; a step logged twice (re-run after a restart) keeps
    its last value."""
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "lm loss" in rec:
            out[rec["step"]] = rec["lm loss"]
    return out


def scramble(model, seed: int):
    """Every parameter of `model` set to seeded noise far from any initialisation (norm gains near 1, the
    rest ~0.15), so a weight loaded into the wrong place shows in the logits. Returns it in eval mode."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            is_gain = name.endswith("weight") and any(k in name.lower() for k in ("norm", "ln_"))
            p.copy_(1.0 + 0.3 * noise if is_gain else 0.15 * noise)
    return model.eval()


@contextlib.contextmanager
def small_tmpfs(directory: Path, size: str):
    """`directory` (created here) as a tmpfs of `size` (mount's syntax: "64k", "4m") for disk-full tests;
    skips the test where it cannot be mounted (needs root). Unmounted on the way out."""
    directory.mkdir()
    if subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(directory)], capture_output=True
    ).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        yield directory
    finally:
        subprocess.run(["umount", str(directory)], check=True)


@pytest.fixture(scope="session")
def megatron_single_process():
    """A gloo world of one process with megatron-core's parallel state initialised (TP = PP = 1), so
    megatron-core GPT/BERT models can be built in the test process. The process group is kept at
    teardown (other fixtures may reuse it); the model-parallel state is destroyed if we created it."""
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from model import cpu_shim

    if not dist.is_initialized():
        dist.init_process_group("gloo", world_size=1, rank=0, init_method=f"tcp://127.0.0.1:{free_port()}")
    cpu_shim.apply()
    created = not parallel_state.model_parallel_is_initialized()
    if created:
        parallel_state.initialize_model_parallel(1)
    model_parallel_cuda_manual_seed(0)
    yield
    if created:
        parallel_state.destroy_model_parallel()


def torchrun_train(
    worker: Path, config: str, run_dir: Path, *overrides: str, nproc: int
) -> subprocess.CompletedProcess:
    """`torchrun` of a training worker script on configs/`config`, writing `run_dir`, its dataset cache
    beside it (shared by the runs of one test)."""
    cache = f"data.cache_dir={run_dir.parent / 'cache'}"
    return torchrun(worker, ROOT / "configs" / config, f"run_dir={run_dir}", cache, *overrides, nproc=nproc)


def tiny_hf_models(root: Path, layers: int, bert_class, gpt2: dict, llama: dict) -> dict:
    """{"gpt2", "llama", "bert": transformers model}: 64 wide, 4 heads, 8192 words, `layers` layers; Llama
    with 2 key/value heads and an untied output layer. Each scrambled (seeds 0, 1, 2 in that order; GPT-2's
    and BERT's output tied to the input embedding again after) and saved in root/<name>. `gpt2` and `llama`
    override their configs; `bert_class` is BertForPreTraining or BertForMaskedLM."""
    from transformers import BertConfig, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    sizes = dict(vocab_size=8192, hidden_size=64, num_hidden_layers=layers, num_attention_heads=4)
    gpt2_config = GPT2Config(
        **{"vocab_size": 8192, "n_positions": 64, "n_embd": 64, "n_layer": layers, "n_head": 4, **gpt2}
    )
    models = {
        "gpt2": GPT2LMHeadModel(gpt2_config),
        "llama": LlamaForCausalLM(LlamaConfig(**sizes, num_key_value_heads=2, tie_word_embeddings=False, **llama)),
        "bert": bert_class(BertConfig(**sizes, intermediate_size=128, max_position_embeddings=64)),
    }
    for seed, (name, model) in enumerate(models.items()):
        scramble(model, seed)
        if name != "llama":
            model.tie_weights()
        model.save_pretrained(root / name)
    return models
