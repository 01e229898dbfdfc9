"""The model card (README.md) of an exported PKM model.

`card_info` is what the trainer knows about the run; every key is optional and anything missing is
written as "not recorded" (never invented):
  name, base_model (the checkpoint it was initialised from), training_data (str or list),
  train_steps, tokens_seen, final_loss, final_eval_loss, memory_usage (dict: figure -> value, or
  layer -> {figure: value}), license, notes.
"""

from __future__ import annotations

from model.config import ModelConfig

_NR = "not recorded"


def _fmt(value) -> str:
    if value is None:
        return _NR
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(map(str, value)) or _NR
    return str(value)


def _usage_table(usage) -> str:
    if not usage:
        return f"Memory usage during training: {_NR}.\n"
    rows = []
    if all(isinstance(v, dict) for v in usage.values()):
        cols = sorted({c for v in usage.values() for c in v})
        rows.append("| layer | " + " | ".join(cols) + " |")
        rows.append("|---" * (len(cols) + 1) + "|")
        for layer, figures in usage.items():
            rows.append(f"| {layer} | " + " | ".join(_fmt(figures.get(c)) for c in cols) + " |")
    else:
        rows += ["| figure | value |", "|---|---|"] + [f"| {k} | {_fmt(v)} |" for k, v in usage.items()]
    return "\n".join(rows) + "\n"


def model_card(model, cfg: ModelConfig, info: dict, tokenizer: str) -> str:
    config = model.config
    auto = "AutoModelForCausalLM" if cfg.family == "gpt" else "AutoModelForMaskedLM"
    memories = model.memories()
    total = sum(p.numel() for p in model.parameters())
    mem_params = sum(p.numel() for _, m in memories for p in m.parameters())
    value_bytes = sum(m.values.weight.numel() * m.values.weight.element_size() for _, m in memories)
    p = cfg.pkm
    name = info.get("name") or f"PKM-{'GPT' if cfg.family == 'gpt' else 'BERT'}"
    tags = ["pkm", "product-key-memory", "megatron-core", "custom_code", cfg.family]
    lines = [
        "---",
        f"license: {info.get('license', 'other')}",
        "library_name: transformers",
        "tags:",
        *[f"- {t}" for t in tags],
        "---",
        "",
        f"# {name}",
        "",
        f"A {'causal' if cfg.family == 'gpt' else 'masked'} language model with Product Key Memory layers "
        "(Lample et al. 2019, placed as in Kim & Jung 2020), trained with pkm-pretrain on megatron-core "
        "and exported with self-contained modeling code (torch + transformers only).",
        "",
        "```python",
        f"from transformers import {auto}, AutoTokenizer",
        f'model = {auto}.from_pretrained("PATH_OR_REPO", trust_remote_code=True)',
        'tokenizer = AutoTokenizer.from_pretrained("PATH_OR_REPO")',
        "```",
        "",
        "## Architecture",
        "",
        "| | |",
        "|---|---|",
        f"| family | {cfg.family} ({'post' if cfg.norm_position == 'post' else 'pre'}-LayerNorm, "
        f"{cfg.normalization}, {cfg.activation}, {cfg.position_embedding} positions) |",
        f"| layers / hidden / heads | {cfg.num_layers} / {cfg.hidden_size} / {cfg.num_attention_heads}"
        f"{f' ({cfg.num_query_groups} KV groups)' if cfg.num_query_groups else ''} |",
        f"| FFN width | {config.intermediate_size} |",
        f"| vocabulary | {config.vocab_size} |",
        f"| parameters | {total / 1e6:.2f}M, of which memory {mem_params / 1e6:.2f}M |",
        "",
        "## Product Key Memory",
        "",
        "| | |",
        "|---|---|",
        f"| layers (0-based) | {_fmt(list(p.layers)) if p.layers else 'none (memory-free)'} |",
        f"| placement | {p.placement} ({'FFN(x) + PKM(x)' if p.placement == 'add' else 'PKM(x) replaces the FFN'}) |",
        f"| slots per layer | {p.n_keys}^2 = {p.n_keys**2:,} |",
        f"| heads / knn / key dim | {p.heads} / {p.knn} / {p.k_dim} |",
        f"| query BatchNorm / LayerNorm | {p.query_batchnorm} / {p.query_layernorm} |",
        f"| value tables | {value_bytes / 2**20:.1f} MiB in total |",
        "",
        'Each memory is a `ProductKeyMemory` module; its value table `values` is an `nn.EmbeddingBag(mode="sum")` '
        "and `last_indices` holds the slots read by the last forward ([tokens, heads*knn]).",
        "",
        "## Training",
        "",
        "| | |",
        "|---|---|",
        f"| initialised from | {_fmt(info.get('base_model'))} |",
        f"| training data | {_fmt(info.get('training_data'))} |",
        f"| tokenizer | {_fmt(info.get('tokenizer_name', tokenizer))} |",
        f"| steps | {_fmt(info.get('train_steps'))} |",
        f"| tokens seen | {_fmt(info.get('tokens_seen'))} |",
        f"| final training loss | {_fmt(info.get('final_loss'))} |",
        f"| final validation loss | {_fmt(info.get('final_eval_loss'))} |",
        "",
        "## Memory usage",
        "",
        _usage_table(info.get("memory_usage")),
    ]
    if info.get("notes"):
        lines += ["## Notes", "", str(info["notes"]), ""]
    return "\n".join(lines)
