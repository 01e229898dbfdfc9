"""megatron-core layer specs with PKM at chosen layers: PKM is one `ModuleSpec` swap of `mlp`.

`MemoryMLP` replaces the FFN; `MLPWithMemory` adds the memory to it (Kim & Jung's residual memory:
FFN(x) + PKM(x)). Both follow the MLP contract of megatron-core's TransformerLayer:
`forward(hidden_states [s, b, h], padding_mask=None [b, s], ...) -> (output, bias=None)`.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
from megatron.core import parallel_state
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.torch_norm import WrappedTorchNorm
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
from megatron.core.transformer.transformer_config import TransformerConfig

from model.config import ModelConfig, PKMConfig
from model.pkm.memory import ProductKeyMemory
from model.pkm.value_table import MemoryParallel


class PaddingMaskSource:
    """Where a PKM layer finds the padding mask when its model does not pass one to the MLP
    (megatron's BertModel); set by a forward pre-hook on the model, cleared after the forward."""

    def __init__(self) -> None:
        self.mask: torch.Tensor | None = None  # [b, s], True = padding


@dataclass
class PKMLayerArgs:
    """Everything a PKM layer needs besides the TransformerConfig (passed through ModuleSpec params)."""

    pkm: PKMConfig
    parallel: MemoryParallel
    seed: int = 0
    stats_group: object = None  # group over which query BatchNorm statistics are summed (DP)
    padding: PaddingMaskSource | None = None


class MemoryMLP(MegatronModule):
    """PKM in place of the FFN."""

    def __init__(self, config: TransformerConfig, pkm_args: PKMLayerArgs, **_):
        super().__init__(config=config)
        self.pkm_args = pkm_args
        self.layer_number = 0
        self.memory: ProductKeyMemory | None = None

    def set_layer_number(self, layer_number: int) -> None:
        # The value table's init seed depends on the layer, so it is built once the layer is known.
        self.layer_number = layer_number
        c = self.pkm_args
        self.memory = ProductKeyMemory(
            self.config.hidden_size,
            c.pkm,
            c.parallel,
            init_seed=c.seed * 1000 + layer_number,
            stats_group=c.stats_group,
        )

    def _padding(self, padding_mask):
        if padding_mask is None and self.pkm_args.padding is not None:
            padding_mask = self.pkm_args.padding.mask
        return None if padding_mask is None else padding_mask.transpose(0, 1)  # -> [s, b]

    def forward(self, hidden_states, padding_mask=None, **_):
        return self.memory(hidden_states, self._padding(padding_mask)), None

    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata=None) -> dict:
        """Children as megatron shards them; the memory's value table by its own column layout and
        the rest of the memory (query network, keys: small) replicated across TP and DP."""
        from megatron.core.transformer.utils import (
            ensure_metadata_has_dp_cp_group,
            make_sharded_tensors_for_checkpoint,
            sharded_state_dict_default,
        )

        metadata = ensure_metadata_has_dp_cp_group(metadata)
        out = {}
        for name, child in self.named_children():
            if name == "mlp":
                # The FFN of an `add` layer keeps the checkpoint keys of a plain layer's MLP, so weights
                # move between runs with and without memory (Kim & Jung: add memory to a trained model).
                plain = sharded_state_dict_default(child, prefix, sharded_offsets, metadata)
                out.update({f"{prefix}mlp.{k[len(prefix) :]}": v for k, v in plain.items()})
                continue
            if name != "memory":
                out.update(sharded_state_dict_default(child, f"{prefix}{name}.", sharded_offsets, metadata))
                continue
            small = {k: v for k, v in child.state_dict(keep_vars=True).items() if not k.startswith("values.")}
            out.update(
                make_sharded_tensors_for_checkpoint(
                    small,
                    f"{prefix}memory.",
                    {},
                    sharded_offsets,
                    tp_group=parallel_state.get_tensor_model_parallel_group(),
                    dp_cp_group=metadata["dp_cp_group"],
                )
            )
            out.update(child.values.sharded_state_dict(f"{prefix}memory.values."))
        return out


