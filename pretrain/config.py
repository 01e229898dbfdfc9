"""The one config system: dataclasses loaded from YAML, with `a.b=c` command-line overrides.

Keys are strict: an unknown key is a one-line error naming it and the closest valid name.
This module imports no torch, so launchers can validate a config before submitting a job.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from data_pipeline.config import DataConfig
from model.config import ModelConfig


class ConfigError(ValueError):
    """A user mistake in a config file or override (printed as one line, no traceback)."""


@dataclass
class ParallelConfig:
    tensor_parallel: int = field(default=1, metadata={"ge": 1})
    # Which ranks split each PKM value table: "none" (replicated), "tp", "dp" or "all" (tp x dp).
    memory_parallel: Literal["none", "tp", "dp", "all"] = "all"


@dataclass
class TrainConfig:
    micro_batch_size: int = field(default=8, metadata={"ge": 1})
    global_batch_size: int = field(default=8, metadata={"ge": 1})
    train_steps: int = field(default=300, metadata={"ge": 0})
    lr: float = field(default=1e-3, metadata={"ge": 0.0})
    min_lr: float = field(default=1e-4, metadata={"ge": 0.0})
    warmup_steps: int = field(default=30, metadata={"ge": 0})
    lr_decay: Literal["cosine", "constant", "linear"] = "cosine"
    weight_decay: float = field(default=0.01, metadata={"ge": 0.0})
    adam_beta1: float = field(default=0.9, metadata={"ge": 0.0, "lt": 1.0})
    adam_beta2: float = field(default=0.98, metadata={"ge": 0.0, "lt": 1.0})
    adam_eps: float = field(default=1e-8, metadata={"gt": 0.0})
    clip_grad: float = field(default=1.0, metadata={"ge": 0.0})  # 0 = no clipping
    seed: int = field(default=1234, metadata={"ge": 0, "lt": 2**31})  # numpy takes 32-bit seeds
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: fp32 on CPU, bf16 on GPU
    zero_stage: int = field(default=0, metadata={"ge": 0, "le": 2})
    eval_interval: int = field(default=100, metadata={"ge": 0})  # 0 = no evaluation
    eval_steps: int = field(default=5, metadata={"ge": 1})
    # CPU runs: glibc keeps freed memory for reuse (pretrain/cpu_alloc.py; ~1.4x faster PKM steps,
    # the process keeps its peak heap). No effect on GPU or off glibc.
    cpu_keep_freed_memory: bool = True


@dataclass
class CheckpointConfig:
    save_interval: int = field(default=0, metadata={"ge": 0})  # 0 = only at the end
    keep_last: int = field(default=2, metadata={"ge": 1})
    resume: str | None = None  # None, "auto", or a checkpoint directory
    init_from: str | None = None  # HF BERT/GPT-2/Llama dir or a memory-free checkpoint of ours


@dataclass
class LoggingConfig:
    log_interval: int = field(default=10, metadata={"ge": 1})
    # "slots updated in the last N steps": a row counts if updated at one of steps t-N+1..t
    usage_window: int = field(default=100, metadata={"ge": 1})
    tensorboard: bool = True
    progress: bool = True


@dataclass
class RunConfig:
    run_dir: str = "runs/default"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


# ---------------------------------------------------------------------------------------------
# Loading


def _closest(name: str, options: list[str]) -> str:
    match = difflib.get_close_matches(name, options, n=1, cutoff=0.0)
    return f"; did you mean '{match[0]}'?" if match else ""


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: cannot be {value!r}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if origin in (list, tuple):
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, args[0] if args else Any, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return from_dict(tp, value, where)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    return value


def from_dict(cls: type, data: dict, where: str = "") -> Any:
    """Build dataclass `cls` from a nested dict; unknown keys and wrong types are ConfigErrors."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in (data or {}).items():
        path = f"{where}.{key}" if where else str(key)
        if key not in names:
            raise ConfigError(f"unknown config key '{path}'{_closest(str(key), names)}")
        kwargs[key] = _coerce(value, hints[key], path)
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not of the form key.sub=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def apply_overrides(data: dict, overrides: list[str], cls: type) -> dict:
    """Apply `a.b=c` overrides to a nested dict, checking each key path against `cls`."""
    for text in overrides:
        path, value = parse_override(text)
        node, node_cls = data, cls
        for i, part in enumerate(path):
            names = [f.name for f in dataclasses.fields(node_cls)]
            dotted = ".".join(path[: i + 1])
            if part not in names:
                raise ConfigError(f"unknown config key '{dotted}'{_closest(part, names)}")
            if i == len(path) - 1:
                node[part] = value
            else:
                sub_cls = typing.get_type_hints(node_cls)[part]
                if not dataclasses.is_dataclass(sub_cls):
                    raise ConfigError(f"config key '{dotted}' is a value, not a section")
                node = node.setdefault(part, {})
                if not isinstance(node, dict):
                    raise ConfigError(f"config key '{dotted}' is a value, not a section")
                node_cls = sub_cls
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None, cls: type = RunConfig) -> Any:
    """Load `cls` from a YAML file (optional) and overrides; validate; return the dataclass."""
    data: dict = {}
    if path is not None:
        p = Path(path)
        if p.is_dir():
            raise ConfigError(f"config file '{p}' is a directory (give a YAML file, e.g. configs/tiny_gpt.yaml)")
        if not p.is_file():
            raise ConfigError(f"config file '{p}' does not exist")
        try:
            data = yaml.safe_load(p.read_text(encoding="utf-8"))
        except UnicodeDecodeError as e:
            raise ConfigError(f"{p}: not a YAML text file (byte {e.start} is not UTF-8)") from None
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            line = f":{mark.line + 1}" if mark is not None else ""
            raise ConfigError(f"{p}{line}: not valid YAML ({getattr(e, 'problem', e)})") from None
        if data is None:
            raise ConfigError(f"{p}: empty config file (give at least one section, e.g. `model:`)")
        if not isinstance(data, dict):
            raise ConfigError(f"{p}: the top level must be a mapping of config sections")
    data = apply_overrides(data, list(overrides or []), cls)
    try:
        cfg = from_dict(cls, data)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}" if path else str(e)) from None
    if cls is RunConfig:
        validate(cfg)
    return cfg


