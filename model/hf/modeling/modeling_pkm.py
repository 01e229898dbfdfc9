# PKM-GPT and PKM-BERT: transformer language models with Product Key Memory layers (Lample et al. 2019,
# placed as in Kim & Jung 2020), exported by pkm-pretrain. Self-contained: torch + transformers only.
#
# The layer layout mirrors the megatron-core model the weights were trained in, so the export is a renaming:
# fused `linear_qkv` rows grouped per query group ([q heads of group g; k_g; v_g] for each g), gated
# `linear_fc1` = [gate; up], pre- or post-LayerNorm blocks, learned or rotary positions.
#
# Each memory is a `ProductKeyMemory`: a query network, product keys [heads, 2, n_keys, k_dim/2], and a value
# table `self.values = nn.EmbeddingBag(n_keys**2, dim, mode="sum")` (bf16 when config.pkm["value_dtype"] is "bf16")
# read with `per_sample_weights` (the softmax over the knn best keys of each head). After each forward,
# `self.last_indices` holds the slots read: LongTensor [tokens, heads * knn], tokens in (batch, position) order.
import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import (
    BaseModelOutputWithPast,
    CausalLMOutputWithPast,
    MaskedLMOutput,
    QuestionAnsweringModelOutput,
    SequenceClassifierOutput,
)

from .configuration_pkm import PKMBertConfig, PKMGPTConfig

try:  # transformers >= 5: init functions that leave already-loaded weights alone
    from transformers import initialization as init
except ImportError:  # transformers 4
    from torch.nn import init


# --------------------------------------------------------------------------------------------------------
# Product Key Memory


def product_key_topk(query, keys, knn):
    """query [N, heads, k_dim], keys [heads, 2, n_keys, k_dim/2] -> (scores, slot ids) [N, heads, knn].
    Exact top-knn over the n_keys**2 concatenated keys from the top-knn of each half."""
    n, heads, k_dim = query.shape
    half, n_keys = k_dim // 2, keys.shape[2]
    q = query.reshape(n, heads * 2, half).transpose(0, 1)
    k = keys.reshape(heads * 2, n_keys, half).transpose(1, 2)
    sub = torch.bmm(q, k).view(heads, 2, n, n_keys)
    s1, i1 = sub[:, 0].topk(knn, dim=-1)
    s2, i2 = sub[:, 1].topk(knn, dim=-1)
    all_scores = (s1.unsqueeze(-1) + s2.unsqueeze(-2)).view(heads, n, knn * knn)
    all_ids = (i1.unsqueeze(-1) * n_keys + i2.unsqueeze(-2)).view(heads, n, knn * knn)
    scores, best = all_scores.topk(knn, dim=-1)
    return scores.transpose(0, 1), all_ids.gather(-1, best).transpose(0, 1)


class MaskedBatchNorm(nn.Module):
    """BatchNorm1d over the query features whose batch statistics come from real (non-padding) tokens."""

    def __init__(self, num_features, eps=1e-5, momentum=0.1):
        super().__init__()
        self.eps, self.momentum = eps, momentum
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def forward(self, x, keep=None):
        if not self.training:
            mean, var = self.running_mean, self.running_var
        else:
            xs = x if keep is None else x[keep]
            xs = xs.to(torch.promote_types(xs.dtype, torch.float32))
            count = max(xs.shape[0], 1)
            mean = xs.sum(0) / count
            var = ((xs * xs).sum(0) / count - mean * mean).clamp_min(0.0)
            with torch.no_grad():
                unbiased = var * (count / max(count - 1, 1))
                self.running_mean.lerp_(mean.to(self.running_mean.dtype), self.momentum)
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), self.momentum)
        y = (x - mean.to(x.dtype)) * torch.rsqrt(var.to(x.dtype) + self.eps) * self.weight + self.bias
        if keep is not None:
            y = y * keep.unsqueeze(1).to(y.dtype)
        return y