@dataclass
class MLPWithMemorySubmodules:
    mlp: ModuleSpec


class MLPWithMemory(MemoryMLP):
    """FFN(x) + PKM(x): the memory added to (not replacing) the layer's feed-forward network."""

    def __init__(self, config: TransformerConfig, pkm_args: PKMLayerArgs, submodules: MLPWithMemorySubmodules, **_):
        super().__init__(config=config, pkm_args=pkm_args)
        self.mlp = build_module(
            submodules.mlp, config=config, tp_group=parallel_state.get_tensor_model_parallel_group()
        )

    def forward(self, hidden_states, padding_mask=None, **_):
        out, bias = self.mlp(hidden_states)
        if bias is not None:
            out = out + bias
        return out + self.memory(hidden_states, self._padding(padding_mask)), None


def _with_memory(layer_spec: ModuleSpec, cfg: PKMConfig, pkm_args: PKMLayerArgs) -> ModuleSpec:
    spec = copy.deepcopy(layer_spec)
    if cfg.placement == "replace":
        spec.submodules.mlp = ModuleSpec(module=MemoryMLP, params={"pkm_args": pkm_args})
    else:
        spec.submodules.mlp = ModuleSpec(
            module=MLPWithMemory,
            params={"pkm_args": pkm_args},
            submodules=MLPWithMemorySubmodules(mlp=layer_spec.submodules.mlp),
        )
    return spec


def base_layer_spec(cfg: ModelConfig) -> ModuleSpec:
    """megatron-core's local (no TransformerEngine) layer spec for the model family."""
    if cfg.family == "gpt":
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

        return get_gpt_layer_local_spec(normalization=cfg.normalization)
    spec = copy.deepcopy(_bert_local_spec())
    if cfg.norm_position == "post":
        from model.post_norm import post_norm_layer_spec

        spec = post_norm_layer_spec(spec, cfg.hidden_size, cfg.layernorm_epsilon)
    return spec


def _bert_local_spec() -> ModuleSpec:
    from megatron.core.models.bert.bert_layer_specs import bert_layer_local_spec

    spec = copy.deepcopy(bert_layer_local_spec)
    spec.submodules.input_layernorm = WrappedTorchNorm
    spec.submodules.pre_mlp_layernorm = WrappedTorchNorm
    spec.submodules.self_attention.params = {"attn_mask_type": AttnMaskType.padding}
    return spec


@dataclass
class LayerwiseBlockSpec(TransformerBlockSubmodules):
    """Per-layer specs. BertModel inspects `spec.submodules.self_attention` to pick its attention-mask
    layout; all layers share one attention spec, so the first layer's submodules answer it."""

    @property
    def submodules(self):
        return self.layer_specs[0].submodules


def block_spec(
    cfg: ModelConfig, pkm_args: PKMLayerArgs, base: Callable[[ModelConfig], ModuleSpec] | None = None
) -> LayerwiseBlockSpec:
    """One layer spec per layer: the base spec, with the PKM `mlp` at `cfg.pkm.layers`."""
    layer = (base or base_layer_spec)(cfg)
    chosen = set(cfg.pkm.layers)
    specs = [_with_memory(layer, cfg.pkm, pkm_args) if i in chosen else layer for i in range(cfg.num_layers)]
    final_norm = IdentityOp if cfg.norm_position == "post" else WrappedTorchNorm  # post-LN: none at the end
    return LayerwiseBlockSpec(layer_specs=specs, layer_norm=final_norm)


def memory_layers(model: torch.nn.Module) -> list[tuple[str, ProductKeyMemory]]:
    """(name, ProductKeyMemory) for every PKM layer of a model, in layer order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, ProductKeyMemory)]
