"""The Trainer: a megatron-core GPT/BERT with PKM layers, a DeepSpeed engine for the dense weights,
a lazy sparse Adam beside it for the value tables, TensorBoard metrics and atomic checkpoints.

Read top to bottom: set-up (distributed, tokenizer, model, data, engine), then `train()`.
The Trainer is Stateful: `state_dict()` is what a checkpoint holds besides the tensors.
"""

from __future__ import annotations

import importlib
import logging
import math
import random
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import deepspeed
import numpy as np
import torch
import torch.distributed as dist
import yaml
from megatron.core import parallel_state as ps
from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

from data_pipeline.samplers import GlobalBatchSampler, build_datasets, collate
from data_pipeline.tokenizer import load_tokenizer
from model.build import build_model, lm_forward
from model.hf.init_from import load_pretrained_into
from model.precision import check_policy
from model.specs import memory_layers
from pretrain.checkpoint import Checkpointer, DenseOptimizer, TrainingState, load_model_weights
from pretrain.config import RunConfig, to_dict
from pretrain.distributed import MegatronMPU, init_distributed, shutdown
from pretrain.errors import PretrainError
from pretrain.log import close_logging, quiet_third_party, setup_logging
from pretrain.metrics import MetricsWriter, PKMUsage, step_line, step_scalars
from pretrain.optim import SparseValueOptimizer, dense_param_groups, lr_lambda, value_optimizer_bytes
from pretrain.resolve import ResolvedRun, resolve_run

log = logging.getLogger("pkm.train")

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: checkpoint saved on SIGUSR1/SIGTERM; requeue and resume


@dataclass
class StepResult:
    loss: float  # mean over the global batch's tokens
    tokens: int  # loss tokens in the global batch
    grad_norm: float | None
    updated_rows: list[torch.Tensor]  # per PKM layer, the value rows this step updated


@dataclass
class TrainResult:
    exit_code: int  # 0, or PREEMPTED_EXIT_CODE after a preemption save
    step: int
    steps_run: int  # by this invocation (0 for a run that had already finished)
    first_loss: float | None  # of this invocation
    final_loss: float | None
    usage: dict = field(default_factory=dict)
    checkpoint: Path | None = None
    run_dir: Path | None = None
    is_main: bool = True  # rank 0 (the one that reports)