class ProductKeyMemory(nn.Module):
    """x [..., dim] -> sum over heads of the softmax-weighted value rows of the knn best product keys."""

    def __init__(self, dim, pkm):
        super().__init__()
        self.dim = dim
        self.heads, self.knn, self.k_dim, self.n_keys = pkm["heads"], pkm["knn"], pkm["k_dim"], pkm["n_keys"]
        self.input_dropout, self.query_dropout = pkm["input_dropout"], pkm["query_dropout"]
        self.value_dropout = pkm["value_dropout"]
        self.query_proj = nn.Linear(dim, self.heads * self.k_dim, bias=True)
        self.query_batchnorm = (
            MaskedBatchNorm(self.heads * self.k_dim, pkm["batchnorm_eps"], pkm["batchnorm_momentum"])
            if pkm["query_batchnorm"]
            else None
        )
        self.query_layernorm = nn.LayerNorm(self.k_dim) if pkm["query_layernorm"] else None
        bound = 1.0 / math.sqrt(self.k_dim // 2)
        self.keys = nn.Parameter(torch.empty(self.heads, 2, self.n_keys, self.k_dim // 2).uniform_(-bound, bound))
        table_dtype = torch.bfloat16 if pkm.get("value_dtype") == "bf16" else None  # None: the model's dtype
        self.values = nn.EmbeddingBag(self.n_keys**2, dim, mode="sum", dtype=table_dtype)
        nn.init.normal_(self.values.weight, 0.0, dim**-0.5)
        self.last_indices: torch.Tensor | None = None

    def forward(self, x, keep=None):
        """keep: bool [...] (True = real token) keeps padding out of the BatchNorm statistics."""
        shape = x.shape
        x = x.reshape(-1, self.dim)
        keep = None if keep is None else keep.reshape(-1).to(torch.bool)
        n = x.shape[0]
        x = F.dropout(x, self.input_dropout, self.training)
        q = self.query_proj(x)
        if self.query_batchnorm is not None:
            q = self.query_batchnorm(q, keep)
        q = q.view(n, self.heads, self.k_dim)
        if self.query_layernorm is not None:
            q = self.query_layernorm(q)
        q = F.dropout(q, self.query_dropout, self.training)
        scores, indices = product_key_topk(q, self.keys, self.knn)
        weights = F.softmax(scores, dim=-1, dtype=torch.promote_types(scores.dtype, torch.float32)).to(x.dtype)
        indices, weights = indices.reshape(n, -1), weights.reshape(n, -1)
        self.last_indices = indices.detach()
        if weights.dtype != self.values.weight.dtype:  # a bf16 table is read with bf16 weights, as in training
            out = self.values(indices, per_sample_weights=weights.to(self.values.weight.dtype)).to(x.dtype)
        else:
            out = self.values(indices, per_sample_weights=weights)
        out = F.dropout(out, self.value_dropout, self.training)
        return out.view(shape)


# --------------------------------------------------------------------------------------------------------
# Transformer pieces (megatron-core layout)


def _norm(config):
    if config.normalization == "RMSNorm":
        return nn.RMSNorm(config.hidden_size, eps=config.layer_norm_eps)
    return nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)


def _activation(name):
    return {"gelu": F.gelu, "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"), "swiglu": F.silu}[name]


def rotary_cos_sin(positions, head_dim, base, dtype):
    """positions [b, s] -> cos, sin [b, 1, s, head_dim] (halves layout: rotate_half pairs i and i + d/2)."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=positions.device) / head_dim))
    freqs = positions.float().unsqueeze(-1) * inv_freq
    emb = torch.cat([freqs, freqs], dim=-1).unsqueeze(1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


class SelfAttention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.layer_idx = layer_idx
        self.heads, self.groups = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.hidden_size // self.heads
        self.dropout = config.attention_dropout
        qkv_out = (self.heads + 2 * self.groups) * self.head_dim
        self.linear_qkv = nn.Linear(config.hidden_size, qkv_out, bias=config.qkv_bias)
        self.linear_proj = nn.Linear(self.heads * self.head_dim, config.hidden_size, bias=config.add_bias_linear)

    def forward(self, x, attn_bias, rotary=None, cache=None):
        b, s, _ = x.shape
        per_group = self.heads // self.groups
        qkv = self.linear_qkv(x).view(b, s, self.groups, (per_group + 2) * self.head_dim)
        q, k, v = qkv.split([per_group * self.head_dim, self.head_dim, self.head_dim], dim=-1)
        q = q.reshape(b, s, self.heads, self.head_dim).transpose(1, 2)
        k = k.transpose(1, 2)
        v = v.transpose(1, 2)
        if rotary is not None:
            cos, sin = rotary
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        if per_group > 1:
            k = k.repeat_interleave(per_group, dim=1)
            v = v.repeat_interleave(per_group, dim=1)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_bias, dropout_p=self.dropout if self.training else 0.0
        )
        return self.linear_proj(out.transpose(1, 2).reshape(b, s, self.heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.gated = config.activation == "swiglu"
        self.act = _activation(config.activation)
        width = config.intermediate_size * (2 if self.gated else 1)
        self.linear_fc1 = nn.Linear(config.hidden_size, width, bias=config.add_bias_linear)
        self.linear_fc2 = nn.Linear(config.intermediate_size, config.hidden_size, bias=config.add_bias_linear)

    def forward(self, x, keep=None):
        y = self.linear_fc1(x)
        if self.gated:
            gate, up = y.chunk(2, dim=-1)
            y = self.act(gate) * up
        else:
            y = self.act(y)
        return self.linear_fc2(y)


class MLPWithMemory(nn.Module):
    """FFN(x) + PKM(x) (Kim & Jung's residual memory)."""

    def __init__(self, config):
        super().__init__()
        self.mlp = MLP(config)
        self.memory = ProductKeyMemory(config.hidden_size, config.pkm)

    def forward(self, x, keep=None):
        return self.mlp(x) + self.memory(x, keep)


class MemoryMLP(nn.Module):
    """PKM(x) in place of the FFN."""

    def __init__(self, config):
        super().__init__()
        self.memory = ProductKeyMemory(config.hidden_size, config.pkm)

    def forward(self, x, keep=None):
        return self.memory(x, keep)


class TransformerLayer(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.post_norm = config.norm_position == "post"
        self.dropout = config.hidden_dropout
        if not self.post_norm:
            self.input_layernorm = _norm(config)
        self.self_attention = SelfAttention(config, layer_idx)
        if self.post_norm:
            self.post_attention_layernorm = _norm(config)
        else:
            self.pre_mlp_layernorm = _norm(config)
        pkm = config.pkm
        if layer_idx in pkm["layers"]:
            self.mlp = MLPWithMemory(config) if pkm["placement"] == "add" else MemoryMLP(config)
        else:
            self.mlp = MLP(config)
        if self.post_norm:
            self.post_mlp_layernorm = _norm(config)

    def forward(self, x, attn_bias, rotary=None, cache=None, keep=None):
        drop = lambda t: F.dropout(t, self.dropout, self.training)  # noqa: E731
        if self.post_norm:
            x = self.post_attention_layernorm(x + drop(self.self_attention(x, attn_bias, rotary, cache)))
            return self.post_mlp_layernorm(x + drop(self.mlp(x, keep)))
        x = x + drop(self.self_attention(self.input_layernorm(x), attn_bias, rotary, cache))
        return x + drop(self.mlp(self.pre_mlp_layernorm(x), keep))


def attention_bias(mask, q_len, kv_len, causal, dtype, device):
    """Additive attention bias [b or 1, 1, q_len, kv_len]: -inf-like where a query may not look.
    mask: [b, kv_len] with 1 for real tokens (or None)."""
    allowed = torch.ones(q_len, kv_len, dtype=torch.bool, device=device)
    if causal:
        allowed = torch.tril(allowed, diagonal=kv_len - q_len)
    allowed = allowed[None, None]
    if mask is not None:
        allowed = allowed & mask[:, None, None, :].to(torch.bool)
    bias = torch.zeros(allowed.shape, dtype=dtype, device=device)
    return bias.masked_fill(~allowed, torch.finfo(dtype).min)


# --------------------------------------------------------------------------------------------------------
# Models


class PKMPreTrainedModel(PreTrainedModel):
    base_model_prefix = "model"
    supports_gradient_checkpointing = False
    _no_split_modules = ["TransformerLayer"]

    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.EmbeddingBag):  # PKM values: N(0, dim^-1/2) as XLM
            init.normal_(module.weight, mean=0.0, std=module.weight.shape[1] ** -0.5)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, (nn.LayerNorm, nn.RMSNorm, MaskedBatchNorm)):
            if module.weight is not None:
                init.ones_(module.weight)
            if getattr(module, "bias", None) is not None:
                init.zeros_(module.bias)
            if isinstance(module, MaskedBatchNorm):
                init.zeros_(module.running_mean)
                init.ones_(module.running_var)
        elif isinstance(module, ProductKeyMemory):
            bound = 1.0 / math.sqrt(module.k_dim // 2)
            init.uniform_(module.keys, -bound, bound)
        elif isinstance(module, BertLMHead):
            init.zeros_(module.bias)

    def memories(self):
        """(name, ProductKeyMemory) of every memory layer."""
        return [(n, m) for n, m in self.named_modules() if isinstance(m, ProductKeyMemory)]


class _Backbone(PKMPreTrainedModel):
    causal = True

    def __init__(self, config, add_pooling_layer=False):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        if config.position_embedding == "learned_absolute":
            self.embed_positions = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        if not self.causal:
            self.embed_token_types = nn.Embedding(config.type_vocab_size, config.hidden_size)
        if config.norm_position == "post":
            self.embed_norm = _norm(config)
        self.layers = nn.ModuleList([TransformerLayer(config, i) for i in range(config.num_hidden_layers)])
        if config.norm_position == "pre":
            self.final_layernorm = _norm(config)
        if add_pooling_layer:
            self.pooler = Pooler(config)
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        token_type_ids=None,
        position_ids=None,
        past_key_values=None,
        use_cache=None,
        inputs_embeds=None,
        **kwargs,
    ):
        config = self.config
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        b, s = x.shape[:2]
        past = past_key_values.get_seq_length() if past_key_values is not None else 0
        if position_ids is None:
            if attention_mask is not None and self.causal:  # left padding: count real tokens only
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)[:, -s:]
            else:
                position_ids = torch.arange(past, past + s, device=x.device).unsqueeze(0).expand(b, -1)
        if config.position_embedding == "learned_absolute":
            x = x + self.embed_positions(position_ids)
        if not self.causal:
            types = torch.zeros_like(position_ids) if token_type_ids is None else token_type_ids
            x = x + self.embed_token_types(types)
        if config.norm_position == "post":
            x = self.embed_norm(x)
        x = F.dropout(x, config.hidden_dropout, self.training)
        rotary = None
        if config.position_embedding == "rope":
            rotary = rotary_cos_sin(
                position_ids, config.hidden_size // config.num_attention_heads, config.rope_theta, x.dtype
            )
        bias = attention_bias(attention_mask, s, past + s, self.causal, x.dtype, x.device)
        keep = None if attention_mask is None else attention_mask[:, -s:].to(torch.bool)
        cache = past_key_values if (use_cache or past_key_values is not None) and self.causal else None
        for layer in self.layers:
            x = layer(x, bias, rotary, cache, keep)
        if config.norm_position == "pre":
            x = self.final_layernorm(x)
        return BaseModelOutputWithPast(last_hidden_state=x, past_key_values=cache)


