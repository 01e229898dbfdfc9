"""Export a trained megatron-core PKM model as a self-contained Hugging Face repository.

Input: a *full* (TP=1, unsharded: every value table [n_slots, dim]) megatron state dict, the ModelConfig,
the tokenizer the model was trained with, and what the trainer knows about the run (`card_info`).
Output directory:
  model.safetensors (sharded with an index above `max_shard_size`), config.json with `auto_map`,
  configuration_pkm.py + modeling_pkm.py (torch + transformers only), tokenizer files, README.md.
Load with `AutoModelForCausalLM` / `AutoModelForMaskedLM` / `AutoModelForSequenceClassification` /
`AutoModelForQuestionAnswering` `.from_pretrained(dir, trust_remote_code=True)`.

The exported module tree mirrors megatron's, so the weights move by renaming alone (RENAMES).
"""

from __future__ import annotations

import logging
import os
import re
import shutil

import torch

from model.config import ModelConfig
from model.errors import ModelError
from model.hf.safetensors_stream import StreamedTensor, write_safetensors

log = logging.getLogger("pkm.model.hf")

MODELING_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "modeling")
MODELING_FILES = ("configuration_pkm.py", "modeling_pkm.py")

# megatron name -> exported name; the first matching pattern applies.
RENAMES_COMMON = (
    (r"embedding\.word_embeddings\.", "model.embed_tokens."),
    (r"embedding\.position_embeddings\.", "model.embed_positions."),
    (r"embedding\.tokentype_embeddings\.", "model.embed_token_types."),
    (r"embedding\.embedding_dropout\.layernorm\.", "model.embed_norm."),
    (r"(?:decoder|encoder)\.layers\.(\d+)\.self_attn_bda\.layernorm\.", r"model.layers.\1.post_attention_layernorm."),
    (r"(?:decoder|encoder)\.layers\.(\d+)\.mlp_bda\.layernorm\.", r"model.layers.\1.post_mlp_layernorm."),
    (r"(?:decoder|encoder)\.layers\.", "model.layers."),
    (r"(?:decoder|encoder)\.final_layernorm\.", "model.final_layernorm."),
)
RENAMES = {
    "gpt": RENAMES_COMMON + ((r"output_layer\.weight", "lm_head.weight"),),
    "bert": RENAMES_COMMON
    + (
        (r"pooler\.", "model.pooler."),
        (r"lm_head\.", "lm_head."),
        (r"output_layer\.weight", "lm_head.decoder.weight"),
        (r"output_layer\.bias", "lm_head.bias"),
    ),
}
# Not exported: megatron's next-sentence head (no HF task uses it) and TE/megatron extra state.
NOT_EXPORTED = (r"binary_head\..*", r".*_extra_state")

AUTO_MAP = {
    "gpt": {
        "AutoConfig": "configuration_pkm.PKMGPTConfig",
        "AutoModel": "modeling_pkm.PKMGPTModel",
        "AutoModelForCausalLM": "modeling_pkm.PKMGPTForCausalLM",
    },
    "bert": {
        "AutoConfig": "configuration_pkm.PKMBertConfig",
        "AutoModel": "modeling_pkm.PKMBertModel",
        "AutoModelForMaskedLM": "modeling_pkm.PKMBertForMaskedLM",
        "AutoModelForSequenceClassification": "modeling_pkm.PKMBertForSequenceClassification",
        "AutoModelForQuestionAnswering": "modeling_pkm.PKMBertForQuestionAnswering",
    },
}
MAIN_CLASS = {"gpt": "PKMGPTForCausalLM", "bert": "PKMBertForMaskedLM"}


def modeling():
    """The exported modeling module, imported from this package (the same file that travels)."""
    from model.hf.modeling import configuration_pkm, modeling_pkm

    return configuration_pkm, modeling_pkm


