"""Model and PKM configuration (plain dataclasses; no torch import so launchers can read them)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional


@dataclass
class PKMConfig:
    """A product-key memory (Lample et al. 2019) and where it sits (Kim & Jung 2020)."""

    layers: list[int] = field(default_factory=list)  # 0-based transformer layer indices
    placement: Literal["add", "replace"] = "add"  # add: FFN(x) + PKM(x); replace: PKM(x) only
    n_keys: int = 512  # sub-keys per half; the table has n_keys**2 slots
    heads: int = 4
    knn: int = 32
    k_dim: int = 256  # query/key dimension (each half has k_dim // 2)
    query_batchnorm: bool = True  # statistics over non-padded tokens only
    query_layernorm: bool = False
    input_dropout: float = 0.0
    query_dropout: float = 0.0
    value_dropout: float = 0.0
    value_lr: float = 1e-3  # constant, no weight decay (as XLM's mem_values_optimizer)

    @property
    def slots(self) -> int:
        return self.n_keys * self.n_keys


@dataclass
class ModelConfig:
    family: Literal["gpt", "bert"] = "gpt"
    num_layers: int = 4
    hidden_size: int = 256
    num_attention_heads: int = 4
    num_query_groups: Optional[int] = None  # grouped-query attention (Llama); None = MHA
    ffn_hidden_size: Optional[int] = None  # None = 4 * hidden_size
    seq_length: int = 128
    max_position_embeddings: Optional[int] = None  # None = seq_length
    vocab_size: Optional[int] = None  # None = the tokenizer's
    normalization: Literal["LayerNorm", "RMSNorm"] = "LayerNorm"
    activation: Literal["gelu", "gelu_tanh", "swiglu"] = "gelu"  # gelu_tanh: GPT-2's "gelu_new"
    position_embedding: Literal["learned_absolute", "rope"] = "learned_absolute"
    rotary_base: int = 10000
    add_bias_linear: bool = True
    qkv_bias: Optional[bool] = None  # None = add_bias_linear
    tie_embeddings: bool = True
    layernorm_epsilon: float = 1e-5
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    init_method_std: float = 0.02
    pkm: PKMConfig = field(default_factory=PKMConfig)
    # "post": a LayerNorm after each residual add and one on the embeddings, none at the end (the
    # original BERT, needed to initialise from HF BERT checkpoints); "pre": megatron's layout. BERT only.
    norm_position: Literal["pre", "post"] = "pre"
    binary_head: bool = False  # BERT: megatron's pooler (dense + tanh on [CLS]) and 2-way binary head