class PKMGPTModel(_Backbone):
    config_class = PKMGPTConfig
    causal = True


class PKMBertModel(_Backbone):
    config_class = PKMBertConfig
    causal = False


class PKMGPTForCausalLM(PKMPreTrainedModel, GenerationMixin):
    config_class = PKMGPTConfig

    def __init__(self, config):
        super().__init__(config)
        self.model = PKMGPTModel(config)
        if not config.tie_embeddings:
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        past_key_values=None,
        inputs_embeds=None,
        labels=None,
        use_cache=None,
        logits_to_keep=0,
        **kwargs,
    ):
        if use_cache and past_key_values is None:
            from transformers.cache_utils import DynamicCache

            past_key_values = DynamicCache()
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            use_cache=use_cache,
            inputs_embeds=inputs_embeds,
        )
        h = out.last_hidden_state
        if logits_to_keep:
            h = h[:, -logits_to_keep:]
        weight = self.model.embed_tokens.weight if self.config.tie_embeddings else self.lm_head.weight
        logits = F.linear(h, weight)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1), ignore_index=-100
            )
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=out.past_key_values)


class Pooler(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, h):
        return torch.tanh(self.dense(h[:, 0]))


class BertLMHead(nn.Module):
    """dense -> GELU -> LayerNorm, then the (tied) output embedding and a bias."""

    def __init__(self, config):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        if not config.tie_embeddings:
            self.decoder = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))

    def forward(self, h, embedding_weight):
        h = self.layer_norm(F.gelu(self.dense(h)))
        weight = embedding_weight if not hasattr(self, "decoder") else self.decoder.weight
        return F.linear(h, weight) + self.bias