def rename(state_dict: dict, family: str) -> tuple[dict, list[str]]:
    """megatron names -> exported names; returns (renamed, names not exported). Values are tensors or
    StreamedTensors (value tables read block by block)."""
    out, skipped = {}, []
    for name, value in state_dict.items():
        if any(re.fullmatch(p, name) for p in NOT_EXPORTED) or not isinstance(value, (torch.Tensor, StreamedTensor)):
            skipped.append(name)
            continue
        for pattern, repl in RENAMES[family]:
            new, n = re.subn("^" + pattern, repl, name)
            if n:
                out[new] = value
                break
        else:
            raise ModelError(f"state dict entry {name!r} has no exported name (is this a {family} model?)")
    return out, skipped


def hf_config(model_cfg: ModelConfig, vocab_size: int, tokenizer=None):
    """The exported config (PKMGPTConfig / PKMBertConfig) for a model trained with `model_cfg`."""
    configuration, _ = modeling()
    cls = configuration.PKMGPTConfig if model_cfg.family == "gpt" else configuration.PKMBertConfig
    p = model_cfg.pkm
    special = {}
    if tokenizer is not None:
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            value = getattr(tokenizer, key, None)
            if value is not None:
                special[key] = int(value)
    cfg = cls(
        vocab_size=vocab_size,
        hidden_size=model_cfg.hidden_size,
        num_hidden_layers=model_cfg.num_layers,
        num_attention_heads=model_cfg.num_attention_heads,
        num_key_value_heads=model_cfg.num_query_groups or model_cfg.num_attention_heads,
        intermediate_size=model_cfg.ffn_hidden_size or 4 * model_cfg.hidden_size,
        max_position_embeddings=model_cfg.max_position_embeddings or model_cfg.seq_length,
        normalization=model_cfg.normalization,
        layer_norm_eps=model_cfg.layernorm_epsilon,
        activation=model_cfg.activation,
        position_embedding=model_cfg.position_embedding,
        rope_theta=float(model_cfg.rotary_base),
        add_bias_linear=model_cfg.add_bias_linear,
        qkv_bias=model_cfg.add_bias_linear if model_cfg.qkv_bias is None else model_cfg.qkv_bias,
        tie_embeddings=model_cfg.tie_embeddings,
        norm_position=model_cfg.norm_position,
        has_pooler=model_cfg.family == "bert" and model_cfg.binary_head,
        hidden_dropout=model_cfg.hidden_dropout,
        attention_dropout=model_cfg.attention_dropout,
        initializer_range=model_cfg.init_method_std,
        pkm={
            "layers": list(p.layers),
            "placement": p.placement,
            "n_keys": p.n_keys,
            "heads": p.heads,
            "knn": p.knn,
            "k_dim": p.k_dim,
            "query_batchnorm": p.query_batchnorm,
            "query_layernorm": p.query_layernorm,
            "input_dropout": p.input_dropout,
            "query_dropout": p.query_dropout,
            "value_dropout": p.value_dropout,
            "value_dtype": p.value_dtype,
        },
        **special,
    )
    cfg.auto_map = dict(AUTO_MAP[model_cfg.family])
    return cfg


def _check_value_tables(sd: dict, model_cfg: ModelConfig) -> None:
    want = (model_cfg.pkm.n_keys**2, model_cfg.hidden_size)
    bad = [
        f"{k} {tuple(v.shape)}" for k, v in sd.items() if k.endswith("memory.values.weight") and tuple(v.shape) != want
    ]
    if bad:
        raise ModelError(
            f"value tables are not full [{want[0]}, {want[1]}] tables (a shard of a TP/DP layout? "
            f"export needs the consolidated TP=1 state dict): {', '.join(bad[:4])}"
        )