class Trainer:
    def __init__(self, run: RunConfig | ResolvedRun):
        """Build everything from the resolved run (a RunConfig is resolved first: pretrain.resolve)."""
        quiet_third_party()
        run = run if isinstance(run, ResolvedRun) else resolve_run(run)
        self.cfg = cfg = run.cfg
        self.run_dir = Path(cfg.run_dir)
        self.env = init_distributed(cfg.parallel)
        env = self.env
        if env.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        dist.barrier()
        setup_logging(self.run_dir / "logs" / "train.log", env.rank)
        log.info(
            "world %d = TP %d x DP %d, device %s, PKM memory-parallel '%s' over %d ranks",
            env.world_size,
            env.tp_size,
            env.dp_size,
            env.device,
            cfg.parallel.memory_parallel,
            env.memory_parallel.size,
        )
        t = cfg.train
        if env.device.type == "cpu" and t.cpu_keep_freed_memory:
            from pretrain.cpu_alloc import keep_freed_memory

            log.info(
                "malloc: %s",
                "keeping freed memory for reuse (train.cpu_keep_freed_memory)"
                if keep_freed_memory()
                else "not glibc, train.cpu_keep_freed_memory has no effect",
            )
        per_step = t.micro_batch_size * env.dp_size
        if t.global_batch_size % per_step:
            raise PretrainError(
                f"train.global_batch_size={t.global_batch_size} is not a multiple of "
                f"micro_batch_size x data-parallel size = {t.micro_batch_size} x {env.dp_size}"
            )
        self.grad_accum = t.global_batch_size // per_step
        self.bf16 = t.precision == "bf16" or (t.precision == "auto" and torch.cuda.is_available())
        self._seed(t.seed)
        self._build_tokenizer_and_model(run)
        self._build_data()
        self._build_engine()
        self.step = 0  # optimizer steps taken (the step a checkpoint is named after)
        self.last_loss: float | None = None
        self.last_eval_loss: float | None = None
        self.usage = PKMUsage(self.pkm_layers, env.stats_group)
        self._preempt = False
        states = TrainingState(
            self.model, DenseOptimizer(self.optimizer, t.zero_stage), self.value_optimizer, self.pkm_layers, loop=self
        )
        self.checkpointer = Checkpointer(
            self.run_dir / "checkpoints",
            states,
            env,
            keep_last=cfg.checkpoint.keep_last,
            run_config=cfg,
            tokenizer=self.tokenizer,
            sizes=self.sizes,
        )
        self.checkpointer.maybe_resume(cfg.checkpoint.resume)
        if env.is_main:
            (self.run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))

    # -- set-up ---------------------------------------------------------------------------------

    def _seed(self, seed: int) -> None:
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        model_parallel_cuda_manual_seed(seed)

    def _build_tokenizer_and_model(self, run: ResolvedRun) -> None:
        cfg, env, init = self.cfg, self.env, run.init
        self.tokenizer = load_tokenizer(run.tokenizer)
        vocab = cfg.model.vocab_size or self.tokenizer.vocab_size
        if vocab < self.tokenizer.vocab_size:
            raise PretrainError(
                f"model.vocab_size={vocab} is smaller than the tokenizer's vocabulary "
                f"({self.tokenizer.vocab_size}, {self.tokenizer.identity['name']})"
            )
        self.vocab_size = int(math.ceil(vocab / env.tp_size) * env.tp_size)
        dtype = torch.bfloat16 if self.bf16 else torch.float32
        self.model = build_model(
            cfg.model,
            self.vocab_size,
            env.memory_parallel,
            seed=cfg.train.seed,
            stats_group=env.stats_group,
            params_dtype=dtype,
        )
        if init is not None and init.kind == "checkpoint":
            fresh = load_model_weights(self.model, init.path, skip_memory=True)
            log.info("initialised from our checkpoint %s; freshly initialised: %d PKM tensors", init.path, len(fresh))
        elif init is not None:
            report = load_pretrained_into(self.model, cfg.model, init.hf)
            log.info("initialised from %s: %s", init.path, report)
        self.model.to(env.device)
        self.pkm_layers = memory_layers(self.model)
        self._report_sizes()

    def _report_sizes(self) -> None:
        dense = sum(p.numel() * p.element_size() for p in self.model.parameters())
        values = sum(m.values.weight.numel() * m.values.weight.element_size() for _, m in self.pkm_layers)
        slots = sum(m.values.n_slots for _, m in self.pkm_layers)
        # Adam keeps two moments per weight (fp32); ZeRO splits the dense ones over DP.
        dense_opt = 2 * sum(p.numel() for p in self.model.parameters()) * 4
        if self.cfg.train.zero_stage >= 1:
            dense_opt //= self.env.dp_size
        value_opt = value_optimizer_bytes(self.cfg.model.pkm.value_optimizer, [m.values for _, m in self.pkm_layers])
        self.sizes = {
            "dense_param_bytes": dense,
            "value_shard_bytes": values,
            "dense_optimizer_bytes": dense_opt,
            "value_optimizer_bytes": value_opt,
        }
        log.info(
            "rank %d sizes: dense params %s, value shard %s (%d PKM layers, %d slots), "
            "dense optimizer %s, value optimizer %s",
            self.env.rank,
            _mb(dense),
            _mb(values),
            len(self.pkm_layers),
            slots,
            _mb(dense_opt),
            _mb(value_opt),
        )

    def _build_data(self) -> None:
        cfg, t = self.cfg, self.cfg.train
        evals = t.train_steps // t.eval_interval + 1 if t.eval_interval > 0 else 0
        num_samples = {
            "train": t.train_steps * t.global_batch_size,
            "valid": max(1, evals * t.eval_steps * t.global_batch_size),
            "test": max(1, t.eval_steps * t.global_batch_size),
        }
        cache = cfg.data.cache_dir or str(self.run_dir / "data_cache")
        self.train_ds, self.valid_ds, self.test_ds = build_datasets(
            cfg.data, cfg.model.family, cfg.model.seq_length, self.tokenizer, num_samples, t.seed, cache
        )
        self.sampler = GlobalBatchSampler(
            len(self.train_ds), t.global_batch_size, t.micro_batch_size, self.env.dp_rank, self.env.dp_size
        )

    def _build_engine(self) -> None:
        t = self.cfg.train
        groups = dense_param_groups(self.model, t.weight_decay)
        # foreach: one kernel per group, not per tensor (torch picks it only for CUDA); on CPU ~2.7x less time
        # per step for a 22M-weight BERT, and the same result bit for bit
        optimizer = torch.optim.AdamW(groups, lr=t.lr, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_eps, foreach=True)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(t))
        ds_config = {
            "train_batch_size": t.global_batch_size,
            "train_micro_batch_size_per_gpu": t.micro_batch_size,
            "gradient_accumulation_steps": self.grad_accum,
            "gradient_clipping": t.clip_grad,
            "zero_optimization": {"stage": t.zero_stage},
            "zero_allow_untested_optimizer": True,
            "bf16": {"enabled": self.bf16},
            "steps_per_print": 1 << 30,
            "wall_clock_breakdown": False,
        }
        _skip_shm_inference_op()
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=self.model,
            optimizer=optimizer,
            lr_scheduler=scheduler,
            config=ds_config,
            mpu=MegatronMPU(),
            dist_init_required=False,
        )
        for _, m in self.pkm_layers:  # DeepSpeed may re-create buffers when casting: keep them leaves
            m.values.weight.requires_grad_(True)
        check_policy(self.model)  # value tables and BatchNorm statistics stayed fp32 (model/precision.py)
        pkm = self.cfg.model.pkm
        self.value_optimizer = SparseValueOptimizer(
            [m.values for _, m in self.pkm_layers],
            lr=pkm.value_lr,
            betas=(t.adam_beta1, t.adam_beta2),
            eps=t.adam_eps,
            parallel=self.env.memory_parallel,
            kind=pkm.value_optimizer,
            seed=t.seed,
        )

    # -- state ----------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {
            "step": self.step,
            "sampler": self.sampler.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "config": to_dict(self.cfg),
            "tokenizer": self.tokenizer.identity,
            "vocab_size": self.vocab_size,
            # for model cards and summaries, not needed to continue:
            "last_loss": self.last_loss,
            "last_eval_loss": self.last_eval_loss,
            "tokens_seen": self.step * self.cfg.train.global_batch_size * self.cfg.model.seq_length,
            "usage": self.usage.last_summary,
            "usage_state": self.usage.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
        self.last_loss, self.last_eval_loss = state.get("last_loss"), state.get("last_eval_loss")
        self.sampler.load_state_dict(state["sampler"])
        if "usage_state" in state:  # checkpoints before the usage window was saved restart it
            self.usage.load_state_dict(state["usage_state"])
        self.scheduler.load_state_dict(state["scheduler"])
        for group, lr in zip(self.optimizer.param_groups, self.scheduler.get_last_lr()):
            group["lr"] = lr  # load_state_dict restores the schedule's position, not the optimizer's lr
        if state.get("tokenizer", {}).get("sha256") not in (None, self.tokenizer.identity["sha256"]):
            raise PretrainError(
                f"the checkpoint was trained with tokenizer {state['tokenizer']['name']} "
                f"(sha256 {state['tokenizer']['sha256'][:12]}), not {self.tokenizer.identity['name']}"
            )

    # -- training -------------------------------------------------------------------------------

    def _batches(self, ds, indices: list[int]) -> dict:
        batch = collate([ds[i] for i in indices])
        return {k: v.to(self.env.device) for k, v in batch.items()}

    def _global_sum(self, *values: float) -> list[float]:
        """Sums over the data-parallel group (TP ranks see the same tokens)."""
        return self.env.all_reduce_sum(values, ps.get_data_parallel_group())

    def train_step(self, micro_batches: list[list[int]]) -> StepResult:
        """One optimiser step over this rank's micro-batches. The loss is normalised by the token count
        of the whole global batch, so any TP/DP layout computes the same gradients."""
        family = self.cfg.model.family
        batches = [self._batches(self.train_ds, mb) for mb in micro_batches]
        (tokens,) = self._global_sum(sum(float(b["loss_mask"].sum()) for b in batches))
        scale = self.grad_accum * self.env.dp_size / max(tokens, 1.0)  # undone by the engine's 1/gas and DP mean
        loss_sum, grad_norm = 0.0, None
        for i, batch in enumerate(batches):
            per_token = lm_forward(self.engine, family, batch)
            summed = (per_token.float() * batch["loss_mask"]).sum()
            self.engine.backward(summed * scale)
            self.usage.observe()
            if i == len(batches) - 1 and self.cfg.train.zero_stage == 0:
                grad_norm = self._dense_grad_norm()  # ZeRO reports its own; stage 0 does not
            # DeepSpeed counts micro-batches: it only clips and steps the dense weights at the
            # accumulation boundary (the last micro-batch); before that this call is a no-op.
            self.engine.step()
            loss_sum += float(summed.detach())
        if self.cfg.train.zero_stage > 0:
            grad_norm = _float(self.engine.get_global_grad_norm())
        updated = self.value_optimizer.step()
        (loss_sum,) = self._global_sum(loss_sum)
        return StepResult(loss_sum / max(tokens, 1.0), int(tokens), grad_norm, updated)

    @torch.no_grad()
    def _dense_grad_norm(self) -> float:
        """L2 norm of the (DP-averaged) dense gradient: TP-split weights summed over the TP group,
        replicated ones counted once."""
        # summed where the gradients are (one host transfer at the end, not one per parameter)
        split = torch.zeros((), dtype=torch.float64, device=self.env.device)
        replicated = torch.zeros((), dtype=torch.float64, device=self.env.device)
        for p in self.model.parameters():
            if p.grad is not None:
                # a dot product in (at least) fp32: ~1e-6 relative, enough for a logged norm, and ~8x
                # less time than an fp64 copy of the gradient (replicated on every DP rank)
                g = p.grad.detach().reshape(-1)
                g = g.to(torch.promote_types(g.dtype, torch.float32))
                sq = torch.dot(g, g).double()
                if getattr(p, "tensor_model_parallel", False):
                    split += sq
                else:
                    replicated += sq
        (split_sum,) = self.env.all_reduce_sum([float(split)], ps.get_tensor_model_parallel_group())
        return math.sqrt(split_sum + float(replicated))

    @torch.no_grad()
    def evaluate(self, ds, steps: int, offset: int) -> float:
        self.engine.eval()
        for _, m in self.pkm_layers:
            m.record_lookups = False
        t = self.cfg.train
        total, tokens = 0.0, 0.0
        for s in range(steps):
            start = ((offset + s) * t.global_batch_size) % max(1, len(ds) - t.global_batch_size + 1)
            mine = list(range(start, start + t.global_batch_size))[self.env.dp_rank :: self.env.dp_size]
            for i in range(0, len(mine), t.micro_batch_size):
                batch = self._batches(ds, mine[i : i + t.micro_batch_size])
                per_token = lm_forward(self.engine, self.cfg.model.family, batch)
                total += float((per_token.float() * batch["loss_mask"]).sum())
                tokens += float(batch["loss_mask"].sum())
        for _, m in self.pkm_layers:
            m.record_lookups = True
        self.engine.train()
        total, tokens = self._global_sum(total, tokens)
        return total / max(tokens, 1.0)

    def _install_signal_handlers(self) -> dict:
        """Preemption handlers for the training loop; returns the ones they replace (train() puts them
        back: a process that trains in-process goes on without a handler pointing at a finished run)."""

        def handler(signum, frame):
            log.warning("received %s: will save a checkpoint and exit after this step", signal.Signals(signum).name)
            self._preempt = True

        return {sig: signal.signal(sig, handler) for sig in (signal.SIGUSR1, signal.SIGTERM)}

    def _preempt_requested(self) -> bool:
        (flag,) = self.env.all_reduce_max([1.0 if self._preempt else 0.0])
        return flag > 0

    def train(self) -> TrainResult:
        """Run to `train.train_steps`, then save. A run already at (or past) its last step is a no-op
        that says so: what a requeued or restarted job does after finishing."""
        if self.step >= self.cfg.train.train_steps:
            return self._already_finished()
        previous = self._install_signal_handlers()
        try:
            return self._train()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _train(self) -> TrainResult:
        cfg, t, lg = self.cfg, self.cfg.train, self.cfg.logging
        writer = MetricsWriter(self.run_dir, self.env.is_main, lg.tensorboard)
        self.engine.train()
        tokens_per_step = t.global_batch_size * cfg.model.seq_length
        bar = None
        if self.env.is_main and lg.progress:
            from tqdm import tqdm

            bar = tqdm(total=t.train_steps, initial=self.step, desc="pretrain", unit="step", dynamic_ncols=True)
        batches = iter(self.sampler)
        window_start, window_steps, first_loss, start_step = time.perf_counter(), 0, None, self.step
        exit_code = 0
        while self.step < t.train_steps:
            result = self.train_step(next(batches))
            self.step += 1
            self.usage.mark_updated(self.step, result.updated_rows)
            self.last_loss = result.loss
            window_steps += 1
            first_loss = result.loss if first_loss is None else first_loss
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{result.loss:.3f}", refresh=False)
            if self.step % lg.log_interval == 0 or self.step == t.train_steps:
                elapsed = time.perf_counter() - window_start
                scalars = step_scalars(
                    result.loss,
                    self.scheduler.get_last_lr()[0],
                    result.grad_norm,
                    window_steps * tokens_per_step,
                    window_steps,
                    elapsed,
                )
                scalars.update(self.usage.summary(self.step, lg.usage_window))
                writer.write(self.step, scalars)
                log.info(step_line(self.step, t.train_steps, scalars))
                if bar is not None:
                    bar.set_postfix(loss=f"{result.loss:.3f}", tok_s=f"{scalars['tokens per second']:.0f}")
                window_start, window_steps = time.perf_counter(), 0
            if t.eval_interval > 0 and (self.step % t.eval_interval == 0 or self.step == t.train_steps):
                vloss = self.evaluate(self.valid_ds, t.eval_steps, self.step // t.eval_interval)
                self.last_eval_loss = vloss
                writer.write(self.step, {"valid loss": vloss, "valid ppl": math.exp(min(vloss, 50))})
                log.info("step %d | valid loss %.4f | valid ppl %.2f", self.step, vloss, math.exp(min(vloss, 50)))
            save_now = self.cfg.checkpoint.save_interval > 0 and self.step % self.cfg.checkpoint.save_interval == 0
            if self._preempt_requested():
                self.checkpointer.save(self.step)
                log.warning("preempted at step %d: checkpoint saved, exiting with %d", self.step, PREEMPTED_EXIT_CODE)
                exit_code = PREEMPTED_EXIT_CODE
                break
            if save_now and self.step < t.train_steps:
                self.checkpointer.save(self.step)
        if bar is not None:
            bar.close()
        saved = self.checkpointer.save(self.step) if exit_code == 0 else None
        writer.close()
        return TrainResult(
            exit_code,
            self.step,
            self.step - start_step,
            first_loss,
            self.last_loss,
            self.usage.last_summary,
            saved,
            self.run_dir,
            self.env.is_main,
        )

    def _already_finished(self) -> TrainResult:
        t = self.cfg.train
        latest = self.checkpointer.latest()
        if latest is None or latest.name != self.checkpointer.name(self.step):
            latest = self.checkpointer.save(self.step)  # e.g. train.train_steps=0: the initial weights
        log.info(
            "nothing to train: the run is at step %d and train.train_steps=%d (checkpoint %s)",
            self.step,
            t.train_steps,
            latest,
        )
        return TrainResult(
            0, self.step, 0, None, self.last_loss, self.usage.last_summary, latest, self.run_dir, self.env.is_main
        )


def pretrain(cfg: RunConfig | ResolvedRun) -> TrainResult:
    """`pkm pretrain` as a function: resolve the run, build it, train to `train.train_steps`, shut the
    process group down (what this run started of it) and close the run's log."""
    try:
        return Trainer(cfg).train()
    finally:
        shutdown()
        close_logging()  # a process that runs more (tests, benchmarks) logs nothing more into this run's log


def _float(x) -> float | None:
    if x is None:
        return None
    return float(x.item() if torch.is_tensor(x) else x)


def _mb(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def _skip_shm_inference_op() -> None:
    """DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce when it starts (ninja: ~50 s of two
    cores, again in every new environment) that only DeepSpeed inference's `inference_all_reduce` uses,
    and that falls back to torch.distributed's all-reduce without it. Training never calls it: no build.
    With CUDA, DeepSpeed has no such op to build."""
    if not torch.cuda.is_available():
        # not `import deepspeed.comm.torch as ...`: that name is the torch module deepspeed.comm imports
        ds_backend = importlib.import_module("deepspeed.comm.torch")
        ds_backend.build_shm_op = lambda: None
