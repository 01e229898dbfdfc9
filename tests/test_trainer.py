"""The training spine through its real entry point (`pkm pretrain`): DeepSpeed engine, megatron-core
GPT/BERT with PKM, TensorBoard metrics, checkpoints, exact resume, row-sparse value updates."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.conftest import TINY_BERT, TINY_GPT, losses, run_pkm

# First-step loss of configs/tiny_gpt.yaml (seed 1234, bundled Austen corpus and tokenizer); a change
# here means the model, its initialisation or the data changed. Tolerance: 1e-4 (BLAS variation).
GOLDEN_FIRST_LOSS_GPT = 9.0306363  # value tables drawn per (4096-row block, column) stream since issue #17


def pretrain_gpt(run: Path, *args: str, cache: Path | None = None):
    """`pkm pretrain` of configs/tiny_gpt.yaml into `run`; `cache`: a tokenized-data cache to reuse."""
    cache_dir = [f"data.cache_dir={cache}"] if cache is not None else []
    return run_pkm("pretrain", "--config", str(TINY_GPT), f"run_dir={run}", *args, *cache_dir)


@pytest.fixture(scope="module")
def gpt_run(tmp_path_factory) -> Path:
    """20 steps of the tiny PKM-GPT, checkpoints at 10 and 20 (shared by several tests)."""
    run = tmp_path_factory.mktemp("gpt") / "run"
    r = pretrain_gpt(run, "checkpoint.save_interval=10", "checkpoint.keep_last=3", cache=run.parent / "cache")
    assert r.returncode == 0, r.stderr[-3000:]
    run.joinpath("stdout.txt").write_text(r.stdout)
    return run


def test_gpt_trains_and_reports(gpt_run: Path):
    by_step = losses(gpt_run)
    assert sorted(by_step) == list(range(1, 21))
    assert by_step[20] < by_step[1] - 0.5, f"loss did not fall: {by_step[1]:.3f} -> {by_step[20]:.3f}"
    if GOLDEN_FIRST_LOSS_GPT is not None:
        assert abs(by_step[1] - GOLDEN_FIRST_LOSS_GPT) < 1e-4
    out = (gpt_run / "stdout.txt").read_text()
    assert "pretraining finished: 20 steps" in out and "slots read %" in out


def test_tensorboard_scalars(gpt_run: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(gpt_run / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for tag in (
        "lm loss",
        "learning rate",
        "grad norm",
        "tokens per second",
        "iteration time",
        "pkm/layer1/slots read %",
        "pkm/layer1/top-1 slots read %",
        "pkm/layer1/kl to uniform",
        "pkm/layer1/slots updated in last 10 steps %",
    ):
        assert tag in tags, f"missing TensorBoard scalar {tag!r}; have {sorted(tags)}"
    assert len(acc.Scalars("lm loss")) == 20
    lrs = [e.value for e in acc.Scalars("learning rate")]
    assert lrs[1] == pytest.approx(1e-3) and lrs[-1] == pytest.approx(1e-4)  # warmup, then cosine to min_lr


def test_checkpoints_published_atomically(gpt_run: Path):
    from pretrain.checkpoint import list_checkpoints, verify

    root = gpt_run / "checkpoints"
    assert (root / "latest").read_text().strip() == "step_0000020"
    assert [p.name for p in list_checkpoints(root)] == ["step_0000020", "step_0000010"]
    assert not list(root.glob(".tmp-*"))
    manifest = verify(root / "step_0000020")
    assert manifest["step"] == 20 and manifest["files"]
    assert (root / "step_0000020" / "tokenizer" / "austen_gpt.model").is_file()
    assert (root / "step_0000020" / "config.yaml").is_file()


def test_exact_resume(gpt_run: Path, tmp_path: Path):
    """10 steps + resume + 10 steps gives the same per-step losses as 20 straight (CPU, fp32)."""
    import shutil

    run = tmp_path / "resumed"
    shutil.copytree(gpt_run / "checkpoints" / "step_0000010", run / "checkpoints" / "step_0000010")
    r = pretrain_gpt(run, "checkpoint.resume=auto", cache=gpt_run.parent / "cache")
    assert r.returncode == 0, r.stderr[-3000:]
    straight, resumed = losses(gpt_run), losses(run)
    assert sorted(resumed) == list(range(11, 21))
    for step in range(11, 21):
        assert resumed[step] == straight[step], f"step {step}: {resumed[step]} != {straight[step]}"


def test_corrupt_checkpoint_falls_back(gpt_run: Path, tmp_path: Path):
    import shutil

    run = tmp_path / "corrupt"
    shutil.copytree(gpt_run / "checkpoints", run / "checkpoints")
    victim = max((run / "checkpoints" / "step_0000020").rglob("*.distcp"), key=lambda p: p.stat().st_size)
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    # An explicit path to the bad checkpoint: a one-line error naming the file.
    r = pretrain_gpt(run, f"checkpoint.resume={run / 'checkpoints' / 'step_0000020'}", "train.train_steps=21")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert victim.name in r.stderr and "truncated" in r.stderr
    # resume=auto: warns and continues from the previous good checkpoint (step 10).
    r = pretrain_gpt(run, "checkpoint.resume=auto", "train.train_steps=12", cache=gpt_run.parent / "cache")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "falling back to the previous one" in r.stderr
    assert losses(run)[11] == losses(gpt_run)[11]


def test_config_errors_are_one_line(tmp_path: Path):
    r = run_pkm("pretrain", "--config", str(TINY_GPT), "model.pkm.nkeys=16")
    assert r.returncode == 2
    assert r.stderr.strip() == "pkm: error: unknown config key 'model.pkm.nkeys'; did you mean 'n_keys'?"
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  pkm:\n    layers: [7]\n")
    r = run_pkm("pretrain", "--config", str(bad))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "model.pkm.layers: layer 7 does not exist" in r.stderr


def test_bert_trains(tmp_path: Path):
    run = tmp_path / "bert"
    r = run_pkm("pretrain", "--config", str(TINY_BERT), f"run_dir={run}")
    assert r.returncode == 0, r.stderr[-3000:]
    by_step = losses(run)
    assert by_step[max(by_step)] < by_step[1] - 0.3, by_step


def test_first_run_compiles_no_deepspeed_op(tmp_path: Path):
    """DeepSpeed's CPU backend used to JIT-compile its shared-memory inference all-reduce at start-up
    (~50 s of ninja on two cores, in every new environment): a run in an empty extensions directory
    builds nothing there."""
    extensions = tmp_path / "torch_extensions"
    extensions.mkdir()
    r = run_pkm(
        "pretrain",
        "--config",
        str(TINY_BERT),
        f"run_dir={tmp_path / 'run'}",
        "train.train_steps=1",
        env={"TORCH_EXTENSIONS_DIR": str(extensions)},
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert list(extensions.iterdir()) == [], "a native op was compiled"


def test_value_updates_are_row_sparse(megatron_single_process, tmp_path: Path):
    """One real training step: only the value rows that were read change, the lazy-Adam moments of
    every other row stay as they were, no dense table gradient exists, and the DeepSpeed optimizer
    never sees the value tables."""
    from pretrain.config import load_config
    from pretrain.trainer import Trainer

    cfg = load_config(
        TINY_GPT,
        [f"run_dir={tmp_path / 'run'}", "train.train_steps=3", "logging.tensorboard=false", "model.pkm.n_keys=64"],
    )
    tr = Trainer(cfg)
    ((name, mem),) = tr.pkm_layers
    table = mem.values.weight
    in_engine = {id(p) for g in tr.optimizer.param_groups for p in g["params"]}
    assert id(table) not in in_engine and table not in set(tr.model.parameters())
    from pretrain.metrics import PKMUsage

    tr.usage = PKMUsage(tr.pkm_layers)
    batches = iter(tr.sampler)
    tr.train_step(next(batches))  # step 1 creates the lazy-Adam state
    before = table.detach().clone()
    state = tr.value_optimizer.optimizer.state[table]
    m_before, v_before = state["exp_avg"].clone(), state["exp_avg_sq"].clone()
    reads_before = tr.usage.reads[0].clone()
    grads = []
    hook = table.register_hook(lambda g: grads.append(g))
    tr.train_step(next(batches))
    hook.remove()
    read = (tr.usage.reads[0] - reads_before) > 0
    changed = (table.detach() != before).any(dim=1)
    assert changed.any()
    assert not (changed & ~read).any(), "a row that was not read changed"
    assert torch.equal(state["exp_avg"][~read], m_before[~read])
    assert torch.equal(state["exp_avg_sq"][~read], v_before[~read])
    assert grads and all(g.is_sparse for g in grads), "the value table got a dense gradient"
    assert all(g._nnz() <= 2 * 4 * 64 * mem.cfg.heads * mem.cfg.knn for g in grads)


def test_init_from_memory_free_run_and_consolidate(gpt_run: Path, tmp_path: Path):
    """Kim & Jung's recipe with our own weights: a memory-free run's checkpoint initialises a model
    with fresh PKM (`--init-from`); `load_consolidated` gathers any checkpoint into full tensors."""
    base = tmp_path / "dense"
    r = pretrain_gpt(base, "model.pkm.layers=[]", "train.train_steps=3", cache=gpt_run.parent / "cache")
    assert r.returncode == 0, r.stderr[-3000:]
    ckpt = base / "checkpoints" / "step_0000003"
    r = pretrain_gpt(
        tmp_path / "with_pkm", "train.train_steps=2", "--init-from", str(ckpt), cache=gpt_run.parent / "cache"
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "initialised from our checkpoint" in r.stdout
    # the memory-free run continued from its step-3 loss level, not from scratch
    assert losses(tmp_path / "with_pkm")[1] < losses(base)[1] - 0.05
    # a missing weight is a clear error: a 3-layer model cannot come from a 2-layer checkpoint
    r = pretrain_gpt(tmp_path / "bad", "model.num_layers=3", "--init-from", str(ckpt))
    assert r.returncode == 2 and "lacks" in r.stderr and "Traceback" not in r.stderr


def test_load_consolidated(megatron_single_process, gpt_run: Path):
    from pretrain.checkpoint import load_consolidated

    sd, cfg, info = load_consolidated(gpt_run / "checkpoints")
    table = sd["decoder.layers.1.mlp.memory.values.weight"]
    assert table.shape == (cfg.model.pkm.n_keys**2, cfg.model.hidden_size)
    assert info["step"] == 20 and info["final_loss"] == pytest.approx(losses(gpt_run)[20])
