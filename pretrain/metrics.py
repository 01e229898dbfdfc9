"""Training metrics: one writer for TensorBoard, metrics.jsonl and the log; PKM usage statistics."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import torch
import torch.distributed as dist

from model.pkm.memory import ProductKeyMemory
from pretrain.distributed import all_reduce_tensor

log = logging.getLogger("pkm.train")


class PKMUsage:
    """Per PKM layer: which slots were read since the last summary (and with what softmax mass), and
    at which optimizer step each slot's value row was last updated (Kim & Jung 2020: trained from
    scratch, most rows go "outdated"). O(slots) counters per layer; `state_dict` goes into checkpoints
    so the window survives a resume."""

    NEVER = -(1 << 30)

    def __init__(self, layers: list[tuple[str, ProductKeyMemory]], dp_group=None):
        self.layers = layers
        self.dp_group = dp_group
        for _, m in layers:
            m.record_lookups = True
        self.reads = [torch.zeros(m.values.n_slots, dtype=torch.int64) for _, m in layers]
        self.mass = [torch.zeros(m.values.n_slots, dtype=torch.float64) for _, m in layers]
        # reads as the best (highest-weight) of a head's knn slots: Lample et al.'s "top-1 usage"
        self.top1 = [torch.zeros(m.values.n_slots, dtype=torch.int64) for _, m in layers]
        # the 1-based optimizer step of each row's last update
        self.last_update = [torch.full((m.values.n_slots,), self.NEVER, dtype=torch.int32) for _, m in layers]
        self.last_summary: dict[str, float] = {}

    @torch.no_grad()
    def observe(self) -> None:
        """Accumulate the lookups of the forward that just ran."""
        for i, (_, m) in enumerate(self.layers):
            lk = m.last_lookup
            if lk is None:
                continue
            idx, w = lk.indices, lk.weights
            if lk.keep is not None:
                idx, w = idx[lk.keep], w[lk.keep]
            best = idx.view(-1, m.cfg.knn).gather(1, w.view(-1, m.cfg.knn).argmax(1, keepdim=True))
            idx = idx.reshape(-1).cpu()
            n = self.reads[i].numel()
            self.top1[i] += torch.bincount(best.reshape(-1).cpu(), minlength=n)
            self.reads[i] += torch.bincount(idx, minlength=n)
            self.mass[i] += torch.bincount(idx, weights=w.reshape(-1).cpu().double(), minlength=n)
            m.last_lookup = None

    @torch.no_grad()
    def mark_updated(self, step: int, updated_rows: list[torch.Tensor]) -> None:
        """Rows updated by optimizer step `step` (1-based: the step count after the update)."""
        for i, rows in enumerate(updated_rows):
            if rows.numel():
                self.last_update[i][rows.cpu()] = step

    @torch.no_grad()
    def summary(self, step: int, window: int) -> dict[str, float]:
        """Metrics at optimizer step `step`: % of slots read, % read as a head's top-1 slot, and KL(usage ||
        uniform) of the softmax mass since the last summary (then reset), and % of rows updated at one of
        the last `window` steps (step - window + 1 .. step)."""
        out = {}
        for i, (name, _) in enumerate(self.layers):
            reads, mass, top1 = self.reads[i].clone(), self.mass[i].clone(), self.top1[i].clone()
            recent = (self.last_update[i] > step - window).to(torch.int32)
            if self.dp_group is not None:
                reads, mass, top1 = (all_reduce_tensor(t, "sum", self.dp_group) for t in (reads, mass, top1))
                recent = all_reduce_tensor(recent, "max", self.dp_group)
            n = reads.numel()
            total = mass.sum()
            if total > 0:
                p = mass / total
                nz = p > 0
                kl = float((p[nz] * torch.log(p[nz] * n)).sum())
            else:
                kl = float("nan")
            tag = f"pkm/{short_name(name)}"
            out[f"{tag}/slots read %"] = 100.0 * float((reads > 0).double().mean())
            out[f"{tag}/top-1 slots read %"] = 100.0 * float((top1 > 0).double().mean())
            out[f"{tag}/kl to uniform"] = kl
            out[f"{tag}/slots updated in last {window} steps %"] = 100.0 * float(recent.double().mean())
            self.reads[i].zero_()
            self.mass[i].zero_()
            self.top1[i].zero_()
        self.last_summary = out
        return out

    def state_dict(self) -> dict:
        """Counters for a checkpoint. Reads and mass are per rank (each reads its own tokens): the data-
        parallel ranks' counts are summed into rank 0's, since a checkpoint keeps rank 0's common state."""
        reads = [all_reduce_tensor(r, "sum", self.dp_group) for r in self.reads]
        mass = [all_reduce_tensor(m, "sum", self.dp_group) for m in self.mass]
        top1 = [all_reduce_tensor(t, "sum", self.dp_group) for t in self.top1]
        return {
            "reads": reads,
            "mass": mass,
            "top1": top1,
            "last_update": [t.clone() for t in self.last_update],
            "summary": dict(self.last_summary),
        }

    def load_state_dict(self, state: dict) -> None:
        sizes = [m.values.n_slots for _, m in self.layers]
        if [t.numel() for t in state["last_update"]] != sizes:
            log.warning("PKM usage counters in the checkpoint do not match this model's tables: restarting them")
            return
        main = self.dp_group is None or dist.get_rank(self.dp_group) == 0
        for i in range(len(self.layers)):
            self.last_update[i].copy_(state["last_update"][i])
            self.reads[i].copy_(state["reads"][i] if main else torch.zeros_like(self.reads[i]))
            self.mass[i].copy_(state["mass"][i] if main else torch.zeros_like(self.mass[i]))
            if "top1" in state:  # absent from checkpoints written before top-1 usage was counted
                self.top1[i].copy_(state["top1"][i] if main else torch.zeros_like(self.top1[i]))
        self.last_summary = dict(state.get("summary", {}))


