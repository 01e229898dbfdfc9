"""Model and PKM configuration (plain dataclasses; no torch import so launchers can read them).

Every number declares its range next to it (`metadata={"ge": 1}`: >=, "gt": >, "le": <=, "lt": <);
`pretrain.config.validate` checks them all at load, with an error naming the key."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

# ModelConfig fields that describe the architecture: a model built with other values cannot take the weights
# (of an HF checkpoint: model/hf/init_from.py; of a checkpoint resumed: pretrain/checkpoint.py).
ARCH_FIELDS = (
    "family",
    "hidden_size",
    "num_layers",
    "num_attention_heads",
    "num_query_groups",
    "ffn_hidden_size",
    "normalization",
    "activation",
    "position_embedding",
    "rotary_base",
    "add_bias_linear",
    "qkv_bias",
    "tie_embeddings",
    "layernorm_epsilon",
    "norm_position",
    "binary_head",
    "max_position_embeddings",
)
# PKMConfig fields the memory's tensors are laid out by (which layers have one, beside or instead of the FFN)
PKM_ARCH_FIELDS = ("layers", "placement", "n_keys", "heads", "k_dim", "query_batchnorm", "query_layernorm")


@dataclass
class PKMConfig:
    """A product-key memory (Lample et al. 2019) and where it sits (Kim & Jung 2020)."""

    layers: list[int] = field(default_factory=list, metadata={"ge": 0})  # 0-based transformer layer indices
    placement: Literal["add", "replace"] = "add"  # add: FFN(x) + PKM(x); replace: PKM(x) only
    n_keys: int = field(default=512, metadata={"ge": 1})  # sub-keys per half; the table has n_keys**2 slots
    heads: int = field(default=4, metadata={"ge": 1})
    knn: int = field(default=32, metadata={"ge": 1})
    k_dim: int = field(default=256, metadata={"ge": 2})  # query/key dimension (each half has k_dim // 2)
    query_batchnorm: bool = True  # statistics over non-padded tokens only
    query_layernorm: bool = False
    input_dropout: float = field(default=0.0, metadata={"ge": 0.0, "lt": 1.0})
    query_dropout: float = field(default=0.0, metadata={"ge": 0.0, "lt": 1.0})
    value_dropout: float = field(default=0.0, metadata={"ge": 0.0, "lt": 1.0})
    value_lr: float = field(
        default=1e-3, metadata={"ge": 0.0}
    )  # constant, no weight decay (as XLM's mem_values_optimizer)
    # The value tables' sparse optimizer (pretrain/optim.py): "adam" (XLM's lazy Adam, two fp32 moments per
    # value: 12 bytes per value parameter), "rowwise_adagrad" (one fp32 scalar per row: ~4 bytes),
    # "rowwise_adam" (per-value first moment, per-row second moment: ~8 bytes).
    value_optimizer: Literal["adam", "rowwise_adagrad", "rowwise_adam"] = "adam"
    # Storage of the value tables (model/precision.py): bf16 halves the table; updates are computed in
    # fp32 and stochastically rounded. Needs a row-wise value_optimizer.
    value_dtype: Literal["fp32", "bf16"] = "fp32"

    @property
    def slots(self) -> int:
        return self.n_keys * self.n_keys


@dataclass
class ModelConfig:
    family: Literal["gpt", "bert"] = "gpt"
    num_layers: int = field(default=4, metadata={"ge": 1})
    hidden_size: int = field(default=256, metadata={"ge": 1})
    num_attention_heads: int = field(default=4, metadata={"ge": 1})
    num_query_groups: int | None = field(
        default=None, metadata={"ge": 1}
    )  # grouped-query attention (Llama); None = MHA
    ffn_hidden_size: int | None = field(default=None, metadata={"ge": 1})  # None = 4 * hidden_size
    seq_length: int = field(default=128, metadata={"ge": 2})
    max_position_embeddings: int | None = field(default=None, metadata={"ge": 2})  # None = seq_length
    vocab_size: int | None = field(default=None, metadata={"ge": 1})  # None = the tokenizer's
    normalization: Literal["LayerNorm", "RMSNorm"] = "LayerNorm"
    activation: Literal["gelu", "gelu_tanh", "swiglu"] = "gelu"  # gelu_tanh: GPT-2's "gelu_new"
    position_embedding: Literal["learned_absolute", "rope"] = "learned_absolute"
    rotary_base: int = field(default=10000, metadata={"gt": 0})
    add_bias_linear: bool = True
    qkv_bias: bool | None = None  # None = add_bias_linear
    tie_embeddings: bool = True
    layernorm_epsilon: float = field(default=1e-5, metadata={"gt": 0.0})
    hidden_dropout: float = field(default=0.0, metadata={"ge": 0.0, "lt": 1.0})
    attention_dropout: float = field(default=0.0, metadata={"ge": 0.0, "lt": 1.0})
    init_method_std: float = field(default=0.02, metadata={"gt": 0.0})
    pkm: PKMConfig = field(default_factory=PKMConfig)
    # "post": a LayerNorm after each residual add and one on the embeddings, none at the end (the
    # original BERT, needed to initialise from HF BERT checkpoints); "pre": megatron's layout. BERT only.
    norm_position: Literal["pre", "post"] = "pre"
    binary_head: bool = False  # BERT: megatron's pooler (dense + tanh on [CLS]) and 2-way binary head