class PKMBertForMaskedLM(PKMPreTrainedModel):
    config_class = PKMBertConfig

    def __init__(self, config):
        super().__init__(config)
        self.model = PKMBertModel(config, add_pooling_layer=config.has_pooler)  # keep a trained pooler
        self.lm_head = BertLMHead(config)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, labels=None, **kwargs):
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
        logits = self.lm_head(out.last_hidden_state, self.model.embed_tokens.weight)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=-100)
        return MaskedLMOutput(loss=loss, logits=logits, hidden_states=(out.last_hidden_state,))


class PKMBertForSequenceClassification(PKMPreTrainedModel):
    config_class = PKMBertConfig

    def __init__(self, config):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.model = PKMBertModel(config, add_pooling_layer=True)
        self.dropout = nn.Dropout(config.classifier_dropout)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, labels=None, **kwargs):
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
        logits = self.classifier(self.dropout(self.model.pooler(out.last_hidden_state)))
        loss = None
        if labels is not None:
            if self.config.problem_type == "regression" or self.num_labels == 1:
                loss = F.mse_loss(logits.squeeze(-1).float(), labels.float())
            elif self.config.problem_type == "multi_label_classification":
                loss = F.binary_cross_entropy_with_logits(logits.float(), labels.float())
            else:
                loss = F.cross_entropy(logits.float(), labels.view(-1))
        return SequenceClassifierOutput(loss=loss, logits=logits)


class PKMBertForQuestionAnswering(PKMPreTrainedModel):
    config_class = PKMBertConfig

    def __init__(self, config):
        super().__init__(config)
        self.model = PKMBertModel(config, add_pooling_layer=False)
        self.qa_outputs = nn.Linear(config.hidden_size, 2)
        self.post_init()

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        token_type_ids=None,
        start_positions=None,
        end_positions=None,
        **kwargs,
    ):
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
        start, end = self.qa_outputs(out.last_hidden_state).split(1, dim=-1)
        start, end = start.squeeze(-1).contiguous(), end.squeeze(-1).contiguous()
        loss = None
        if start_positions is not None and end_positions is not None:
            n = start.shape[1]
            loss = (
                F.cross_entropy(start, start_positions.clamp(0, n), ignore_index=n)
                + F.cross_entropy(end, end_positions.clamp(0, n), ignore_index=n)
            ) / 2
        return QuestionAnsweringModelOutput(loss=loss, start_logits=start, end_logits=end)
