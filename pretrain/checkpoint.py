"""Checkpoints: one format (megatron-core dist_checkpointing, torch_dist), atomic publish, verified load.

Layout of `run_dir/checkpoints/`:
  step_0000100/            dist_checkpointing shards (model, dense Adam moments, value tables and their
                           value-optimizer state, each by its logical layout, so any TP/DP layout reloads it),
                           common state (trainer, scheduler, sampler), rng/rank_K.pt, config.yaml,
                           tokenizer/, manifest.json (sizes + sha256 of every file; written last)
  latest                   the directory name of the newest published checkpoint
A checkpoint is written under `.tmp-step_…`, published by a rename, and `latest` is replaced last.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import yaml
from torch.distributed.checkpoint.api import CheckpointException

from model.config import ARCH_FIELDS, PKM_ARCH_FIELDS
from pretrain.errors import PretrainError

log = logging.getLogger("pkm.checkpoint")
MANIFEST = "manifest.json"
FORMAT = "pkm-dist-ckpt-1"
LATEST = "latest"


class CheckpointError(PretrainError):
    pass


# ---------------------------------------------------------------------------------------------
# Files: manifest, verification, discovery


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_manifest(ckpt: Path, info: dict) -> None:
    files = {}
    for p in sorted(ckpt.rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            files[str(p.relative_to(ckpt))] = {"bytes": p.stat().st_size, "sha256": _sha256(p)}
    tmp = ckpt / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps({"format": FORMAT, **info, "files": files}, indent=1))
    os.replace(tmp, ckpt / MANIFEST)


def verify(ckpt: Path) -> dict:
    """The manifest of a complete, intact checkpoint; CheckpointError naming the first bad file."""
    mf = ckpt / MANIFEST
    if not mf.is_file():
        raise CheckpointError(f"{ckpt}: no {MANIFEST} (incomplete checkpoint)")
    try:
        manifest = json.loads(mf.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{mf}: corrupt manifest ({getattr(e, 'msg', e.reason)})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"{mf}: not the manifest of a `pkm pretrain` checkpoint (format {FORMAT} expected)")
    for rel, meta in manifest["files"].items():
        p = ckpt / rel
        if not p.is_file():
            raise CheckpointError(f"{p}: missing from checkpoint")
        if p.stat().st_size != meta["bytes"]:
            raise CheckpointError(f"{p}: truncated ({p.stat().st_size} of {meta['bytes']} bytes)")
        if _sha256(p) != meta["sha256"]:
            raise CheckpointError(f"{p}: checksum mismatch (corrupt file)")
    return manifest


_WHAT_TO_PASS = (
    "pass a checkpoint (RUN_DIR/checkpoints/step_XXXXXXX), a run's checkpoints/ directory or a run directory"
)


def is_native_checkpoint(path: str | Path) -> bool:
    """Whether `path` names a checkpoint of `pkm pretrain` (a step directory, a checkpoints/ root or a
    run directory), as opposed to a Hugging Face directory or anything else."""
    path = Path(path)
    return (
        path.is_dir()
        and not (path / "config.json").is_file()
        and (
            (path / MANIFEST).is_file()
            or (path / LATEST).is_file()
            or (path / "checkpoints").is_dir()
            or bool(list_checkpoints(path))
        )
    )


def resolve_checkpoint(path: str | Path) -> Path:
    """The checkpoint directory that `path` names: a step directory itself, a checkpoints/ root through
    its `latest` file, or a run directory through `checkpoints/latest`. A one-line CheckpointError
    saying what to pass otherwise. (Whether the checkpoint is intact is `verify`'s question.)"""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint directory ({_WHAT_TO_PASS})")
    if not path.is_dir():
        raise CheckpointError(f"{path}: a file, not a checkpoint directory ({_WHAT_TO_PASS})")
    if path.name.startswith(".tmp-step_"):
        raise CheckpointError(f"{path}: an unpublished checkpoint (its save was interrupted); {_WHAT_TO_PASS}")
    if (path / MANIFEST).is_file() or (path / "common.pt").is_file():
        return path
    if (path / "config.json").is_file():
        raise CheckpointError(
            f"{path}: a Hugging Face model directory, not a `pkm pretrain` checkpoint ({_WHAT_TO_PASS})"
        )
    for root in (path, path / "checkpoints"):
        latest = root / LATEST
        if latest.is_file():
            name = latest.read_text(errors="replace").strip()
            step = root / name
            if not name or "/" in name or not step.is_dir():
                raise CheckpointError(f"{latest}: names {name!r}, which is not a checkpoint directory in {root}")
            return step
        steps = list_checkpoints(root)
        if steps:
            raise CheckpointError(
                f"{root}: no `{LATEST}` file (no checkpoint was published there); "
                f"pass one of its checkpoints, e.g. {steps[0]}"
            )
        if root.name == "checkpoints" and root.is_dir():
            raise CheckpointError(f"{root}: no checkpoint saved there yet")
    raise CheckpointError(f"{path}: not a `pkm pretrain` checkpoint (no {MANIFEST}); {_WHAT_TO_PASS}")


def list_checkpoints(ckpt_root: Path) -> list[Path]:
    """Published checkpoints, newest first."""
    if not ckpt_root.is_dir():
        return []
    return sorted(
        (p for p in ckpt_root.iterdir() if p.is_dir() and p.name.startswith("step_")),
        key=lambda p: p.name,
        reverse=True,
    )


def find_resumable(ckpt_root: Path) -> Path | None:
    """`latest` if it verifies, else the newest checkpoint that does (with a warning for each bad one)."""
    candidates = list_checkpoints(ckpt_root)
    latest = ckpt_root / LATEST
    if latest.is_file():
        name = latest.read_text().strip()
        candidates.sort(key=lambda p: p.name != name)
    for c in candidates:
        try:
            verify(c)
            return c
        except CheckpointError as e:
            log.warning("skipping checkpoint: %s; falling back to the previous one", e)
    return None


# ---------------------------------------------------------------------------------------------
# The stateful parts a checkpoint holds


class DenseOptimizer:
    """The DeepSpeed engine's optimizer as a checkpoint sees it: per parameter, the fp32 master weight
    and the two Adam moments in full (TP-local) shape, whatever the ZeRO stage and precision."""

    def __init__(self, optimizer, zero_stage: int):
        self.optimizer, self.zero_stage = optimizer, zero_stage

    def link_state(self) -> None:
        """Make DeepSpeed's per-parameter views of ZeRO's flat Adam state valid for every param group.

        DeepSpeed links them once, after the first optimizer step of the *first* group, when a lazily
        initialised torch optimizer has no state yet for the other groups (and before any step at all,
        when we load). Create any missing state (zeros, step 0) and link again."""
        if self.zero_stage == 0:
            return
        zero = self.optimizer
        base = zero.optimizer
        for group in base.param_groups:
            for p in group["params"]:
                st = base.state[p]
                if "exp_avg" not in st:
                    st.update(step=torch.tensor(0.0), exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
        zero._hp_optimizer_states_linked = False
        zero._lazy_init_hp_params_optimizer_state()

    def _stage0_master(self, p: torch.nn.Parameter) -> torch.Tensor:
        """At ZeRO stage 0, DeepSpeed's bf16 wrapper keeps an fp32 master copy of each bf16 weight (its
        `fp32_groups`, parallel to `fp16_groups`), and the Adam state is keyed by that copy; else `p`."""
        opt = self.optimizer
        for low, high in zip(getattr(opt, "fp16_groups", ()), getattr(opt, "fp32_groups", ())):
            for a, b in zip(low, high):
                if a is p:
                    return b
        return p

    def master(self, p: torch.nn.Parameter) -> torch.Tensor | None:
        """The fp32 master weight of a bf16 parameter (None under ZeRO for a weight the optimizer does
        not hold)."""
        if self.zero_stage > 0:
            from deepspeed.utils import safe_get_full_fp32_param

            return safe_get_full_fp32_param(p)
        return self._stage0_master(p)

    def set_master(self, p: torch.nn.Parameter, value: torch.Tensor) -> None:
        if self.zero_stage > 0:
            from deepspeed.utils import safe_set_full_fp32_param

            safe_set_full_fp32_param(p, value.to(p.device))
        else:
            self._stage0_master(p).data.copy_(value)

    def moments(self, p: torch.nn.Parameter) -> dict[str, torch.Tensor]:
        if self.zero_stage > 0:
            from deepspeed.utils import safe_get_full_optimizer_state

            return {k: safe_get_full_optimizer_state(p, k) for k in ("exp_avg", "exp_avg_sq")}
        st = self.optimizer.state.get(self._stage0_master(p)) if hasattr(self.optimizer, "state") else None
        if not st:
            return {k: torch.zeros_like(p, dtype=torch.float32) for k in ("exp_avg", "exp_avg_sq")}
        return {k: st[k] for k in ("exp_avg", "exp_avg_sq")}

    def set_moments(self, p: torch.nn.Parameter, moments: dict[str, torch.Tensor], step: int) -> None:
        if self.zero_stage > 0:
            from deepspeed.utils import safe_set_full_optimizer_state

            for k, v in moments.items():
                safe_set_full_optimizer_state(p, v, k)
            return
        st = self.optimizer.state[self._stage0_master(p)]
        # DeepSpeed's bf16 wrapper creates its state with one zero-gradient step at start-up: keep that
        # offset (0 for a plain optimizer, whose state is still empty here)
        offset = float(st["step"]) if "step" in st else 0.0
        st["exp_avg"] = moments["exp_avg"].to(p.device).clone()
        st["exp_avg_sq"] = moments["exp_avg_sq"].to(p.device).clone()
        st["step"] = torch.tensor(float(step) + offset)

    def set_step(self, step: int) -> None:
        """ZeRO keeps one step count per flat group (set_moments sets stage 0's per parameter)."""
        if self.zero_stage == 0:
            return
        for st in self.optimizer.optimizer.state.values():
            if "step" in st:
                st["step"] = torch.tensor(float(step)) if torch.is_tensor(st["step"]) else step


@dataclass
class TrainingState:
    """Everything a checkpoint holds, handed to the Checkpointer explicitly (torchtitan's `states=`):
    the model (its own `sharded_state_dict`), the dense optimizer, the value optimizer with the PKM
    layers whose tables it steps, and the training loop's own state (step, sampler, scheduler, usage:
    `state_dict`/`load_state_dict`)."""

    model: torch.nn.Module
    dense_optimizer: DenseOptimizer
    value_optimizer: object  # pretrain.optim.SparseValueOptimizer
    pkm_layers: list  # (name, ProductKeyMemory) of the model, in order
    loop: object  # Stateful: the Trainer (`state_dict()["step"]` names the checkpoint)


def _low_precision(p: torch.Tensor) -> bool:
    return p.dtype in (torch.bfloat16, torch.float16)


def sharded_state(states: TrainingState, for_load: bool = False) -> dict:
    """The dist_checkpointing state dict of a training state (shapes and layout; data when saving)."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor
    from megatron.core.dist_checkpointing.optimizer import make_sharded_optimizer_tensor

    dense = states.dense_optimizer
    model_sd = states.model.sharded_state_dict(prefix="model.")
    by_param = {}
    for sh in model_sd.values():
        if isinstance(sh, ShardedTensor) or hasattr(sh, "data"):
            by_param[id(sh.data)] = sh
    loop_state = states.loop.state_dict()
    state = {"model": model_sd, "trainer": loop_state}
    optim = {}
    dense.link_state()
    for name, p in states.model.named_parameters():
        sh = by_param.get(id(p))
        if sh is None:
            raise CheckpointError(f"parameter {name} has no sharded checkpoint entry")
        moments = (
            {k: torch.zeros_like(p, dtype=torch.float32) for k in ("exp_avg", "exp_avg_sq")}
            if for_load
            else dense.moments(p)
        )
        for k, v in moments.items():
            optim[f"{k}.{name}"] = make_sharded_optimizer_tensor(sh, v.float(), f"optimizer.{k}")
    # The value optimizer's state is saved from, and loaded into, its own tensors (no copies).
    optim.update(
        states.value_optimizer.sharded_state_dict([(f"{n}.values", m.values) for n, m in states.pkm_layers], model_sd)
    )
    state["optimizer"] = optim
    # bf16 weights are saved (and loaded) as DeepSpeed's fp32 master copies: a resume is exact, and
    # the checkpoint does not depend on the precision it was trained in
    for key, sh in list(model_sd.items()):
        if isinstance(sh, ShardedTensor) and torch.is_tensor(sh.data) and _low_precision(sh.data):
            master = torch.zeros_like(sh.data, dtype=torch.float32) if for_load else dense.master(sh.data)
            master = sh.data if master is None else master  # a weight outside the optimizer has no master
            model_sd[key] = replace(sh, data=master.detach().float(), dtype=torch.float32)
    state.update(states.value_optimizer.common_state())
    state["dense_optimizer_step"] = loop_state["step"]
    return state


def _streaming_save_strategy():
    """megatron's torch_dist format, written by torch's own FileSystemWriter, which copies a view (a
    value table's row block) into its own storage one tensor at a time as it writes, in this process.
    megatron's default writer (built for async saves) clones every view up front (a second copy of
    every table shard and its moments on each rank), forks writer processes and starts a
    multiprocessing Manager for its results queue."""
    from megatron.core.dist_checkpointing.strategies.torch import (
        MCoreSavePlanner,
        TorchDistSaveShardedStrategy,
        _replace_state_dict_keys_with_sharded_keys,
        mcore_to_pyt_state_dict,
    )
    from torch.distributed import checkpoint as dcp

    class StreamingSave(TorchDistSaveShardedStrategy):
        def save(self, sharded_state_dict, checkpoint_dir) -> None:
            flat, _, _ = _replace_state_dict_keys_with_sharded_keys(sharded_state_dict, self.keep_only_main_replica)
            dcp.save(
                mcore_to_pyt_state_dict(flat, False),
                storage_writer=dcp.FileSystemWriter(str(checkpoint_dir), thread_count=1),
                planner=MCoreSavePlanner(
                    dedup_replicated_tensors=not self.keep_only_main_replica, flatten_state_dict=False
                ),
            )

    return StreamingSave("torch_dist", 1)


# ---------------------------------------------------------------------------------------------


class Checkpointer:
    """Saves and loads a TrainingState as `root/step_NNNNNNN` (atomic publish, manifest, `latest`).
    Besides the states it is handed what a checkpoint describes: the run's config (config.yaml), the
    tokenizer (copied in), the layout (`env`) and the sizes report (manifest)."""

    def __init__(self, root: Path, states: TrainingState, env, *, keep_last: int, run_config, tokenizer, sizes: dict):
        self.root, self.states, self.env = Path(root), states, env
        self.keep_last, self.run_config, self.tokenizer, self.sizes = keep_last, run_config, tokenizer, sizes

    @staticmethod
    def name(step: int) -> str:
        return f"step_{step:07d}"

    def latest(self) -> Path | None:
        """The published checkpoint `latest` names, or None."""
        pointer = self.root / "latest"
        if not pointer.is_file():
            return None
        path = self.root / pointer.read_text().strip()
        return path if path.is_dir() else None

    def save(self, step: int) -> Path:
        from megatron.core import dist_checkpointing

        from pretrain.config import to_dict

        env = self.env
        name = self.name(step)
        final, tmp = self.root / name, self.root / f".tmp-{name}"
        if env.is_main:
            self.root.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir()
        dist.barrier()
        try:
            state = sharded_state(self.states)
            dist_checkpointing.save(state, str(tmp), sharded_strategy=_streaming_save_strategy())
            if env.is_main:
                (tmp / "rng").mkdir(exist_ok=True)
            dist.barrier()
            torch.save(_rng_state(), tmp / "rng" / f"rank_{env.rank}.pt")
            dist.barrier()
            if env.is_main:
                cfg = self.run_config
                (tmp / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
                _copy_tokenizer(self.tokenizer, tmp / "tokenizer")
                info = {
                    "step": step,
                    "world_size": env.world_size,
                    "tp": env.tp_size,
                    "dp": env.dp_size,
                    "memory_parallel": cfg.parallel.memory_parallel,
                    "family": cfg.model.family,
                    "tokenizer": self.tokenizer.identity,
                    "sizes": self.sizes,
                }
                write_manifest(tmp, info)
        except (OSError, RuntimeError, CheckpointException) as e:
            # Disk full, quota, I/O errors (the checkpoint writer wraps them in RuntimeError or torch's
            # CheckpointException): nothing is published and the previous checkpoints stay as they were.
            # Under torchrun, this rank's exit makes the agent stop the others.
            free = shutil.disk_usage(self.root).free / 2**20
            if env.is_main:
                shutil.rmtree(tmp, ignore_errors=True)
            reason = e.strerror if isinstance(e, OSError) and e.strerror else _first_failure(e)
            raise CheckpointError(
                f"{final}: could not write the checkpoint ({reason}; {free:.0f} MiB free "
                "there); the previous checkpoints are intact"
            ) from None
        if env.is_main:
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            latest_tmp = self.root / "latest.tmp"
            latest_tmp.write_text(name + "\n")
            os.replace(latest_tmp, self.root / LATEST)
            self._prune()
            log.info("saved checkpoint %s", final)
        dist.barrier()
        return final

    def _prune(self) -> None:
        for old in list_checkpoints(self.root)[max(1, self.keep_last) :]:
            shutil.rmtree(old, ignore_errors=True)

    def maybe_resume(self, resume: str | None) -> Path | None:
        """`checkpoint.resume`: None (start fresh), "auto" (the newest good checkpoint under root, if
        any) or a checkpoint path. Loads it and returns its path."""
        if not resume:
            return None
        if resume == "auto":
            found = find_resumable(self.root) if self.env.is_main else None
            obj = [str(found) if found else None]
            dist.broadcast_object_list(obj, src=0)
            if obj[0] is None:
                log.info("checkpoint.resume=auto: no checkpoint in %s, starting fresh", self.root)
                return None
            path = Path(obj[0])
        else:
            path = resolve_checkpoint(resume)
            if self.env.is_main:
                verify(path)
            dist.barrier()
        self.load(path)
        return path

    def load(self, path: Path) -> None:
        from megatron.core import dist_checkpointing

        st = self.states
        dense, model = st.dense_optimizer, st.model
        common = dist_checkpointing.load_common_state_dict(str(path))
        if self.run_config is not None:
            check_same_model(common.get("trainer", {}).get("config", {}).get("model"), self.run_config.model, path)
        st.value_optimizer.check_checkpoint(common, path)
        template = sharded_state(st, for_load=True)
        loaded = dist_checkpointing.load(template, str(path))
        weights = _model_tensors(loaded["model"], model)
        model.load_state_dict(weights, strict=True)
        for name, p in model.named_parameters():
            # ZeRO 1/2 steps fp32 master partitions of every weight, fp32 ones included (cloned from the
            # initial weights when the engine was built: left alone, the first step after resume would
            # update those and copy them over the loaded model); the stage-0 bf16 wrapper, of bf16 ones.
            if dense.zero_stage > 0 or _low_precision(p):
                dense.set_master(p, weights[name])
        step = int(loaded["trainer"]["step"])
        for name, p in model.named_parameters():
            dense.set_moments(p, {k: loaded["optimizer"][f"{k}.{name}"] for k in ("exp_avg", "exp_avg_sq")}, step)
        dense.set_step(step)
        st.value_optimizer.load_sharded_state_dict(loaded)
        st.loop.load_state_dict(loaded["trainer"])
        rng = path / "rng" / f"rank_{self.env.rank}.pt"
        manifest = json.loads((path / MANIFEST).read_text())
        if rng.is_file() and manifest.get("world_size") == self.env.world_size:
            _set_rng_state(torch.load(rng, weights_only=False))
        log.info("resumed from %s at step %d", path, step)


# The model settings a checkpoint's tensors are laid out by: the architecture (model/config.py), the
# vocabulary, and "positions" for max_position_embeddings (_model_settings). Resumed with another value,
# the load fails deep in megatron, or worse succeeds while dropping weights (placement add -> replace loses
# the FFN). The others (knn, dropouts, value_dtype, ...) may change on resume: they are logged.
STRUCTURE_KEYS = (
    *(f for f in ARCH_FIELDS if f != "max_position_embeddings"),
    "vocab_size",
    "positions",
    *(f"pkm.{f}" for f in PKM_ARCH_FIELDS),
)


def check_same_model(saved: dict | None, model_cfg, path) -> None:
    """One-line error naming each structural `model.*` setting that differs from the checkpoint's at
    `path` (checkpoints without their config are not checked); a warning for the other changes.
    value_optimizer is the value optimizer's own check."""
    if not saved:
        return
    was, now = _model_settings(saved), _model_settings(asdict(model_cfg))
    changed = sorted(k for k in was.keys() | now.keys() if was.get(k) != now.get(k) and k != "pkm.value_optimizer")
    wrong = [k for k in changed if k in STRUCTURE_KEYS]
    if wrong:
        diffs = ", ".join(f"model.{k}={now.get(k)} (checkpoint: {was.get(k)})" for k in wrong)
        raise CheckpointError(
            f"{path}: cannot resume a different model: {diffs}; resume with the checkpoint's settings, or start "
            "a new run_dir with checkpoint.init_from to initialise from it"
        )
    for k in changed:
        log.warning("resuming with model.%s=%s (the checkpoint was trained with %s)", k, now.get(k), was.get(k))


def _model_settings(model: dict) -> dict:
    """A model config as flat keys ("pkm.n_keys"), with "positions": the learned position table's size."""
    flat = {k: v for k, v in model.items() if k != "pkm"}
    flat.update({f"pkm.{k}": v for k, v in (model.get("pkm") or {}).items()})
    if flat.get("position_embedding", "learned_absolute") == "learned_absolute":
        flat["positions"] = flat.get("max_position_embeddings") or flat.get("seq_length")
    for k in ("max_position_embeddings", "seq_length"):  # their effect on the tensors is "positions"
        flat.pop(k, None)
    return flat


def _model_tensors(loaded: dict, model: torch.nn.Module) -> dict:
    """A loaded "model." state dict as `model.load_state_dict` takes it. A value table arrives as the
    list of its row blocks, already read in place into the table itself: hand over the table."""
    out = {}
    for k, v in loaded.items():
        name = k[len("model.") :]
        if isinstance(v, list):
            out[name] = model.get_buffer(name)
        else:
            out[name] = v.data if hasattr(v, "data") and not torch.is_tensor(v) else v
    return out


def _is_meta(v) -> bool:
    return isinstance(v, list) and bool(v) and v[0].data is not None and v[0].data.is_meta


def _sharded_key(v) -> str | None:
    """The checkpoint key of a sharded state dict entry (a value table's is a list of row blocks)."""
    return getattr(v[0] if isinstance(v, list) and v else v, "key", None)


def _first_failure(e: BaseException) -> str:
    """The first worker failure inside a torch.distributed.checkpoint exception, as one line."""
    failures = getattr(e, "failures", None)
    if failures:
        e = next(iter(failures.values()))
        if isinstance(e, tuple):  # (exception, stack summary)
            e = e[0]
    lines = [ln for ln in str(e).splitlines() if ln.strip()]
    return lines[-1] if lines else type(e).__name__


def _copy_tokenizer(tok, dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    src = Path(tok.path)
    if src.is_dir():
        for f in tok.identity.get("files", []):
            shutil.copy2(src / f, dest / f)
    elif src.is_file():
        shutil.copy2(src, dest / src.name)


def checkpoint_tokenizer(ckpt: Path) -> str:
    """The tokenizer saved with a checkpoint: its HF directory, or its sentencepiece .model file."""
    tok = Path(ckpt) / "tokenizer"
    if not tok.is_dir():
        raise CheckpointError(f"{ckpt}: no tokenizer/ directory in the checkpoint")
    names = {p.name for p in tok.iterdir()}
    if names & {"tokenizer.json", "vocab.txt", "vocab.json", "tokenizer_config.json"}:
        return str(tok)
    models = sorted(n for n in names if n.endswith(".model"))
    if len(models) != 1:
        raise CheckpointError(f"{tok}: expected one sentencepiece .model or an HF tokenizer, found {sorted(names)}")
    return str(tok / models[0])


def _rng_state() -> dict:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "tracker": get_cuda_rng_tracker().get_states(),
    }


def _set_rng_state(state: dict) -> None:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    get_cuda_rng_tracker().set_states(state["tracker"])


# ---------------------------------------------------------------------------------------------
# Reading a checkpoint outside training: export, and initialising a new run from our own weights


def load_model_weights(model: torch.nn.Module, ckpt: Path, skip_memory: bool = False) -> list[str]:
    """Load the model weights of checkpoint `ckpt` into `model`, whatever layout either was saved or
    built with. `skip_memory`: leave the PKM layers as initialised (a memory-free run's weights into a
    model with fresh memory). Returns the state-dict keys that were not in the checkpoint."""
    from megatron.core import dist_checkpointing
    from torch.distributed.checkpoint import FileSystemReader

    template = model.sharded_state_dict(prefix="model.")
    saved = set(FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata)
    # Tables built without storage (shape_only_tables) are not read: their reader streams them.
    wanted = {
        k: v
        for k, v in template.items()
        if not (skip_memory and ".memory." in k) and _sharded_key(v) in saved and not _is_meta(v)
    }
    missing = sorted(k[len("model.") :] for k in template if k not in wanted)
    fresh_ok = [m for m in missing if ".memory." in m or m.endswith("_extra_state")]
    if len(fresh_ok) != len(missing):
        bad = [m for m in missing if m not in fresh_ok]
        raise CheckpointError(
            f"{ckpt}: the checkpoint lacks {len(bad)} weights of this model: "
            f"{', '.join(bad[:8])}{' ...' if len(bad) > 8 else ''}"
        )
    loaded = dist_checkpointing.load({"model": wanted}, str(ckpt))
    model.load_state_dict(_model_tensors(loaded["model"], model), strict=False)
    return missing


class CheckpointReader:
    """A checkpoint read outside training, in one process, whatever TP/DP layout saved it: the TP=1
    model without its value tables (`dense`), and each value table as a StreamedTensor that reads it
    block by block of rows (`tables`), so no whole table is ever in memory. Initialises a gloo world of
    one if needed, which close() (the end of a `with` block) ends again."""

    def __init__(self, ckpt_dir: str | Path):
        from model.build import build_model
        from model.pkm.value_table import shape_only_tables
        from pretrain.config import ParallelConfig, load_config
        from pretrain.distributed import init_distributed

        ckpt = resolve_checkpoint(ckpt_dir)
        manifest = verify(ckpt)
        self.path, self.cfg = ckpt, load_config(ckpt / "config.yaml")
        state = torch.load(ckpt / "common.pt", weights_only=False)["trainer"]
        env = init_distributed(ParallelConfig(tensor_parallel=1, memory_parallel="none"))
        try:
            if env.world_size != 1:
                raise CheckpointError("a checkpoint is read for export in a single process, not under torchrun")
            with shape_only_tables():
                model = build_model(self.cfg.model, state["vocab_size"], env.memory_parallel, seed=self.cfg.train.seed)
            load_model_weights(model, ckpt)
            sd = model.state_dict()
            sd = {k: v for k, v in sd.items() if torch.is_tensor(v) and not k.endswith("_extra_state")}
            self.dense = {k: v.detach() for k, v in sd.items() if not v.is_meta}
            sharded = model.sharded_state_dict(prefix="model.")
            self.tables = {k: self._streamed(sharded[f"model.{k}"][0].key, v) for k, v in sd.items() if v.is_meta}
            self.info = {
                **{k: v for k, v in manifest.items() if k != "files"},
                "vocab_size": state["vocab_size"],
                "final_loss": state.get("last_loss"),
                "final_eval_loss": state.get("last_eval_loss"),
                "tokens_seen": state.get("tokens_seen"),
                "usage": state.get("usage"),
            }
        except BaseException:  # the caller's `with` never starts: end the world of one here
            self.close()
            raise

    def _streamed(self, key: str, table: torch.Tensor):
        from model.hf.safetensors_stream import StreamedTensor
        from model.pkm.value_table import checkpoint_row_blocks

        n_slots, dim = table.shape

        def blocks():
            from megatron.core import dist_checkpointing
            from megatron.core.dist_checkpointing import ShardedTensor

            rows, count = checkpoint_row_blocks(n_slots, dim)
            for b in range(count):
                block = torch.empty(rows, dim, dtype=table.dtype)
                # One block of the whole table, not a cover of it: the access check must not apply.
                dist_checkpointing.load(
                    {"t": ShardedTensor.from_rank_offsets(key, block, (0, b, count))},
                    str(self.path),
                    validate_access_integrity=False,
                )
                yield block
                del block

        return StreamedTensor((n_slots, dim), table.dtype, blocks)

    def state_dict(self) -> dict:
        """Dense tensors and streamed value tables, as `model.hf.export.export_hf` takes them."""
        return {**self.dense, **self.tables}

    def close(self) -> None:
        from pretrain.distributed import shutdown

        shutdown()

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def load_consolidated(ckpt_dir: str | Path):
    """(full TP=1 state dict, RunConfig, info) of a checkpoint saved under any TP/DP layout, the value
    tables whole: for small models and tests (the export streams them: CheckpointReader)."""
    with CheckpointReader(ckpt_dir) as r:
        tables = {k: torch.cat(list(t.blocks())) for k, t in r.tables.items()}
        return {**r.dense, **tables}, r.cfg, r.info
