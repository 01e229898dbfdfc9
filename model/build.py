"""Build megatron-core GPT (causal LM) and BERT (masked LM) models with PKM layers from a ModelConfig."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.transformer.transformer_config import TransformerConfig

from model import cpu_shim
from model.config import ModelConfig
from model.errors import ModelError
from model.pkm.value_table import MemoryParallel
from model.specs import PaddingMaskSource, PKMLayerArgs, block_spec


def transformer_config(cfg: ModelConfig, params_dtype: torch.dtype = torch.float32) -> TransformerConfig:
    """megatron-core TransformerConfig for `cfg`; fusions that need CUDA kernels are off on CPU."""
    on_gpu = torch.cuda.is_available()
    swiglu = cfg.activation == "swiglu"
    activation = {"gelu": F.gelu, "gelu_tanh": gelu_tanh, "swiglu": F.silu}[cfg.activation]
    return TransformerConfig(
        num_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size,
        num_attention_heads=cfg.num_attention_heads,
        num_query_groups=cfg.num_query_groups,
        ffn_hidden_size=cfg.ffn_hidden_size or 4 * cfg.hidden_size,
        kv_channels=cfg.hidden_size // cfg.num_attention_heads,
        normalization=cfg.normalization,
        layernorm_epsilon=cfg.layernorm_epsilon,
        gated_linear_unit=swiglu,
        activation_func=activation,
        add_bias_linear=cfg.add_bias_linear,
        add_qkv_bias=cfg.add_bias_linear if cfg.qkv_bias is None else cfg.qkv_bias,
        hidden_dropout=cfg.hidden_dropout,
        attention_dropout=cfg.attention_dropout,
        init_method_std=cfg.init_method_std,
        tensor_model_parallel_size=parallel_state.get_tensor_model_parallel_world_size(),
        params_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        pipeline_dtype=params_dtype,
        use_cpu_initialization=not on_gpu,
        perform_initialization=True,
        gradient_accumulation_fusion=False,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        # PKM layers make the layers differ: checkpoint each layer under its own keys.
        hetereogenous_dist_checkpoint=True,
    )


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GELU with the tanh approximation (GPT-2's "gelu_new")."""
    return F.gelu(x, approximate="tanh")


def build_model(
    cfg: ModelConfig,
    vocab_size: int,
    parallel: MemoryParallel = MemoryParallel(),
    seed: int = 0,
    stats_group=None,
    params_dtype: torch.dtype = torch.float32,
):
    """A megatron-core GPTModel or BertModel with PKM at `cfg.pkm.layers`. Needs megatron's
    parallel state initialised (also in one process) and the RNG seeded by the caller."""
    cpu_shim.apply()
    if cfg.norm_position == "post" and cfg.family != "bert":
        raise ModelError(f"model.norm_position=post is only supported for BERT, not {cfg.family!r}")
    tc = transformer_config(cfg, params_dtype)
    padding = PaddingMaskSource() if cfg.family == "bert" else None
    pkm_args = PKMLayerArgs(pkm=cfg.pkm, parallel=parallel, seed=seed, stats_group=stats_group, padding=padding)
    spec = block_spec(cfg, pkm_args)
    max_pos = cfg.max_position_embeddings or cfg.seq_length
    common = dict(
        config=tc,
        transformer_layer_spec=spec,
        vocab_size=vocab_size,
        max_sequence_length=max_pos,
        pre_process=True,
        post_process=True,
        parallel_output=True,
        share_embeddings_and_output_weights=cfg.tie_embeddings,
        position_embedding_type=cfg.position_embedding,
    )
    if cfg.family == "gpt":
        from megatron.core.models.gpt.gpt_model import GPTModel

        model = GPTModel(**common, rotary_base=cfg.rotary_base)
    else:
        from megatron.core.models.bert.bert_model import BertModel

        model = BertModel(**common, num_tokentypes=2, add_binary_head=cfg.binary_head)
        if cfg.norm_position == "post":
            from model.post_norm import add_embedding_norm

            add_embedding_norm(model.embedding, cfg.hidden_size, cfg.layernorm_epsilon)
        _route_padding_mask(model, padding)
        _route_loss_positions(model)
    return model


def _route_padding_mask(model, padding: PaddingMaskSource) -> None:
    """megatron's BertModel does not hand its padding mask to the MLP: give it to the PKM layers."""

    def before(module, args, kwargs):
        mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
        padding.mask = None if mask is None else (mask == 0)

    def after(module, args, kwargs, output):
        padding.mask = None

    model.register_forward_pre_hook(before, with_kwargs=True)
    model.register_forward_hook(after, with_kwargs=True)


class LossPositions:
    """BERT: the positions the masked-LM loss reads ([b, s] bool), set by lm_forward for one forward.

    megatron's BertModel runs its LM head on every position, and the loss mask then drops ~85 % of the
    rows. At MiniLM's shape the head's vocabulary GEMM (384 x 30,522) is about half of a training step,
    so a forward hook on the encoder hands the head only these positions (as NVIDIA's BERT recipes do).
    The binary head's pooler then reads the first selected position instead of [CLS]: lm_forward drops
    its logits (nothing here trains it)."""

    def __init__(self) -> None:
        self.mask: torch.Tensor | None = None


def _route_loss_positions(model) -> None:
    model.loss_positions = LossPositions()

    def select(module, args, output):
        mask = model.loss_positions.mask
        if mask is None:
            return None
        return output.transpose(0, 1)[mask].unsqueeze(1)  # [s, b, h] -> [n, 1, h], row-major over [b, s]

    model.encoder.register_forward_hook(select)


def lm_forward(model, family: str, batch: dict) -> torch.Tensor:
    """Per-token LM loss [b, s] (next-token for GPT, masked-token for BERT) for one micro-batch."""
    tokens = batch["tokens"]
    if family == "gpt":
        pad = batch.get("padding_mask")
        positions = torch.arange(tokens.shape[1], device=tokens.device).unsqueeze(0).expand_as(tokens)
        return model(
            input_ids=tokens, position_ids=positions, attention_mask=None, labels=batch["labels"], padding_mask=pad
        )
    keep = (~batch["padding_mask"]).long() if "padding_mask" in batch else torch.ones_like(tokens)
    types = batch.get("types")
    types = torch.zeros_like(tokens) if types is None else types
    positions = getattr(model, "loss_positions", None)
    where = batch["loss_mask"] > 0 if "loss_mask" in batch else None
    if positions is None or where is None or not where.any():
        loss, _ = model(input_ids=tokens, attention_mask=keep, tokentype_ids=types, lm_labels=batch["labels"])
        return loss
    positions.mask = where
    try:
        loss, _ = model(
            input_ids=tokens, attention_mask=keep, tokentype_ids=types, lm_labels=batch["labels"][where].unsqueeze(0)
        )
    finally:
        positions.mask = None
    # The positions the loss does not read get 0, as masked_mean's weights do.
    return torch.zeros(tokens.shape, dtype=loss.dtype, device=loss.device).masked_scatter(where, loss.reshape(-1))


def masked_mean(per_token: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    mask = loss_mask.to(per_token.dtype)
    return (per_token * mask).sum() / mask.sum().clamp_min(1.0)
