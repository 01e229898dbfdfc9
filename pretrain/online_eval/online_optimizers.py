"""Update rules for dynamic evaluation, for dense tensors and for row-sparse PKM value tables.

- sgd:   p -= lr * g
- adamw: AdamW (bias-corrected moments, decoupled weight decay); on value tables a lazy Adam that
         only touches the rows read (like torch.optim.SparseAdam; no weight decay there).
- rms:   Krause et al. (2018, 2019): p -= lr * g / (sqrt(MS) + eps), then a pull back to the initial
         weights p += min(1, lambda * RMS / mean(RMS)) * (p0 - p). MS is the mean squared gradient:
         fixed, from a calibration text (Krause: gradients on training data), or else a running,
         bias-corrected mean over the updates so far. Fixed statistics from a short calibration text
         are fragile: a weight that got almost no gradient there (the embedding row of a word the text
         never predicts) takes huge normalised steps later, so they want a small lr; the running
         mean (default) is robust. On value tables both steps touch only the rows
         read; the pull back owed to a row for the steps it was not read is applied when it next is
         (lazily: (1 - rate)^steps), so untouched rows cost nothing, and RMS is normalised by the
         table's calibration mean (or, online, by the mean over the rows read in the step).
Dense sgd/adamw use torch.optim's foreach implementations.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from pretrain.online_eval.config import OnlineEvalConfig
from pretrain.online_eval.trainable import Trainable


def _rows_of(grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(row ids, gradient rows) of a row-sparse gradient (COO, or dense with zero rows)."""
    if grad.is_sparse:
        g = grad.coalesce()
        return g.indices()[0], g.values()
    rows = grad.abs().sum(1).nonzero().squeeze(1)
    return rows, grad.index_select(0, rows)


