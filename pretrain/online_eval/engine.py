"""The online-evaluation loop: score each chunk of a document, then (dynamic) take a gradient step on it.

Strategies (Rannen-Triki et al. 2024):
- overlapping: windows of L = `window` tokens advancing by S = `chunk`; each window scores its last S
  tokens (the first window all of its tokens) with up to L - S tokens of context. One forward per
  window; the gradient is that of the new tokens' loss, through the whole window.
- txl: non-overlapping chunks of S tokens; each chunk also attends to the previous chunk's keys and
  values, cached from that chunk's own forward and detached (Transformer-XL): no recomputation, and
  gradients flow only through the current chunk. The memory also keeps the keys/values of the
  document's first `sink` tokens: pretrained LLMs park attention on the first tokens they see
  ("attention sinks", Xiao et al. 2023), and a cache that drops them degrades badly (SmolLM2-135M:
  perplexity 45.7 without, vs 29.3 for overlapping windows, which recompute their own first tokens).
  Positions keep counting across the document, so relative positions are right for RoPE and
  absolute ones for learned position tables; before they would pass the model's limit, positions
  restart: [sink; previous chunk] is re-encoded from 0 (no grad) and becomes the memory.

The invariant that makes this evaluation honest: a chunk's tokens are scored by the forward that
precedes the update computed from them, so no token is ever scored by weights that have seen it.
With `update_every` k > 1 only every k-th chunk runs a backward (the others are only scored), which
trades adaptation for compute.
"""

from __future__ import annotations

import inspect
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pretrain.errors import PretrainError
from pretrain.online_eval.config import OnlineEvalConfig, run_names
from pretrain.online_eval.corpus import TokenizedDocument
from pretrain.online_eval.costs import FlopModel, PeakMemory, causal_keys, now
from pretrain.online_eval.online_optimizers import OnlineOptimizer
from pretrain.online_eval.trainable import Adaptation

log = logging.getLogger("pkm.online_eval")


@dataclass
class RunResult:
    name: str
    config: dict
    nll: float = 0.0  # nats, summed over scored tokens
    tokens: int = 0
    bytes: int = 0
    wall_s: float = 0.0  # time spent in this run's chunks (and resets), excluding setup
    flops: float = 0.0
    peak_memory_bytes: int = 0
    state_bytes: int = 0  # analytical: initial-weight copy + gradients + optimizer state
    trainable_elements: int = 0
    updates: int = 0
    rows_updated: int = 0  # PKM value rows changed, summed over updates
    chunks: int = 0
    calibration_s: float = 0.0
    position_bin: int = 1024
    bin_nll: list = field(default_factory=list)  # summed nats per position bin
    bin_tokens: list = field(default_factory=list)
    docs: list = field(default_factory=list)  # per document: name, tokens, bytes, nll
    curve: list = field(default_factory=list)  # per chunk: (tokens scored so far, mean nats of the chunk)

    @property
    def nats_per_token(self) -> float:
        return self.nll / max(self.tokens, 1)

    @property
    def perplexity(self) -> float:
        return math.exp(self.nats_per_token)

    @property
    def bits_per_byte(self) -> float:
        return self.nll / (math.log(2) * max(self.bytes, 1))

    def loss_by_position(self) -> list[float | None]:
        return [s / c if c else None for s, c in zip(self.bin_nll, self.bin_tokens)]

    def to_json(self) -> dict:
        d = asdict(self)
        d.pop("curve")
        d.update(
            nats_per_token=self.nats_per_token,
            perplexity=self.perplexity,
            bits_per_byte=self.bits_per_byte,
            loss_by_position=self.loss_by_position(),
            tokens_per_s=self.tokens / self.wall_s if self.wall_s else None,
        )
        return d


def _keep(t: torch.Tensor, head: int, tail: int) -> torch.Tensor:
    t = t.detach()
    if head == 0:
        return t[..., -tail:, :]
    return torch.cat([t[..., :head, :], t[..., -tail:, :]], dim=-2)