def check_ranges(cfg: Any, where: str = "") -> None:
    """Every number of a config dataclass tree within the range its field declares
    (`metadata={"ge": .., "gt": .., "le": .., "lt": ..}`); lists are checked element by element."""
    bounds = (
        ("ge", ">=", lambda v, b: v >= b),
        ("gt", ">", lambda v, b: v > b),
        ("le", "<=", lambda v, b: v <= b),
        ("lt", "<", lambda v, b: v < b),
    )
    for f in dataclasses.fields(cfg):
        value, path = getattr(cfg, f.name), f"{where}.{f.name}" if where else f.name
        if dataclasses.is_dataclass(value):
            check_ranges(value, path)
            continue
        values = value if isinstance(value, (list, tuple)) else [value]
        for v in values:
            if not isinstance(v, (int, float)) or isinstance(v, bool):
                continue
            if v != v:  # NaN
                raise ConfigError(f"{path}: must be a number, got nan")
            for key, sign, ok in bounds:
                if key in f.metadata and not ok(v, f.metadata[key]):
                    raise ConfigError(f"{path}: must be {sign} {f.metadata[key]}, got {value!r}")


def validate(cfg: RunConfig, after_init: bool = False) -> None:
    """Ranges of every field, then what fields must satisfy together. One-line ConfigErrors naming the key."""
    check_ranges(cfg)
    m, p, t, d = cfg.model, cfg.model.pkm, cfg.train, cfg.data
    if not str(cfg.run_dir).strip():
        raise ConfigError("run_dir: must not be empty")
    # With checkpoint.init_from the architecture comes from the checkpoint: checked again once loaded.
    for i in [] if cfg.checkpoint.init_from and not after_init else p.layers:
        if not 0 <= i < m.num_layers:
            raise ConfigError(f"model.pkm.layers: layer {i} does not exist (model.num_layers={m.num_layers})")
    if len(set(p.layers)) != len(p.layers):
        raise ConfigError(f"model.pkm.layers: {p.layers} lists a layer twice")
    if p.k_dim % 2:
        raise ConfigError(f"model.pkm.k_dim: must be even, got {p.k_dim}")
    if p.knn > p.n_keys:
        raise ConfigError(f"model.pkm.knn: {p.knn} is larger than model.pkm.n_keys={p.n_keys}")
    if p.value_dtype == "bf16" and p.value_optimizer == "adam":
        raise ConfigError(
            "model.pkm.value_dtype: bf16 tables need a row-wise model.pkm.value_optimizer "
            "(rowwise_adagrad or rowwise_adam), not adam"
        )
    if m.hidden_size % m.num_attention_heads:
        raise ConfigError(
            f"model.hidden_size: {m.hidden_size} is not divisible by num_attention_heads={m.num_attention_heads}"
        )
    if m.num_query_groups and m.num_attention_heads % m.num_query_groups:
        raise ConfigError(
            f"model.num_query_groups: {m.num_query_groups} does not divide num_attention_heads={m.num_attention_heads}"
        )
    if m.max_position_embeddings is not None and m.max_position_embeddings < m.seq_length:
        raise ConfigError(
            f"model.max_position_embeddings: {m.max_position_embeddings} is smaller than seq_length={m.seq_length}"
        )
    if m.position_embedding == "rope" and (m.hidden_size // m.num_attention_heads) % 2:
        raise ConfigError(
            f"model.position_embedding: rope needs an even head dimension, got {m.hidden_size // m.num_attention_heads}"
        )
    if t.global_batch_size % t.micro_batch_size:
        raise ConfigError(
            f"train.global_batch_size: {t.global_batch_size} is not a multiple of micro_batch_size={t.micro_batch_size}"
        )
    if t.min_lr > t.lr:
        raise ConfigError(f"train.min_lr: {t.min_lr} is larger than train.lr={t.lr}")
    if d.weights is not None and len(d.weights) != len(d.paths):
        raise ConfigError(f"data.weights: {len(d.weights)} weights for {len(d.paths)} data.paths")
    split = str(d.split).split(",")
    try:
        parts = [float(x) for x in split]
    except ValueError:
        parts = []
    if len(parts) != 3 or min(parts) < 0 or parts[0] <= 0:
        raise ConfigError(
            f"data.split: {d.split!r} must be three non-negative numbers 'train,valid,test' with a positive train share"
        )
    if t.eval_interval > 0 and parts[1] <= 0:
        raise ConfigError(
            f"data.split: {d.split!r} has no validation share but train.eval_interval="
            f"{t.eval_interval} (set train.eval_interval=0)"
        )
