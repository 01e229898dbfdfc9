"""Training metrics: one writer for TensorBoard, metrics.jsonl and the log; PKM usage statistics."""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Optional

import torch

from model.pkm.memory import ProductKeyMemory
from pretrain.distributed import all_reduce_tensor

log = logging.getLogger("pkm.train")


class PKMUsage:
    """Per PKM layer: which slots were read in the logging window (and with what softmax mass), and
    when each slot's value row was last updated (Kim & Jung: most rows go 'outdated' from scratch)."""

    def __init__(self, layers: list[tuple[str, ProductKeyMemory]], dp_group=None):
        self.layers = layers
        self.dp_group = dp_group
        for _, m in layers:
            m.record_lookups = True
        self.reads = [torch.zeros(m.values.n_slots) for _, m in layers]
        self.mass = [torch.zeros(m.values.n_slots) for _, m in layers]
        self.last_update = [torch.full((m.values.n_slots,), -(1 << 30), dtype=torch.long) for _, m in layers]
        self.last_summary: dict[str, float] = {}

    @torch.no_grad()
    def observe(self) -> None:
        """Accumulate the lookups of the forward that just ran."""
        for i, (_, m) in enumerate(self.layers):
            lk = m.last_lookup
            if lk is None:
                continue
            idx, w = lk.indices, lk.weights.float()
            if lk.keep is not None:
                idx, w = idx[lk.keep], w[lk.keep]
            idx = idx.reshape(-1).cpu()
            n = self.reads[i].numel()
            self.reads[i] += torch.bincount(idx, minlength=n).float()
            self.mass[i] += torch.bincount(idx, weights=w.reshape(-1).cpu(), minlength=n)
            m.last_lookup = None

    @torch.no_grad()
    def mark_updated(self, step: int, updated_rows: list[torch.Tensor]) -> None:
        for i, rows in enumerate(updated_rows):
            if rows.numel():
                self.last_update[i][rows.cpu()] = step

    @torch.no_grad()
    def summary(self, step: int, window: int) -> dict[str, float]:
        """Metrics over the window since the last summary (then reset): % slots read, KL(usage ||
        uniform) of the softmax mass, and % of rows updated within the last `window` steps."""
        out = {}
        for i, (name, _) in enumerate(self.layers):
            reads, mass = self.reads[i].clone(), self.mass[i].clone()
            recent = (self.last_update[i] > step - window).float()
            if self.dp_group is not None:
                reads, mass = (all_reduce_tensor(t, "sum", self.dp_group) for t in (reads, mass))
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
            out[f"{tag}/slots read %"] = 100.0 * float((reads > 0).float().mean())
            out[f"{tag}/kl to uniform"] = kl
            out[f"{tag}/slots updated in last {window} steps %"] = 100.0 * float(recent.mean())
            self.reads[i].zero_()
            self.mass[i].zero_()
        self.last_summary = out
        return out


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
