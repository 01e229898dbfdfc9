"""Reporting: a terminal table, a JSON summary, a PNG of loss vs position, TensorBoard scalars.

Costs are given as ratios to a baseline run (static/txl if present, else the first static run):
that is how the issue states its goals (TXL-style dynamic <= 2x static time, PKM values <= 1.3x).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from data_pipeline.outputs import atomic_output
from pretrain.online_eval.engine import RunResult


def baseline(results: Sequence[RunResult]) -> RunResult | None:
    static = [r for r in results if r.config["mode"] == "static"]
    for r in static:
        if r.config["strategy"] == "txl":
            return r
    return static[0] if static else None


def summary(results: Sequence[RunResult], meta: dict | None = None) -> dict:
    base = baseline(results)
    runs = []
    for r in results:
        d = r.to_json()
        if base is not None:
            d["time_vs_static"] = r.wall_s / base.wall_s if base.wall_s else None
            d["flops_vs_static"] = r.flops / base.flops if base.flops else None
            d["ppl_change_vs_static"] = r.perplexity / base.perplexity - 1.0
        runs.append(d)
    return {"baseline": base.name if base else None, "meta": meta or {}, "runs": runs}


def table(results: Sequence[RunResult]) -> str:
    base = baseline(results)
    head = [
        "run",
        "nats/tok",
        "ppl",
        "bits/byte",
        "Δppl",
        "time s",
        "×time",
        "GFLOP",
        "×FLOP",
        "peak MiB",
        "state MiB",
        "updates",
    ]
    rows = []
    for r in results:
        rel = base is not None and base.wall_s > 0
        rows.append(
            [
                r.name,
                f"{r.nats_per_token:.4f}",
                f"{r.perplexity:.3f}",
                f"{r.bits_per_byte:.4f}",
                f"{100 * (r.perplexity / base.perplexity - 1):+.2f}%" if base else "",
                f"{r.wall_s:.1f}",
                f"{r.wall_s / base.wall_s:.2f}" if rel else "",
                f"{r.flops / 1e9:.1f}",
                f"{r.flops / base.flops:.2f}" if base and base.flops else "",
                f"{r.peak_memory_bytes / 2**20:.0f}",
                f"{r.state_bytes / 2**20:.1f}",
                str(r.updates),
            ]
        )
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(head)]

    def fmt(cells) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    lines = [fmt(head), fmt(["-" * w for w in widths])] + [fmt(row) for row in rows]
    if results:
        tokens, n_bytes = results[0].tokens, results[0].bytes
        lines.append(
            f"{tokens} tokens scored per run ({n_bytes} bytes, {len(results[0].docs)} documents); "
            f"×: ratio to {base.name if base else 'n/a'}"
        )
    return "\n".join(lines)


def write_json(path: str | Path, results: Sequence[RunResult], meta: dict | None = None) -> dict:
    s = summary(results, meta)
    with atomic_output(path) as tmp:
        tmp.write_text(json.dumps(s, indent=1) + "\n")
    return s


def plot(path: str | Path, results: Sequence[RunResult], title: str = "") -> None:
    """Loss by position within documents (top) and its difference to the static baseline (bottom)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = baseline(results)
    fig, axes = plt.subplots(2 if base else 1, 1, figsize=(8, 7 if base else 4), sharex=True, squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    bl = base.loss_by_position() if base is not None else []
    for k, r in enumerate(results):
        color = colors[k % len(colors)]  # the same run has the same colour in both panels
        b = r.position_bin
        xs = [(i + 0.5) * b for i, v in enumerate(r.loss_by_position()) if v is not None]
        ys = [v for v in r.loss_by_position() if v is not None]
        axes[0][0].plot(xs, ys, marker=".", color=color, label=f"{r.name} (ppl {r.perplexity:.2f})")
        if base is not None and r is not base:
            d = [
                (x, y - bl[int(x // b)])
                for x, y in zip(xs, ys)
                if int(x // b) < len(bl) and bl[int(x // b)] is not None
            ]
            axes[1][0].plot([p[0] for p in d], [p[1] for p in d], marker=".", color=color, label=r.name)
    axes[0][0].set_ylabel("nats / token")
    axes[0][0].legend(fontsize=7)
    axes[0][0].set_title(title or "loss by position within documents")
    if base is not None:
        axes[1][0].axhline(0.0, color="gray", lw=0.8)
        axes[1][0].set_ylabel(f"Δ nats vs {base.name}")
        axes[1][0].legend(fontsize=7)
    axes[-1][0].set_xlabel("token position in document")
    fig.tight_layout()
    try:
        with atomic_output(path) as tmp:
            fig.savefig(tmp, dpi=110)
    finally:
        plt.close(fig)


def tensorboard(log_dir: str | Path, results: Sequence[RunResult]) -> None:
    """Per run: loss by position (step = position), running loss (step = tokens read), and totals."""
    from torch.utils.tensorboard import SummaryWriter

    for r in results:
        w = SummaryWriter(log_dir=str(Path(log_dir) / r.name.replace("/", "_")))
        for i, v in enumerate(r.loss_by_position()):
            if v is not None:
                w.add_scalar("online_eval/loss_by_position", v, i * r.position_bin)
        for tokens, v in r.curve:
            w.add_scalar("online_eval/chunk_loss", v, tokens)
        for key, value in (
            ("nats_per_token", r.nats_per_token),
            ("perplexity", r.perplexity),
            ("bits_per_byte", r.bits_per_byte),
            ("wall_s", r.wall_s),
            ("gflops", r.flops / 1e9),
            ("peak_memory_mib", r.peak_memory_bytes / 2**20),
        ):
            w.add_scalar(f"online_eval/{key}", value, 0)
        w.close()