def step_scalars(
    loss: float, lr: float, grad_norm: float | None, tokens: int, steps: int, elapsed: float
) -> dict[str, float]:
    """The scalars logged at a step: one name each (TensorBoard tags, metrics.jsonl keys)."""
    return {
        "lm loss": loss,
        "learning rate": lr,
        "grad norm": grad_norm,
        "tokens per second": tokens / max(elapsed, 1e-9),
        "iteration time": 1000.0 * elapsed / max(1, steps),
    }


def step_line(step: int, total: int, scalars: dict[str, float]) -> str:
    grad_norm = scalars["grad norm"]
    return (
        f"step {step}/{total} | loss {scalars['lm loss']:.4f} | lr {scalars['learning rate']:.3g} | "
        f"grad norm {'-' if grad_norm is None else f'{grad_norm:.3f}'} | "
        f"{scalars['tokens per second']:.0f} tok/s | {scalars['iteration time']:.0f} ms/step"
    )


def short_name(module_name: str) -> str:
    """'decoder.layers.2.mlp.memory' -> 'layer2'."""
    parts = module_name.split(".")
    if "layers" in parts:
        return f"layer{parts[parts.index('layers') + 1]}"
    return module_name


class MetricsWriter:
    """TensorBoard scalars + one JSON line per logged step + a log line (rank 0 only)."""

    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool = True):
        self.enabled = enabled
        self.tb = None
        self.jsonl = None
        if not enabled:
            return
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        self.jsonl = open(run_dir / "metrics.jsonl", "a")

    def write(self, step: int, scalars: dict[str, float]) -> None:
        if not self.enabled:
            return
        if self.tb is not None:
            for k, v in scalars.items():
                if v is not None and not (isinstance(v, float) and math.isnan(v)):
                    self.tb.add_scalar(k, v, step)
        self.jsonl.write(json.dumps({"step": step, **{k: _round(v) for k, v in scalars.items()}}) + "\n")
        self.jsonl.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.flush()
            self.tb.close()
        if self.jsonl is not None:
            self.jsonl.close()


def _round(v):
    return float(f"{v:.8g}") if isinstance(v, float) else v
