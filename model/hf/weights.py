"""Read a Hugging Face checkpoint directory: config.json and the weights (safetensors, sharded or not,
or a legacy pytorch_model.bin), lazily, without building the HF model."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable

import torch

from model.errors import ModelError

_SAFE_INDEX = "model.safetensors.index.json"
_BIN_INDEX = "pytorch_model.bin.index.json"


def read_config(hf_dir: str) -> dict:
    path = os.path.join(hf_dir, "config.json")
    if not os.path.isfile(path):
        raise ModelError(f"{hf_dir}: not a Hugging Face checkpoint directory (no config.json)")
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ModelError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None


class HFWeights:
    """name -> tensor of an HF checkpoint, read on demand (safetensors are memory-mapped)."""

    def __init__(self, hf_dir: str):
        self.dir = hf_dir
        self._where: dict[str, str] = {}  # name -> file
        self._bin: dict[str, dict[str, torch.Tensor]] = {}
        self._open: dict = {}  # safetensors file -> open (memory-mapped) handle
        for index in (_SAFE_INDEX, _BIN_INDEX):
            path = os.path.join(hf_dir, index)
            if os.path.isfile(path):
                with open(path) as f:
                    self._where = {k: os.path.join(hf_dir, v) for k, v in json.load(f)["weight_map"].items()}
                break
        else:
            for name in ("model.safetensors", "pytorch_model.bin"):
                path = os.path.join(hf_dir, name)
                if os.path.isfile(path):
                    self._where = {k: path for k in self._keys_of(path)}
                    break
            else:
                raise ModelError(
                    f"{hf_dir}: no weights (expected model.safetensors, {_SAFE_INDEX}, "
                    f"pytorch_model.bin or {_BIN_INDEX})"
                )

    def _keys_of(self, path: str) -> Iterable[str]:
        if path.endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(path, "pt") as f:
                return list(f.keys())
        return list(self._load_bin(path).keys())

    def _load_bin(self, path: str) -> dict[str, torch.Tensor]:
        if path not in self._bin:
            self._bin[path] = torch.load(path, map_location="cpu", weights_only=True)
        return self._bin[path]

    def keys(self) -> list[str]:
        return list(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def __getitem__(self, name: str) -> torch.Tensor:
        path = self._where[name]
        if path.endswith(".safetensors"):
            if path not in self._open:
                from safetensors import safe_open

                self._open[path] = safe_open(path, "pt")
            return self._open[path].get_tensor(name)
        return self._load_bin(path)[name]
