"""Online (dynamic) evaluation of causal LMs on long documents (`pkm eval online`).

Score each chunk of a document before training on it, then take a gradient step on it, so the model
adapts as it reads (Krause et al. 2018, 2019; Rannen-Triki et al. 2024). Strategies: overlapping
windows or Transformer-XL-style chunks with the previous chunk's cached keys/values; updates of all
weights, the MLPs, LoRA adapters, or only the PKM value rows read in the chunk.

Python API (importing this package imports no torch; the names below load on first use):

    from pretrain.online_eval import OnlineEvalConfig, load_causal_lm, load_corpus, tokenize, compare
    model, tok = load_causal_lm("smollm2")
    docs = tokenize(load_corpus("books"), tok, max_tokens=4096)
    results = compare(model, docs, [OnlineEvalConfig(),
                                    OnlineEvalConfig(mode="dynamic", optimizer="adamw", lr=1e-4)])
    print(results[1].perplexity / results[0].perplexity)  # < 1: reading the book made the model better

or, as `pkm eval online` does (load, compare, write OUT/results.json and plots):

    results, summary = run_online_eval(OnlineEvalJob(model="smollm2", runs=[OnlineEvalConfig(), ...]))
"""

from __future__ import annotations

from pretrain.online_eval.config import OnlineEvalConfig, OnlineEvalJob

_LAZY = {
    "run_online_eval": "pretrain.online_eval.evaluate",
    "OnlineRun": "pretrain.online_eval.engine",
    "RunResult": "pretrain.online_eval.engine",
    "compare": "pretrain.online_eval.engine",
    "load_causal_lm": "pretrain.online_eval.models",
    "load_corpus": "pretrain.online_eval.corpus",
    "bundled_books": "pretrain.online_eval.corpus",
    "tokenize": "pretrain.online_eval.corpus",
    "Document": "pretrain.online_eval.corpus",
}

__all__ = ["OnlineEvalConfig", "OnlineEvalJob", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