def keep_last(cache, n: int, head: int = 0):
    """The cache holding only the first `head` and the last `n` positions of every layer, detached
    from the graph."""
    from transformers.cache_utils import Cache

    if isinstance(cache, Cache):
        for layer in cache.layers:
            keys = getattr(layer, "keys", None)
            if isinstance(keys, torch.Tensor) and keys.dim() >= 2 and keys.shape[-2] > 0:
                layer.keys = _keep(layer.keys, head, n)
                layer.values = _keep(layer.values, head, n)
        return cache
    if isinstance(cache, (tuple, list)):
        return tuple(tuple(_keep(t, head, n) for t in layer) for layer in cache)
    raise PretrainError(
        f"strategy txl: the model returned past_key_values of type {type(cache).__name__}, "
        "which cannot be trimmed (use --strategy overlapping)"
    )


def _max_positions(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions", "n_ctx", "max_seq_len"):
        v = getattr(config, name, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


class OnlineRun:
    """One configuration over a list of documents. `steps()` yields after every chunk (so several runs
    can be interleaved and timed fairly on a shared machine); `run()` goes through all of them."""

    def __init__(
        self,
        model: nn.Module,
        docs: Sequence[TokenizedDocument],
        cfg: OnlineEvalConfig,
        calibration: Sequence[TokenizedDocument] | None = None,
        trace: bool = False,
        on_chunk: Callable[[int], None] | None = None,
    ):
        self.cfg = cfg.validate()
        self.docs = list(docs)
        self.calibration = calibration
        self.on_chunk = on_chunk
        self.trace: list[tuple] | None = [] if trace else None
        self.base = model
        self.device = next(model.parameters()).device
        self.flop_model = FlopModel.of(model)
        params = inspect.signature(model.forward).parameters
        self._takes = {n: n in params for n in ("position_ids", "past_key_values", "logits_to_keep", "use_cache")}
        self.max_positions = cfg.max_positions or _max_positions(model)
        if cfg.strategy == "txl":
            if not self._takes["past_key_values"]:
                raise PretrainError(
                    f"strategy txl: {type(model).__name__}.forward takes no past_key_values "
                    "(use --strategy overlapping)"
                )
            # a position restart re-encodes [sink; previous chunk] from 0, then reads the chunk after them
            if self.max_positions is not None and 2 * cfg.chunk + cfg.sink > self.max_positions:
                raise PretrainError(
                    f"strategy txl: chunk={cfg.chunk} plus its memory (the previous chunk and "
                    f"sink={cfg.sink} tokens) exceeds the model's {self.max_positions} positions "
                    f"(use chunk <= {(self.max_positions - cfg.sink) // 2}, or fewer sink tokens)"
                )
        elif self.max_positions is not None and cfg.window > self.max_positions:
            raise PretrainError(
                f"strategy overlapping: window={cfg.window} exceeds the model's {self.max_positions} positions"
            )
        self.result = RunResult(name=cfg.name, config=asdict(cfg), position_bin=cfg.position_bin)
        self._chunk_counter = 0
        self._tokens_seen = 0

    # -- driver ------------------------------------------------------------------------------------
    def run(self) -> RunResult:
        for _ in self.steps():
            pass
        return self.result

    def steps(self) -> Iterator[None]:
        cfg, res = self.cfg, self.result
        adaptation = Adaptation(self.base, cfg)
        try:
            self.model = adaptation.model
            self._lora_params = adaptation.trainable_elements() if cfg.adapt == "lora" and cfg.mode == "dynamic" else 0
            self._trainable_matmul = adaptation.trainable_matmul()
            self._depth = adaptation.depth_fraction(self.flop_model.layers)
            self.opt = None
            res.trainable_elements = adaptation.trainable_elements()
            if cfg.mode == "dynamic":
                mean_square = None
                if cfg.optimizer == "rms" and self.calibration:
                    t0 = now()
                    mean_square = self._calibrate(adaptation)
                    res.calibration_s = now() - t0
                self.opt = OnlineOptimizer(adaptation.trainables, adaptation.initial, cfg, mean_square)
                res.state_bytes = adaptation.state_bytes() + sum(
                    t.numel() * t.element_size() for t in self._optimizer_tensors()
                )
            for i, doc in enumerate(self.docs):
                if self.opt is not None and (cfg.reset == "per-document" or i == 0):
                    t0 = now()
                    adaptation.restore_initial()
                    self.opt.reset()
                    res.wall_s += now() - t0
                totals = [res.nll, res.tokens]
                chunks = self._txl(i, doc) if cfg.strategy == "txl" else self._overlapping(i, doc)
                for _ in chunks:
                    yield
                res.bytes += doc.n_bytes
                res.docs.append(
                    dict(name=doc.name, tokens=res.tokens - totals[1], bytes=doc.n_bytes, nll=res.nll - totals[0])
                )
            if self.opt is not None:
                res.state_bytes = adaptation.state_bytes() + sum(
                    t.numel() * t.element_size() for t in self._optimizer_tensors()
                )
                res.rows_updated = self.opt.rows_updated
        finally:
            adaptation.close()

    def _optimizer_tensors(self) -> list[torch.Tensor]:
        out = []
        if self.opt._torch is not None:
            for st in self.opt._torch.state.values():
                out += [v for v in st.values() if isinstance(v, torch.Tensor) and v.dim() > 0]
        out += list(self.opt._ms)
        for st in self.opt._row_state.values():
            out += [v for v in st.values() if isinstance(v, torch.Tensor)]
        return out

    # -- one chunk ---------------------------------------------------------------------------------
    def _is_update(self) -> bool:
        self._chunk_counter += 1
        return self.cfg.mode == "dynamic" and self._chunk_counter % self.cfg.update_every == 0

    def _forward(self, inp: torch.Tensor, positions: torch.Tensor | None, cache, keep: int):
        kw = {}
        if positions is not None and self._takes["position_ids"]:
            kw["position_ids"] = positions[None]
        if self.cfg.strategy == "txl":
            kw.update(past_key_values=cache, use_cache=True)
        elif self._takes["use_cache"]:
            kw["use_cache"] = False
        if self._takes["logits_to_keep"]:
            kw["logits_to_keep"] = keep
        out = self.model(input_ids=inp[None], **kw)
        return out.logits[0, -keep:], getattr(out, "past_key_values", None)

    def _score(self, doc_index: int, start: int, nll: torch.Tensor) -> None:
        """Record the losses of targets start..start+len(nll)-1 of the document (before any update)."""
        res, b = self.result, self.cfg.position_bin
        values = nll.detach().double().cpu().numpy()
        res.nll += float(values.sum())
        res.tokens += len(values)
        bins = (start + np.arange(len(values))) // b
        sums = np.bincount(bins, weights=values)
        counts = np.bincount(bins)
        if len(res.bin_nll) < len(sums):
            res.bin_nll += [0.0] * (len(sums) - len(res.bin_nll))
            res.bin_tokens += [0] * (len(sums) - len(res.bin_tokens))
        for j in np.nonzero(counts)[0]:
            res.bin_nll[j] += float(sums[j])
            res.bin_tokens[j] += int(counts[j])
        self._tokens_seen += len(values)
        res.curve.append((self._tokens_seen, float(values.mean())))
        if self.trace is not None:
            self.trace.append(("score", doc_index, start, start + len(values)))

    def _update(self, loss: torch.Tensor, doc_index: int, start: int, stop: int, queries: int, keys: int) -> None:
        loss.backward()
        self.opt.step()
        self.opt.zero_grad()
        self.result.updates += 1
        fm = self.flop_model
        self.result.flops += fm.backward(queries, keys, stop - start, self._trainable_matmul, self._depth)
        if self.cfg.adapt != "pkm-values":  # the update itself: ~10 FLOPs per trainable element
            self.result.flops += 10.0 * self.result.trainable_elements
        if self.trace is not None:
            self.trace.append(("update", doc_index, start, stop))

    def _chunk_done(self, t0: float, n: int) -> None:
        self.result.wall_s += now() - t0
        self.result.chunks += 1
        if self.on_chunk is not None:
            self.on_chunk(n)

    # -- strategies ----------------------------------------------------------------------------------
    def _txl(self, doc_index: int, doc: TokenizedDocument) -> Iterator[None]:
        cfg, fm, res = self.cfg, self.flop_model, self.result
        ids = torch.tensor(doc.ids, dtype=torch.long, device=self.device)
        total, size = doc.n_scored, cfg.chunk
        # memory = [sink: the document's first tokens] + [the previous chunk]; `sunk` counts the sink
        # entries at its front (0 until a chunk after the first one has been read)
        cache, pos, memory, sunk, prev = None, 0, 0, 0, None
        probe = PeakMemory(self.device)
        for c0 in range(0, total, size):
            t0 = now()
            probe.start()
            c1 = min(c0 + size, total)
            q = c1 - c0
            if cache is not None and self.max_positions is not None and pos + q > self.max_positions:
                # restart positions: re-encode [sink; previous chunk] at 0.. (no grad) as the memory
                sunk = min(cfg.sink, prev[0])
                again = torch.cat([ids[:sunk], ids[prev[0] : prev[1]]])
                with torch.no_grad():
                    _, cache = self._forward(again, torch.arange(len(again), device=self.device), None, 1)
                res.flops += fm.forward(len(again), causal_keys(len(again), 0), 1)
                cache, pos, memory = keep_last(cache, len(again)), len(again), len(again)
            inp, tgt = ids[c0:c1], ids[c0 + 1 : c1 + 1]
            update = self._is_update()
            with torch.set_grad_enabled(update):
                logits, new_cache = self._forward(inp, torch.arange(pos, pos + q, device=self.device), cache, q)
                nll = F.cross_entropy(logits.float(), tgt, reduction="none")
            self._score(doc_index, c0, nll)
            keys = causal_keys(q, memory)
            res.flops += fm.forward(q, keys, q) + 2.0 * self._lora_params * q
            if update:
                self._update(nll.mean(), doc_index, c0, c1, q, keys)
            # the sink: the first tokens of the document, once they are no longer in the chunk kept
            sunk = min(cfg.sink, c0) if memory else 0
            cache = keep_last(new_cache, q, head=sunk)
            pos, memory, prev = pos + q, sunk + q, (c0, c1)
            probe.stop()
            res.peak_memory_bytes = max(res.peak_memory_bytes, probe.peak)
            self._chunk_done(t0, q)
            yield

    def _overlapping(self, doc_index: int, doc: TokenizedDocument) -> Iterator[None]:
        cfg, fm, res = self.cfg, self.flop_model, self.result
        ids = torch.tensor(doc.ids, dtype=torch.long, device=self.device)
        total = doc.n_scored
        done = 0  # targets scored so far
        probe = PeakMemory(self.device)
        while done < total:
            t0 = now()
            probe.start()
            stop = min(cfg.window if done == 0 else done + cfg.chunk, total)
            start = max(0, stop - cfg.window)
            new = stop - done
            inp, tgt = ids[start:stop], ids[done + 1 : stop + 1]
            update = self._is_update()
            with torch.set_grad_enabled(update):
                logits, _ = self._forward(inp, None, None, new)
                nll = F.cross_entropy(logits.float(), tgt, reduction="none")
            self._score(doc_index, done, nll)
            q = stop - start
            keys = causal_keys(q, 0)
            res.flops += fm.forward(q, keys, new) + 2.0 * self._lora_params * q
            if update:
                self._update(nll.mean(), doc_index, done, stop, q, keys)
            done = stop
            probe.stop()
            res.peak_memory_bytes = max(res.peak_memory_bytes, probe.peak)
            self._chunk_done(t0, new)
            yield

    # -- Krause's calibration ----------------------------------------------------------------------
    def _calibrate(self, adaptation: Adaptation) -> list[torch.Tensor]:
        """Mean squared gradient of every trainable tensor over chunks of the calibration documents
        (static weights, no memory). Elements that never got a gradient take their tensor's mean and
        none stays below 1% of it, so that an unseen token or an unread PKM row is not divided by ~0."""
        sums = [torch.zeros_like(t.tensor) for t in adaptation.trainables]
        steps = 0
        for doc in self.calibration:
            ids = torch.tensor(doc.ids, dtype=torch.long, device=self.device)
            for c0 in range(0, doc.n_scored, self.cfg.chunk):
                c1 = min(c0 + self.cfg.chunk, doc.n_scored)
                logits = self.model(input_ids=ids[c0:c1][None]).logits[0]
                F.cross_entropy(logits.float(), ids[c0 + 1 : c1 + 1]).backward()
                with torch.no_grad():
                    for t, s in zip(adaptation.trainables, sums):
                        g = t.tensor.grad
                        if g is None:
                            continue
                        if g.is_sparse:
                            g = g.coalesce()
                            s.index_add_(0, g.indices()[0], g.values() ** 2)
                        else:
                            s.add_(g * g)
                        t.tensor.grad = None
                steps += 1
        if steps == 0:
            raise PretrainError("rms calibration: the calibration corpus has no token to score")
        out = []
        for s in sums:
            ms = s / steps
            seen = ms > 0
            mean = ms[seen].mean() if seen.any() else torch.tensor(1.0, device=ms.device)
            # floor at 1% of the tensor's mean: a weight that barely moved during calibration would
            # otherwise take a step 1/sqrt(tiny) times larger than the others on its first real gradient
            out.append(torch.where(seen, ms, mean).clamp_(min=float(mean) * 0.01))
        return out


def compare(
    model: nn.Module,
    docs: Sequence[TokenizedDocument],
    configs: Sequence[OnlineEvalConfig],
    interleave: bool = False,
    calibration: Sequence[TokenizedDocument] | None = None,
    progress: bool = True,
    models: Sequence[nn.Module | None] | None = None,
) -> list[RunResult]:
    """Run every configuration over the same documents. Sequentially (one model, restored between
    runs), or interleaved chunk by chunk (static runs share `model`, each dynamic run gets a copy):
    then a burst of load from other processes hits every run alike, which keeps the time ratios
    honest on a shared machine. `models[i]`, where given and not None, is the model of run i instead
    (used as it is)."""
    import copy

    from tqdm import tqdm

    total = sum(d.n_scored for d in docs) * len(configs)
    bar = tqdm(total=total, unit="tok", desc="online eval", disable=not progress, dynamic_ncols=True)
    runs = []
    for i, (cfg, name) in enumerate(zip(configs, run_names(list(configs)))):
        m = models[i] if models is not None and models[i] is not None else None
        if m is None:
            m = model if (not interleave or cfg.mode == "static") else copy.deepcopy(model)
        runs.append(OnlineRun(m, docs, cfg, calibration=calibration, on_chunk=bar.update))
        runs[-1].result.name = name
    try:
        if not interleave:
            for r in runs:
                bar.set_postfix_str(r.result.name)
                r.run()
                log.info(
                    "%s: %.4f nats/token, ppl %.3f, %.1f s",
                    r.result.name,
                    r.result.nats_per_token,
                    r.result.perplexity,
                    r.result.wall_s,
                )
        else:
            live = [r.steps() for r in runs]
            while live:
                nxt = []
                for g in live:
                    try:
                        next(g)
                        nxt.append(g)
                    except StopIteration:
                        pass
                live = nxt
    finally:
        bar.close()
    return [r.result for r in runs]
