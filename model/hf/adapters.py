"""One adapter per Hugging Face model family: how its config.json and weight names map onto our
ModelConfig and megatron-core's (TP=1) parameter names. Everything here is a table; the code that
applies the tables is in `init_from.py`.

Megatron names are *canonical*: an FFN wrapped by a PKM "add" layer (`mlp.mlp.linear_fc1`) is written
`mlp.linear_fc1`. `{i}` stands for the layer index. HF names are relative to the base model (the
`bert.` / `transformer.` / `model.` prefix is stripped); task heads keep their full names.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

# How the HF tensors of one rule become the megatron tensor (see init_from.CONVERT):
#   copy       one tensor, as is
#   transpose  GPT-2's Conv1D stores [in, out]; megatron's Linear is [out, in]
#   qkv        separate q, k, v projections -> megatron's fused linear_qkv, grouped per query group
#   qkv_fused  GPT-2's c_attn ([in, 3*out] = q|k|v) -> the same grouped layout
#   gate_up    Llama's gate_proj, up_proj -> megatron's gated linear_fc1 = [gate; up]


@dataclass(frozen=True)
class Rule:
    megatron: str
    hf: tuple[str, ...]
    convert: str = "copy"
    head: bool = False  # part of a task head: a base-model checkpoint may lack it (left freshly initialised)
    vocab: bool = False  # rows are vocabulary entries: padded with zero rows to the model's vocabulary
    tied: bool = False  # duplicates the input embedding when the model ties them: then not loaded


def R(megatron: str, *hf: str, **kw) -> Rule:
    return Rule(megatron, tuple(hf), **kw)


@dataclass(frozen=True)
class ConfigField:
    """ModelConfig field <- the first of `hf` keys present in config.json ("a.b" = nested)."""

    field: str
    hf: tuple[str, ...]
    default: Any = None
    required: bool = True


def F(name: str, *hf: str, default: Any = None, required: bool = True) -> ConfigField:
    return ConfigField(name, tuple(hf), default, required)


# ModelConfig field -> its key in transformers' PretrainedConfig, which every family's config.json uses.
_STANDARD_KEYS = {
    "hidden_size": "hidden_size",
    "num_layers": "num_hidden_layers",
    "num_attention_heads": "num_attention_heads",
    "max_position_embeddings": "max_position_embeddings",
    "vocab_size": "vocab_size",
}


def _standard_fields(tie_default: bool, **older_keys: str) -> tuple[ConfigField, ...]:
    """The fields under their standard keys (required), each looked up first under the family's older key
    where it has one (GPT-2 writes n_embd, n_layer, ...); and whether the output embeddings are tied."""
    return (
        *(
            F(field, *([older_keys[field]] if field in older_keys else []), key)
            for field, key in _STANDARD_KEYS.items()
        ),
        F("tie_embeddings", "tie_word_embeddings", default=tie_default, required=False),
    )


@dataclass(frozen=True)
class Requirement:
    """config.json key that must hold one of `allowed` values (our model cannot represent others)."""

    hf: str
    allowed: tuple[Any, ...]
    default: Any = None  # value assumed when the key is absent


@dataclass(frozen=True)
class Adapter:
    name: str
    model_types: tuple[str, ...]
    base_prefixes: tuple[str, ...]
    fixed: dict  # ModelConfig fields with one value for the family
    fields: tuple[ConfigField, ...]
    requirements: tuple[Requirement, ...]
    activations: dict  # HF activation name -> ModelConfig.activation
    activation_key: str
    rules: tuple[Rule, ...]
    ignore: tuple[str, ...] = ()  # regexes of HF names that hold buffers, not weights
    derived: Callable[[dict, set], dict] | None = None  # fields derived from config + weight names


def _exactly(**values) -> tuple[Requirement, ...]:
    """Requirements that each config.json key hold exactly its value (also assumed when the key is absent)."""
    return tuple(Requirement(key, (value,), value) for key, value in values.items())


# What BERT and GPT-2 share with the original Transformer: LayerNorm, learned positions, biases everywhere.
_CLASSIC = {
    "normalization": "LayerNorm",
    "position_embedding": "learned_absolute",
    "add_bias_linear": True,
    "qkv_bias": None,
}
# HF's GELU names: exact erf GELU, and the tanh approximation under its two names.
_GELUS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}


def _bert_derived(hf_cfg: dict, names: set) -> dict:
    # Keep the pretrained pooler (dense + tanh on [CLS]): classification heads start from it.
    return {"binary_head": "pooler.dense.weight" in names}


BERT = Adapter(
    name="bert",
    model_types=("bert",),
    base_prefixes=("bert.",),
    fixed={"family": "bert", "norm_position": "post", **_CLASSIC},
    fields=(
        *_standard_fields(tie_default=True),
        F("ffn_hidden_size", "intermediate_size"),
        F("layernorm_epsilon", "layer_norm_eps", default=1e-12, required=False),
    ),
    # type_vocab_size: megatron's BertModel has 2 token types
    requirements=_exactly(
        type_vocab_size=2, position_embedding_type="absolute", is_decoder=False, add_cross_attention=False
    ),
    activations=_GELUS,
    activation_key="hidden_act",
    rules=(
        R("embedding.word_embeddings.weight", "embeddings.word_embeddings.weight", vocab=True),
        R("embedding.position_embeddings.weight", "embeddings.position_embeddings.weight"),
        R("embedding.tokentype_embeddings.weight", "embeddings.token_type_embeddings.weight"),
        R("embedding.embedding_dropout.layernorm.weight", "embeddings.LayerNorm.weight"),
        R("embedding.embedding_dropout.layernorm.bias", "embeddings.LayerNorm.bias"),
        R(
            "encoder.layers.{i}.self_attention.linear_qkv.weight",
            "encoder.layer.{i}.attention.self.query.weight",
            "encoder.layer.{i}.attention.self.key.weight",
            "encoder.layer.{i}.attention.self.value.weight",
            convert="qkv",
        ),
        R(
            "encoder.layers.{i}.self_attention.linear_qkv.bias",
            "encoder.layer.{i}.attention.self.query.bias",
            "encoder.layer.{i}.attention.self.key.bias",
            "encoder.layer.{i}.attention.self.value.bias",
            convert="qkv",
        ),
        R("encoder.layers.{i}.self_attention.linear_proj.weight", "encoder.layer.{i}.attention.output.dense.weight"),
        R("encoder.layers.{i}.self_attention.linear_proj.bias", "encoder.layer.{i}.attention.output.dense.bias"),
        R("encoder.layers.{i}.self_attn_bda.layernorm.weight", "encoder.layer.{i}.attention.output.LayerNorm.weight"),
        R("encoder.layers.{i}.self_attn_bda.layernorm.bias", "encoder.layer.{i}.attention.output.LayerNorm.bias"),
        R("encoder.layers.{i}.mlp.linear_fc1.weight", "encoder.layer.{i}.intermediate.dense.weight"),
        R("encoder.layers.{i}.mlp.linear_fc1.bias", "encoder.layer.{i}.intermediate.dense.bias"),
        R("encoder.layers.{i}.mlp.linear_fc2.weight", "encoder.layer.{i}.output.dense.weight"),
        R("encoder.layers.{i}.mlp.linear_fc2.bias", "encoder.layer.{i}.output.dense.bias"),
        R("encoder.layers.{i}.mlp_bda.layernorm.weight", "encoder.layer.{i}.output.LayerNorm.weight"),
        R("encoder.layers.{i}.mlp_bda.layernorm.bias", "encoder.layer.{i}.output.LayerNorm.bias"),
        # Heads: the MLM transform + decoder bias, the pooler and the next-sentence classifier.
        R("lm_head.dense.weight", "cls.predictions.transform.dense.weight", head=True),
        R("lm_head.dense.bias", "cls.predictions.transform.dense.bias", head=True),
        R("lm_head.layer_norm.weight", "cls.predictions.transform.LayerNorm.weight", head=True),
        R("lm_head.layer_norm.bias", "cls.predictions.transform.LayerNorm.bias", head=True),
        R("output_layer.bias", "cls.predictions.bias", head=True, vocab=True),
        R("output_layer.weight", "cls.predictions.decoder.weight", head=True, vocab=True, tied=True),
        R("pooler.dense.weight", "pooler.dense.weight", head=True),
        R("pooler.dense.bias", "pooler.dense.bias", head=True),
        R("binary_head.weight", "cls.seq_relationship.weight", head=True),
        R("binary_head.bias", "cls.seq_relationship.bias", head=True),
    ),
    # position_ids: a buffer; cls.predictions.decoder.bias: the same tensor as cls.predictions.bias.
    ignore=(r"embeddings\.position_ids", r"cls\.predictions\.decoder\.bias"),
    derived=_bert_derived,
)

GPT2 = Adapter(
    name="gpt2",
    model_types=("gpt2",),
    base_prefixes=("transformer.",),
    fixed={"family": "gpt", "norm_position": "pre", **_CLASSIC},
    fields=(
        *_standard_fields(
            tie_default=True,
            hidden_size="n_embd",
            num_layers="n_layer",
            num_attention_heads="n_head",
            max_position_embeddings="n_positions",
        ),
        F("ffn_hidden_size", "n_inner", default=None, required=False),
        F("layernorm_epsilon", "layer_norm_epsilon", default=1e-5, required=False),
    ),
    requirements=_exactly(scale_attn_weights=True, scale_attn_by_inverse_layer_idx=False, add_cross_attention=False),
    activations=_GELUS,
    activation_key="activation_function",
    rules=(
        R("embedding.word_embeddings.weight", "wte.weight", vocab=True),
        R("embedding.position_embeddings.weight", "wpe.weight"),
        R("decoder.layers.{i}.input_layernorm.weight", "h.{i}.ln_1.weight"),
        R("decoder.layers.{i}.input_layernorm.bias", "h.{i}.ln_1.bias"),
        R("decoder.layers.{i}.self_attention.linear_qkv.weight", "h.{i}.attn.c_attn.weight", convert="qkv_fused"),
        R("decoder.layers.{i}.self_attention.linear_qkv.bias", "h.{i}.attn.c_attn.bias", convert="qkv_fused"),
        R("decoder.layers.{i}.self_attention.linear_proj.weight", "h.{i}.attn.c_proj.weight", convert="transpose"),
        R("decoder.layers.{i}.self_attention.linear_proj.bias", "h.{i}.attn.c_proj.bias"),
        R("decoder.layers.{i}.pre_mlp_layernorm.weight", "h.{i}.ln_2.weight"),
        R("decoder.layers.{i}.pre_mlp_layernorm.bias", "h.{i}.ln_2.bias"),
        R("decoder.layers.{i}.mlp.linear_fc1.weight", "h.{i}.mlp.c_fc.weight", convert="transpose"),
        R("decoder.layers.{i}.mlp.linear_fc1.bias", "h.{i}.mlp.c_fc.bias"),
        R("decoder.layers.{i}.mlp.linear_fc2.weight", "h.{i}.mlp.c_proj.weight", convert="transpose"),
        R("decoder.layers.{i}.mlp.linear_fc2.bias", "h.{i}.mlp.c_proj.bias"),
        R("decoder.final_layernorm.weight", "ln_f.weight"),
        R("decoder.final_layernorm.bias", "ln_f.bias"),
        R("output_layer.weight", "lm_head.weight", head=True, vocab=True, tied=True),
    ),
    ignore=(r"h\.\d+\.attn\.bias", r"h\.\d+\.attn\.masked_bias"),
)


def _llama_derived(hf_cfg: dict, names: set) -> dict:
    # HF Llama: attention_bias covers q, k, v and o; mlp_bias gate, up, down. megatron: add_qkv_bias covers
    # q, k, v; add_bias_linear covers o and the MLP. Representable when both flags agree.
    attn, mlp = bool(hf_cfg.get("attention_bias", False)), bool(hf_cfg.get("mlp_bias", False))
    if attn != mlp:
        from model.errors import ModelError

        raise ModelError(
            f"config.json: attention_bias={attn} with mlp_bias={mlp} has no megatron-core "
            "equivalent (its output-projection bias follows the MLP's)"
        )
    return {}


LLAMA = Adapter(
    name="llama",
    model_types=("llama",),
    base_prefixes=("model.",),
    fixed={"family": "gpt", "normalization": "RMSNorm", "norm_position": "pre", "position_embedding": "rope"},
    fields=(
        *_standard_fields(tie_default=False),
        F("num_query_groups", "num_key_value_heads", default=None, required=False),
        F("ffn_hidden_size", "intermediate_size"),
        F("layernorm_epsilon", "rms_norm_eps", default=1e-6, required=False),
        F("rotary_base", "rope_parameters.rope_theta", "rope_theta", default=10000, required=False),
        F("add_bias_linear", "mlp_bias", default=False, required=False),
        F("qkv_bias", "attention_bias", default=False, required=False),
    ),
    requirements=(
        Requirement("rope_scaling", (None,), None),
        Requirement("rope_parameters.rope_type", ("default",), "default"),
        Requirement("pretraining_tp", (1,), 1),
    ),
    activations={"silu": "swiglu"},
    activation_key="hidden_act",
    rules=(
        R("embedding.word_embeddings.weight", "embed_tokens.weight", vocab=True),
        R("decoder.layers.{i}.input_layernorm.weight", "layers.{i}.input_layernorm.weight"),
        R(
            "decoder.layers.{i}.self_attention.linear_qkv.weight",
            "layers.{i}.self_attn.q_proj.weight",
            "layers.{i}.self_attn.k_proj.weight",
            "layers.{i}.self_attn.v_proj.weight",
            convert="qkv",
        ),
        R(
            "decoder.layers.{i}.self_attention.linear_qkv.bias",
            "layers.{i}.self_attn.q_proj.bias",
            "layers.{i}.self_attn.k_proj.bias",
            "layers.{i}.self_attn.v_proj.bias",
            convert="qkv",
        ),
        R("decoder.layers.{i}.self_attention.linear_proj.weight", "layers.{i}.self_attn.o_proj.weight"),
        R("decoder.layers.{i}.self_attention.linear_proj.bias", "layers.{i}.self_attn.o_proj.bias"),
        R("decoder.layers.{i}.pre_mlp_layernorm.weight", "layers.{i}.post_attention_layernorm.weight"),
        R(
            "decoder.layers.{i}.mlp.linear_fc1.weight",
            "layers.{i}.mlp.gate_proj.weight",
            "layers.{i}.mlp.up_proj.weight",
            convert="gate_up",
        ),
        R(
            "decoder.layers.{i}.mlp.linear_fc1.bias",
            "layers.{i}.mlp.gate_proj.bias",
            "layers.{i}.mlp.up_proj.bias",
            convert="gate_up",
        ),
        R("decoder.layers.{i}.mlp.linear_fc2.weight", "layers.{i}.mlp.down_proj.weight"),
        R("decoder.layers.{i}.mlp.linear_fc2.bias", "layers.{i}.mlp.down_proj.bias"),
        R("decoder.final_layernorm.weight", "norm.weight"),
        R("output_layer.weight", "lm_head.weight", head=True, vocab=True, tied=True),
    ),
    ignore=(r"layers\.\d+\.self_attn\.rotary_emb\.inv_freq", r"rotary_emb\.inv_freq"),
    derived=_llama_derived,
)

ADAPTERS: dict[str, Adapter] = {t: a for a in (BERT, GPT2, LLAMA) for t in a.model_types}
