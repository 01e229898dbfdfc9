"""BERT's masked-LM head on the masked positions only vs on every position, side by side in one run.

megatron-core's BertModel runs its LM head (transform + the vocabulary GEMM) on every position; the loss
reads only the masked ~15 %. `model.build.lm_forward` hands the head only the positions `loss_mask`
marks (a forward hook on the encoder). This times one forward + backward of the Kim & Jung recipe's model
(configs/recipes/kim_jung/minilm_shape.yaml: all-MiniLM-L6-v2's shape, vocabulary 30,522, a PKM added to
the FFN of layer 4) both ways, interleaved A B A B ..., on one batch of 32 x 64 tokens with 15 % masked,
and checks that both give the same loss.

Figures (fp32, torch threads = 2, medians): ms_masked_positions, ms_all_positions, speedup (all / masked,
wall), cpu_speedup (the same in process CPU time, the steadier figure on a shared machine),
loss_difference (|masked - all| of the batch's mean loss).

    python benchmarks/bert_head.py [--quick] [--json] [--threads N]

`--quick`: fewer repetitions (the same sizes); `--json`: one JSON object as the last line.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.common import emit, log  # noqa: E402
from benchmarks.pkm_layer import init_megatron, interleaved, median  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "configs" / "recipes" / "kim_jung" / "minilm_shape.yaml"
VOCAB, BATCH, MASKED = 30522, 32, 0.15


def recipe_model():
    """The recipe's model (MiniLM's shape, PKM added at its layer), randomly initialised, dropout off."""
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from model.build import build_model
    from pretrain.config import load_config

    cfg = load_config(RECIPE, ["model.hidden_dropout=0.0", "model.attention_dropout=0.0"]).model
    torch.manual_seed(0)
    model_parallel_cuda_manual_seed(0)
    return build_model(cfg, VOCAB), cfg


def batch(seq: int) -> dict:
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, VOCAB, (BATCH, seq), generator=gen)
    return {
        "tokens": tokens,
        "labels": torch.randint(0, VOCAB, (BATCH, seq), generator=gen),
        "loss_mask": (torch.rand(BATCH, seq, generator=gen) < MASKED).float(),
        "padding_mask": torch.zeros(BATCH, seq, dtype=torch.bool),
        "types": torch.zeros_like(tokens),
    }


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer repetitions (same sizes); <= 60 s on 2 cores")
    ap.add_argument("--json", action="store_true", help="last line: one JSON object of the figures")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    from model.build import lm_forward, masked_mean

    init_megatron()
    model, cfg = recipe_model()
    b = batch(cfg.seq_length)
    whole = {k: v for k, v in b.items() if k != "loss_mask"}  # no loss_mask: megatron's head on every position
    losses = {}

    def step(name: str, inputs: dict):
        def run():
            model.zero_grad(set_to_none=True)
            loss = masked_mean(lm_forward(model, "bert", inputs), b["loss_mask"])
            loss.backward()
            losses[name] = loss.item()

        return run

    reps = 3 if args.quick else 12
    log(f"BERT head: {cfg.num_layers} layers, hidden {cfg.hidden_size}, vocabulary {VOCAB}, {BATCH} x {cfg.seq_length}")
    wall, cpu = interleaved({"masked": step("masked", b), "all": step("all", whole)}, reps)
    result = {
        "benchmark": "bert_head",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {args.threads} threads",
        "model": str(RECIPE.relative_to(ROOT)),
        "batch": [BATCH, cfg.seq_length],
        "masked_positions": int(b["loss_mask"].sum()),
        "reps": reps,
        "ms_masked_positions": median(wall["masked"]),
        "ms_all_positions": median(wall["all"]),
        "speedup": round(median(wall["all"]) / median(wall["masked"]), 3),
        "cpu_speedup": round(median(cpu["all"]) / median(cpu["masked"]), 3),
        "loss_difference": abs(losses["masked"] - losses["all"]),
        "wall_seconds": round(time.perf_counter() - t_start, 1),
    }
    print(
        f"head on masked positions {result['ms_masked_positions']} ms, on all {result['ms_all_positions']} ms per "
        f"forward+backward: {result['speedup']}x (CPU time {result['cpu_speedup']}x); "
        f"loss difference {result['loss_difference']:.2e}"
    )
    return emit(result, args.json)


if __name__ == "__main__":
    main()
