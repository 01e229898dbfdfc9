"""Initialise a megatron-core model (with PKM layers) from a memory-free Hugging Face checkpoint.

Kim & Jung (2020): adding PKM to a *pretrained* model and continuing training works far better than
training a PKM model from scratch. `model_config_from_hf` turns an HF config.json (BERT, GPT-2,
Llama family) into our ModelConfig; `load_pretrained_into` copies every pretrained weight into the
megatron model at any tensor-parallel size and leaves the PKM layers as they were initialised.

How a weight travels: HF tensors --(adapter rule: transpose / fuse q,k,v per query group / [gate; up])-->
the full TP=1 megatron tensor --(megatron's partition info: `tensor_model_parallel`, `partition_dim`;
gated fc1 split per half; vocabulary rows padded)--> this rank's shard.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from dataclasses import dataclass, field

import torch

from model.config import ARCH_FIELDS, ModelConfig, PKMConfig
from model.errors import ModelError
from model.hf.adapters import ADAPTERS, Adapter, Rule
from model.hf.weights import HFWeights, read_config

log = logging.getLogger("pkm.model.hf")


# ---------------------------------------------------------------------------------------------
# config.json -> ModelConfig


@dataclass(frozen=True)
class HFSource:
    """An HF checkpoint directory read once: its config.json and the adapter of its family. Resolving a
    run opens it; building its ModelConfig and loading its weights reuse it."""

    path: str
    config: dict
    adapter: Adapter

    @classmethod
    def open(cls, path) -> HFSource:
        config = read_config(str(path))
        return cls(str(path), config, adapter_for(config, str(path)))


def _source(hf: str | HFSource) -> HFSource:
    return hf if isinstance(hf, HFSource) else HFSource.open(hf)


def adapter_for(hf_cfg: dict, where: str) -> Adapter:
    model_type = hf_cfg.get("model_type")
    if model_type not in ADAPTERS:
        raise ModelError(
            f"{where}/config.json: model_type {model_type!r} is not supported "
            f"(supported: {', '.join(sorted(ADAPTERS))})"
        )
    return ADAPTERS[model_type]


def _lookup(cfg: dict, dotted: str):
    node = cfg
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return _MISSING
        node = node[part]
    return node


_MISSING = object()


def _normalised_names(weights: HFWeights, adapter: Adapter) -> dict[str, str]:
    """normalised HF name (base prefix stripped) -> name in the checkpoint."""
    out = {}
    for name in weights.keys():
        short = name
        for prefix in adapter.base_prefixes:
            if name.startswith(prefix):
                short = name[len(prefix) :]
                break
        out[short] = name
    return out


def model_config_from_hf(
    hf: str | HFSource, base: ModelConfig | None = None, pkm: PKMConfig | None = None
) -> ModelConfig:
    """Our ModelConfig for an HF checkpoint (a directory or an opened HFSource): the architecture from
    its config.json; everything else (PKM placement, seq_length, dropout, init) from `base` (and `pkm`
    when given)."""
    src = _source(hf)
    hf_dir, hf_cfg, adapter = src.path, src.config, src.adapter
    base = base or ModelConfig()
    # Architecture fields a family does not set take their memory-free defaults, not the base's.
    values: dict = {
        "num_query_groups": None,
        "rotary_base": 10000,
        "binary_head": False,
        "qkv_bias": None,
        "norm_position": "pre",
        **adapter.fixed,
    }
    for f in adapter.fields:
        found = next((v for k in f.hf if (v := _lookup(hf_cfg, k)) is not _MISSING), _MISSING)
        if found is _MISSING:
            if f.required:
                raise ModelError(f"{hf_dir}/config.json: missing {' or '.join(f.hf)}")
            found = f.default
        values[f.field] = found
    for req in adapter.requirements:
        got = _lookup(hf_cfg, req.hf)
        got = req.default if got is _MISSING else got
        if got not in req.allowed:
            raise ModelError(
                f"{hf_dir}/config.json: {req.hf}={got!r} is not supported "
                f"(our {adapter.name} model needs {' or '.join(map(repr, req.allowed))})"
            )
    act = hf_cfg.get(adapter.activation_key)
    if act not in adapter.activations:
        raise ModelError(
            f"{hf_dir}/config.json: {adapter.activation_key}={act!r} is not supported "
            f"(supported: {', '.join(adapter.activations)})"
        )
    values["activation"] = adapter.activations[act]
    hidden, heads = values["hidden_size"], values["num_attention_heads"]
    head_dim = hf_cfg.get("head_dim")
    if head_dim is not None and head_dim * heads != hidden:
        raise ModelError(
            f"{hf_dir}/config.json: head_dim={head_dim} differs from hidden_size/num_attention_heads "
            f"({hidden}/{heads}); our kv_channels is hidden_size/heads"
        )
    if values.get("num_query_groups") == values["num_attention_heads"]:
        values["num_query_groups"] = None  # plain multi-head attention
    if values.get("rotary_base") is not None:
        values["rotary_base"] = int(values["rotary_base"])
    if adapter.derived is not None:
        names = set(_normalised_names(HFWeights(hf_dir), adapter))
        values.update(adapter.derived(hf_cfg, names))
    cfg = dataclasses.replace(base, **values)
    if pkm is not None:
        cfg = dataclasses.replace(cfg, pkm=pkm)
    if cfg.position_embedding == "learned_absolute" and cfg.seq_length > cfg.max_position_embeddings:
        raise ModelError(
            f"model.seq_length={cfg.seq_length} exceeds the checkpoint's "
            f"max_position_embeddings={cfg.max_position_embeddings} ({hf_dir})"
        )
    bad = [i for i in cfg.pkm.layers if not 0 <= i < cfg.num_layers]
    if bad:
        raise ModelError(
            f"model.pkm.layers={cfg.pkm.layers}: {bad} outside 0..{cfg.num_layers - 1} "
            f"(the checkpoint has {cfg.num_layers} layers)"
        )
    return cfg


# ---------------------------------------------------------------------------------------------
# HF tensors -> full megatron tensor


def _pack_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """megatron's linear_qkv rows: for each query group g, [its heads' q rows; k_g; v_g] (so a TP rank
    owns whole groups as one contiguous block)."""
    groups = cfg.num_query_groups or cfg.num_attention_heads
    rest = q.shape[1:]
    q = q.reshape(groups, -1, *rest)
    k = k.reshape(groups, -1, *rest)
    v = v.reshape(groups, -1, *rest)
    return torch.cat([q, k, v], dim=1).reshape(-1, *rest)


def _qkv_fused(c_attn: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    t = c_attn.t() if c_attn.dim() == 2 else c_attn  # Conv1D [in, 3h] -> [3h, in]
    q, k, v = t.chunk(3, dim=0)
    return _pack_qkv(q, k, v, cfg)


CONVERT = {
    "copy": lambda ts, cfg: ts[0],
    "transpose": lambda ts, cfg: ts[0].t(),
    "qkv": lambda ts, cfg: _pack_qkv(*ts, cfg),
    "qkv_fused": lambda ts, cfg: _qkv_fused(ts[0], cfg),
    "gate_up": lambda ts, cfg: torch.cat(ts, dim=0),
}


# ---------------------------------------------------------------------------------------------
# full megatron tensor -> this rank's shard


def _tp() -> tuple[int, int]:
    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        return 0, 1
    return parallel_state.get_tensor_model_parallel_rank(), parallel_state.get_tensor_model_parallel_world_size()


def full_shape(local: torch.Tensor, tp_size: int) -> tuple[int, ...]:
    shape = list(local.shape)
    if getattr(local, "tensor_model_parallel", False):
        shape[local.partition_dim] *= tp_size
    return tuple(shape)


def local_shard(full: torch.Tensor, local: torch.Tensor, gated: bool, tp_rank: int, tp_size: int) -> torch.Tensor:
    """This rank's part of `full`, by megatron's partition attributes on the local parameter."""
    if tp_size == 1 or not getattr(local, "tensor_model_parallel", False):
        return full
    dim = local.partition_dim
    if gated:  # [gate; up]: each rank holds [gate_r; up_r]
        return torch.cat([half.chunk(tp_size, dim)[tp_rank] for half in full.chunk(2, dim)], dim)
    return full.chunk(tp_size, dim)[tp_rank]


# ---------------------------------------------------------------------------------------------


@dataclass
class InitReport:
    source: str
    family: str
    tensors: int = 0  # megatron tensors loaded
    params: int = 0  # pretrained numbers loaded (full, all ranks)
    fresh_memory: list[str] = field(default_factory=list)  # PKM parameters: left as initialised
    fresh_heads: list[str] = field(default_factory=list)  # heads the checkpoint lacks: left as initialised
    dropped: list[str] = field(default_factory=list)  # HF weights our model has no place for, on purpose
    vocab_padding: int = 0  # zero rows appended to vocabulary-sized weights

    def __str__(self) -> str:
        parts = [f"{self.tensors} tensors ({self.params / 1e6:.1f}M weights) from {self.family} checkpoint"]
        if self.fresh_memory:
            layers = sorted({n.split(".mlp.")[0] for n in self.fresh_memory})
            parts.append(f"PKM freshly initialised in {len(layers)} layer(s)")
        if self.fresh_heads:
            parts.append(f"absent heads initialised fresh: {', '.join(self.fresh_heads)}")
        if self.dropped:
            parts.append(f"unused: {_short(self.dropped)}")
        if self.vocab_padding:
            parts.append(f"vocabulary padded by {self.vocab_padding} zero rows")
        return "; ".join(parts)


def _short(names: list[str], n: int = 8) -> str:
    return ", ".join(names[:n]) + (f" (+{len(names) - n} more)" if len(names) > n else "")


def _canonical(name: str) -> str:
    return name.replace(".mlp.mlp.", ".mlp.")  # the FFN inside a PKM "add" layer


def _expand(rules: tuple[Rule, ...], num_layers: int) -> dict[str, tuple[Rule, tuple[str, ...]]]:
    out = {}
    for rule in rules:
        layers = range(num_layers) if "{i}" in rule.megatron else [None]
        for i in layers:

            def fmt(s: str, i=i) -> str:
                return s if i is None else s.replace("{i}", str(i))

            out[fmt(rule.megatron)] = (rule, tuple(fmt(h) for h in rule.hf))
    return out


def _check_architecture(cfg: ModelConfig, hf_cfg: ModelConfig, hf_dir: str) -> None:
    diff = [
        f"{f}={getattr(cfg, f)!r} (checkpoint: {getattr(hf_cfg, f)!r})"
        for f in ARCH_FIELDS
        if getattr(cfg, f) != getattr(hf_cfg, f)
    ]
    if diff:
        raise ModelError(
            f"model config does not match {hf_dir}: {'; '.join(diff)} (build the model from model_config_from_hf)"
        )


@torch.no_grad()
def load_pretrained_into(
    model: torch.nn.Module, model_cfg: ModelConfig, hf: str | HFSource, strict: bool = True
) -> InitReport:
    """Copy the weights of the HF checkpoint `hf_dir` into `model` (a megatron GPTModel/BertModel built
    from `model_cfg`, on this rank). PKM layers keep their initialisation. Raises ModelError listing
    missing, unexpected and mis-shaped weights and vocabulary mismatches (nothing is copied then)."""
    src = _source(hf)
    hf_dir, hf_cfg, adapter = src.path, src.config, src.adapter
    _check_architecture(model_cfg, model_config_from_hf(src, base=model_cfg), hf_dir)
    weights = HFWeights(hf_dir)
    names = _normalised_names(weights, adapter)
    rules = _expand(adapter.rules, model_cfg.num_layers)
    tp_rank, tp_size = _tp()
    # how this checkpoint spells base-model names (BertModel files have no "bert." prefix, BertFor* do)
    prefix = next((full[: -len(short)] for short, full in names.items() if full != short), "")
    gated = model_cfg.activation == "swiglu"
    hf_vocab = int(hf_cfg["vocab_size"])
    report = InitReport(source=hf_dir, family=adapter.name)

    targets = {
        k: v
        for k, v in model.state_dict(keep_vars=True).items()
        if torch.is_tensor(v) and not k.endswith("_extra_state")
    }
    missing, shape_errors, vocab_errors, no_rule = [], [], [], []
    plan: list[tuple[torch.Tensor, torch.Tensor]] = []  # (local parameter, its new value)
    used: set[str] = set()
    for name, local in targets.items():
        if ".memory." in name:  # PKM: not in a memory-free checkpoint
            report.fresh_memory.append(name)
            continue
        canon = _canonical(name)
        if canon not in rules:
            no_rule.append(name)
            continue
        rule, sources = rules[canon]
        absent = [s for s in sources if s not in names]
        if absent:
            (report.fresh_heads if rule.head else missing).append(
                canon if rule.head else f"{canon} <- {', '.join(prefix + s for s in absent)}"
            )
            continue
        used.update(sources)
        full = CONVERT[rule.convert]([weights[names[s]] for s in sources], model_cfg)
        want = full_shape(local, tp_size)
        if rule.vocab:
            if full.shape[0] != hf_vocab:
                vocab_errors.append(
                    f"{names[sources[0]]} has {full.shape[0]} rows but config.json vocab_size={hf_vocab}"
                )
                continue
            if want[0] < hf_vocab:
                vocab_errors.append(
                    f"{name}: the model's vocabulary ({want[0]}) is smaller than the "
                    f"checkpoint's ({hf_vocab}); build it with the checkpoint's tokenizer"
                )
                continue
            if want[0] > full.shape[0]:
                report.vocab_padding = want[0] - full.shape[0]
                pad = full.new_zeros((want[0] - full.shape[0],) + tuple(full.shape[1:]))
                full = torch.cat([full, pad], dim=0)
        if tuple(full.shape) != want:
            shape_errors.append(f"{name}: checkpoint {tuple(full.shape)} vs model {want}")
            continue
        is_gated_fc1 = gated and canon.endswith(("mlp.linear_fc1.weight", "mlp.linear_fc1.bias"))
        plan.append((local, local_shard(full, local, is_gated_fc1, tp_rank, tp_size)))
        report.params += full.numel()

    # HF weights that found no place: intended (PKM replaced the FFN, heads our model lacks, tied
    # duplicates, buffers) or an error.
    placed = {s: rule for canon, (rule, srcs) in rules.items() for s in srcs}
    replaced = {i for i in model_cfg.pkm.layers} if model_cfg.pkm.placement == "replace" else set()
    unexpected = []
    for short, full_name in names.items():
        if short in used or any(re.fullmatch(p, short) for p in adapter.ignore):
            continue
        rule = placed.get(short)
        layer = re.search(r"(?:layer|layers|h)\.(\d+)\.", short)
        if rule is not None and (rule.head or (rule.tied and model_cfg.tie_embeddings)):
            report.dropped.append(full_name)
        elif rule is not None and ".mlp." in rule.megatron and layer and int(layer.group(1)) in replaced:
            report.dropped.append(full_name)  # this layer's FFN is replaced by the memory
        else:
            unexpected.append(full_name)

    problems = []
    for title, items in (
        ("missing weights", missing),
        ("unexpected weights", unexpected),
        ("shape mismatches", shape_errors),
        ("vocabulary mismatch", vocab_errors),
        ("model parameters no rule of the adapter fills", no_rule),
    ):
        if items:
            problems.append(f"{len(items)} {title}: {_short(items)}")
    if problems and (strict or missing or shape_errors or vocab_errors or no_rule):
        raise ModelError(f"cannot initialise from {hf_dir} ({adapter.name}): " + "; ".join(problems))
    for local, value in plan:
        local.data.copy_(value.to(local.dtype))
    report.tensors = len(plan)
    log.info("initialised from %s: %s", hf_dir, report)
    return report


init_from = load_pretrained_into  # the name issue #6 uses: init_from(model, cfg, hf_dir)