def _skeleton(weights: dict, model_cfg: ModelConfig, config, dtype: torch.dtype):
    """The exported model class without storage (meta tensors), checked against the weights' names
    and shapes: what the export writes, and what the model card describes."""
    _, modeling_pkm = modeling()
    with torch.device("meta"):
        model = getattr(modeling_pkm, MAIN_CLASS[model_cfg.family])(config).to(dtype)
        if model_cfg.pkm.value_dtype == "bf16":  # a bf16 table is written (and loads) in bf16: half the bytes
            for m in model.modules():
                if isinstance(m, modeling_pkm.ProductKeyMemory):
                    m.values.to(torch.bfloat16)
    expected = model.state_dict()
    missing = [k for k in expected if k not in weights]
    unexpected = [k for k in weights if k not in expected]
    if missing or unexpected:
        raise ModelError(
            f"state dict does not fit the {model_cfg.family} config: missing {missing[:6]}"
            f"{'...' if len(missing) > 6 else ''}, unexpected {unexpected[:6]}"
            f"{'...' if len(unexpected) > 6 else ''}"
        )
    shapes = [
        f"{k} {tuple(weights[k].shape)} (model: {tuple(v.shape)})"
        for k, v in expected.items()
        if tuple(weights[k].shape) != tuple(v.shape)
    ]
    if shapes:
        raise ModelError(f"state dict does not fit the {model_cfg.family} config: {', '.join(shapes[:4])}")
    return model.eval()


def export_hf(
    state_dict: dict,
    model_cfg: ModelConfig,
    tokenizer: str,
    out_dir: str,
    card_info: dict | None = None,
    max_shard_size: str = "2GB",
    overwrite: bool = False,
) -> str:
    """Write the HF repository for a trained model to `out_dir` (atomically: a temp dir, renamed).
    `state_dict` holds tensors, or StreamedTensors for value tables read block by block of rows from a
    checkpoint: the weights are written as they arrive, so no table is ever whole in memory."""
    from model.hf.card import model_card
    from model.hf.tokenizer_export import load_tokenizer_for_export

    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir) and os.listdir(out_dir) and not overwrite:
        raise ModelError(f"{out_dir}: exists and is not empty (pass overwrite=True / --overwrite)")
    tok = load_tokenizer_for_export(tokenizer)
    sd = {k.removeprefix("module."): v for k, v in state_dict.items()}
    sd = {k: v for k, v in sd.items() if v is not None}
    if "embedding.word_embeddings.weight" not in sd:
        raise ModelError("state dict has no embedding.word_embeddings.weight: not a megatron GPT/BERT state dict")
    _check_value_tables(sd, model_cfg)
    weights, _ = rename(sd, model_cfg.family)
    vocab, dtype = sd["embedding.word_embeddings.weight"].shape[0], sd["embedding.word_embeddings.weight"].dtype
    config = hf_config(model_cfg, vocab, tok)
    model = _skeleton(weights, model_cfg, config, dtype)
    if len(tok) > model.config.vocab_size:
        raise ModelError(
            f"tokenizer {tokenizer} has {len(tok)} tokens, the model's vocabulary only {model.config.vocab_size}"
        )
    # As the model's .to(dtype) would: floating tensors in the model's dtype, others as they are.
    tensors = {}
    for name, meta in model.state_dict().items():
        w = weights[name]
        w = w if isinstance(w, StreamedTensor) else StreamedTensor.of(w)
        tensors[name] = StreamedTensor(w.shape, meta.dtype, w.blocks)
    tmp = f"{out_dir}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        os.makedirs(tmp)
        write_safetensors(tmp, tensors, max_shard_size)
        model.config.dtype = str(dtype).split(".")[1]  # what save_pretrained records
        model.config.architectures = [type(model).__name__]
        model.config.save_pretrained(tmp)
        if model.can_generate():
            model.generation_config.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        for name in MODELING_FILES:
            shutil.copyfile(os.path.join(MODELING_DIR, name), os.path.join(tmp, name))
        with open(os.path.join(tmp, "README.md"), "w") as f:
            f.write(model_card(model, model_cfg, card_info or {}, tokenizer))
        if os.path.exists(out_dir):
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("exported %s (%s) to %s", MAIN_CLASS[model_cfg.family], model_cfg.family, out_dir)
    return out_dir
