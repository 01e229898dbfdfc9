"""Post-LayerNorm BERT (Devlin et al. 2019; HF `BertModel`) out of megatron-core modules, as specs.

megatron-core's TransformerLayer is pre-LN: `x + Attn(LN(x))`, `x + MLP(LN(x))`, and a final LN after the
last layer. The original BERT normalises *after* each residual add and once on the embeddings:
`x = LN_emb(emb)`, `h = LN1(x + Attn(x))`, `out = LN2(h + MLP(h))`, with no final LN.

Without forking TransformerLayer:
  - `input_layernorm` and `pre_mlp_layernorm` are `IdentityOp`;
  - `self_attn_bda` and `mlp_bda` are `PostNormBiasDropoutAdd`: megatron's own bias-dropout-add
    followed by a LayerNorm (the layer calls `bda(training, fused)(out_with_bias, residual, p)`);
  - the block's final norm is `IdentityOp`;
  - the embedding LayerNorm goes where megatron applies embedding dropout: `embedding.embedding_dropout`
    becomes `EmbeddingNormDropout` = dropout(LN(x)), the order HF BERT uses.
State-dict names: `...self_attn_bda.layernorm.*`, `...mlp_bda.layernorm.*`,
`embedding.embedding_dropout.layernorm.*`.
"""

from __future__ import annotations

import copy

import torch
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.spec_utils import ModuleSpec


class PostNormBiasDropoutAdd(torch.nn.Module):
    """bias-dropout-add, then LayerNorm of the sum (the residual stream is the normalised output)."""

    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.layernorm = torch.nn.LayerNorm(hidden_size, eps=eps)

    def forward(self, training: bool, fused: bool):
        bda = get_bias_dropout_add(training, fused)

        def bda_then_norm(x_with_bias, residual, prob):
            return self.layernorm(bda(x_with_bias, residual, prob))

        return bda_then_norm


class EmbeddingNormDropout(torch.nn.Module):
    """Replaces LanguageModelEmbedding.embedding_dropout: LayerNorm, then the original dropout."""

    def __init__(self, hidden_size: int, eps: float, dropout: torch.nn.Module):
        super().__init__()
        self.layernorm = torch.nn.LayerNorm(hidden_size, eps=eps)
        self.dropout = dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.layernorm(x))


def post_norm_layer_spec(pre_norm_spec: ModuleSpec, hidden_size: int, eps: float) -> ModuleSpec:
    """The post-LN version of a (pre-LN) megatron-core layer spec."""
    spec = copy.deepcopy(pre_norm_spec)
    sub = spec.submodules
    sub.input_layernorm = IdentityOp
    sub.pre_mlp_layernorm = IdentityOp
    bda = ModuleSpec(module=PostNormBiasDropoutAdd, params={"hidden_size": hidden_size, "eps": eps})
    sub.self_attn_bda = bda
    sub.mlp_bda = copy.deepcopy(bda)
    return spec


def add_embedding_norm(embedding: torch.nn.Module, hidden_size: int, eps: float) -> None:
    """Give a megatron LanguageModelEmbedding BERT's embedding LayerNorm (before its dropout)."""
    embedding.embedding_dropout = EmbeddingNormDropout(hidden_size, eps, embedding.embedding_dropout)