class OnlineOptimizer:
    def __init__(
        self,
        trainables: Sequence[Trainable],
        initial: Sequence[torch.Tensor],
        cfg: OnlineEvalConfig,
        mean_square: Sequence[torch.Tensor] | None = None,
    ):
        self.cfg = cfg
        self.dense = [(t.tensor, p0) for t, p0 in zip(trainables, initial) if not t.rows]
        self.sparse = [(t.tensor, p0) for t, p0 in zip(trainables, initial) if t.rows]
        self.fixed_ms = None
        if mean_square is not None:  # calibration statistics, in the order of `trainables`
            self.fixed_ms = {id(t.tensor): ms for t, ms in zip(trainables, mean_square)}
        self.rows_updated = 0
        self.reset()

    def reset(self) -> None:
        """Forget all optimizer state (per-document reset). Value-table state is zeroed in place (it is
        as large as the table; allocating it again per document would cost more than zeroing)."""
        cfg = self.cfg
        params = [p for p, _ in self.dense]
        self._torch = None
        if params and cfg.optimizer == "sgd":
            self._torch = torch.optim.SGD(params, lr=cfg.lr, foreach=True)
        elif params and cfg.optimizer == "adamw":
            self._torch = torch.optim.AdamW(
                params, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay, foreach=True
            )
        self._ms = [torch.zeros_like(p) for p, _ in self.dense] if cfg.optimizer == "rms" else []
        self._steps = 0
        for st in getattr(self, "_row_state", {}).values():
            for v in st.values():
                if isinstance(v, torch.Tensor):
                    v.zero_()
            st.pop("mean_rms", None)
        if not hasattr(self, "_row_state"):
            self._row_state: dict[int, dict] = {}

    def zero_grad(self) -> None:
        for p, _ in self.dense + self.sparse:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        self._steps += 1
        if self._torch is not None:
            self._torch.step()
        elif self.cfg.optimizer == "rms" and self.dense:
            self._rms_dense()
        for p, p0 in self.sparse:
            if p.grad is not None:
                self._sparse_step(p, p0)

    # -- Krause's RMS rule, dense --------------------------------------------------------------
    def _mean_square(self, p: torch.Tensor, running: torch.Tensor) -> torch.Tensor:
        if self.fixed_ms is not None:
            return self.fixed_ms[id(p)]
        beta = self.cfg.betas[1]
        running.mul_(beta).addcmul_(p.grad, p.grad, value=1 - beta)
        return running / (1 - beta**self._steps)

    def _rms_dense(self) -> None:
        cfg = self.cfg
        live = [(p, p0, ms) for (p, p0), ms in zip(self.dense, self._ms) if p.grad is not None]
        if not live:
            return
        params = [p for p, _, _ in live]
        rms = torch._foreach_sqrt([self._mean_square(p, ms) for p, _, ms in live])
        denom = torch._foreach_add(rms, cfg.eps)
        torch._foreach_addcdiv_(params, [p.grad for p in params], denom, value=-cfg.lr)
        if cfg.rms_decay > 0:
            total = sum(float(r.sum()) for r in rms)
            count = sum(r.numel() for r in rms)
            mean_rms = max(total / max(count, 1), 1e-30)
            for p, p0, r in zip(params, [p0 for _, p0, _ in live], rms):
                rate = (r * (cfg.rms_decay / mean_rms)).clamp_(max=1.0)
                p.add_(rate * (p0 - p))

    # -- row-sparse (PKM value tables) ----------------------------------------------------------
    def _sparse_step(self, p: torch.Tensor, p0: torch.Tensor) -> None:
        cfg = self.cfg
        rows, g = _rows_of(p.grad)
        self.rows_updated += int(rows.numel())
        if cfg.optimizer == "sgd":
            p.index_add_(0, rows, g, alpha=-cfg.lr)
            return
        st = self._row_state.setdefault(id(p), {})
        if cfg.optimizer == "adamw":
            b1, b2 = cfg.betas
            if not st:
                st.update(
                    m=torch.zeros_like(p),
                    v=torch.zeros_like(p),
                    n=torch.zeros(p.shape[0], dtype=torch.long, device=p.device),
                )
            # rows are unique (coalesced): gather, update in place, scatter back; few passes over the rows
            n = st["n"].index_select(0, rows).add_(1)
            st["n"].index_copy_(0, rows, n)
            n = n.unsqueeze(1).to(p.dtype)
            m = st["m"].index_select(0, rows).mul_(b1).add_(g, alpha=1 - b1)
            v = st["v"].index_select(0, rows).mul_(b2).addcmul_(g, g, value=1 - b2)
            st["m"].index_copy_(0, rows, m)
            st["v"].index_copy_(0, rows, v)
            denom = v.div_(1 - b2**n).sqrt_().add_(cfg.eps)  # v is no longer needed: reuse its memory
            p.index_add_(0, rows, m.div_(1 - b1**n).div_(denom), alpha=-cfg.lr)
            return
        # rms
        if not st:
            st.update(
                ms=torch.zeros_like(p),
                n=torch.zeros(p.shape[0], dtype=torch.long, device=p.device),
                last=torch.zeros(p.shape[0], dtype=torch.long, device=p.device),
            )
        if self.fixed_ms is not None:
            ms_hat = self.fixed_ms[id(p)].index_select(0, rows)
        else:
            b2 = cfg.betas[1]
            st["n"][rows] += 1
            n = st["n"][rows].unsqueeze(1).to(p.dtype)
            ms = st["ms"][rows].mul_(b2).addcmul_(g, g, value=1 - b2)
            st["ms"][rows] = ms
            ms_hat = ms / (1 - b2**n)
        rms = ms_hat.sqrt()
        cur = p.index_select(0, rows)
        if cfg.rms_decay > 0:
            # Krause normalises by the mean RMS of the whole model; for a table we use its calibration
            # mean, or else the mean over the rows read now (a global running mean would cost a dense pass)
            if self.fixed_ms is not None:
                if "mean_rms" not in st:
                    st["mean_rms"] = max(float(self.fixed_ms[id(p)].sqrt().mean()), 1e-30)
                mean_rms = st["mean_rms"]
            else:
                mean_rms = max(float(rms.mean()), 1e-30)
            keep = 1 - (rms * (cfg.rms_decay / mean_rms)).clamp_(max=1.0)
            base = p0.index_select(0, rows)
            # the pull-backs this row missed while it was not read (a no-op for rows still at p0)
            missed = (self._steps - 1 - st["last"][rows]).clamp_(min=0).unsqueeze(1).to(p.dtype)
            cur = base + (cur - base) * keep**missed
            cur = cur - cfg.lr * g / (rms + cfg.eps)
            cur = base + (cur - base) * keep
            st["last"][rows] = self._steps
        else:
            cur = cur - cfg.lr * g / (rms + cfg.eps)
        p.index_copy_(0, rows, cur)
