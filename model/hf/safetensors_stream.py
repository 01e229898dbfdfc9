"""Write safetensors files whose tensors arrive in blocks of rows, so a tensor larger than memory (a PKM
value table streamed from a checkpoint) is never whole in one process.

The bytes are those of `safetensors.torch.save_file(..., metadata={"format": "pt"})` (the same order,
header and padding), and the split into shards is transformers' `save_pretrained` one: files
`model-0000X-of-0000N.safetensors` and `model.safetensors.index.json` when the tensors exceed
`max_shard_size`, else one `model.safetensors`.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

# safetensors' dtype enum order: save_file lays tensors out by dtype (descending), then by name.
_DTYPES = [
    (torch.bool, "BOOL"),
    (torch.uint8, "U8"),
    (torch.int8, "I8"),
    (torch.float8_e5m2, "F8_E5M2"),
    (torch.float8_e4m3fn, "F8_E4M3"),
    (torch.int16, "I16"),
    (torch.uint16, "U16"),
    (torch.float16, "F16"),
    (torch.bfloat16, "BF16"),
    (torch.int32, "I32"),
    (torch.uint32, "U32"),
    (torch.float32, "F32"),
    (torch.float64, "F64"),
    (torch.int64, "I64"),
    (torch.uint64, "U64"),
]
_NAME = {dt: name for dt, name in _DTYPES}
_RANK = {dt: i for i, (dt, _) in enumerate(_DTYPES)}
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


@dataclass
class StreamedTensor:
    """A tensor to write: its shape and dtype, and `blocks()` yielding it as consecutive row blocks."""

    shape: tuple
    dtype: torch.dtype
    blocks: Callable[[], Iterable[torch.Tensor]]

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n * torch.empty((), dtype=self.dtype).element_size()

    @classmethod
    def of(cls, t: torch.Tensor) -> StreamedTensor:
        return cls(tuple(t.shape), t.dtype, lambda: [t])


def parse_size(size: str | int) -> int:
    """ "2GB" -> 2e9 bytes (transformers' units: GB = 10**9, GiB = 2**30)."""
    if isinstance(size, int):
        return size
    s = size.strip().upper()
    for unit, mult in (("GIB", 2**30), ("MIB", 2**20), ("KIB", 2**10), ("GB", 10**9), ("MB", 10**6), ("KB", 10**3)):
        if s.endswith(unit):
            return int(float(s[: -len(unit)]) * mult)
    return int(s)


def _shards(tensors: dict[str, StreamedTensor], max_bytes: int) -> list[list[str]]:
    """Greedy, in order; a tensor larger than the limit gets a shard of its own (as huggingface_hub)."""
    shards, current, size = [], [], 0
    for name, t in tensors.items():
        if t.nbytes > max_bytes:
            shards.append([name])
            continue
        if current and size + t.nbytes > max_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(name)
        size += t.nbytes
    if current:
        shards.append(current)
    return shards or [[]]


def _write_file(path: str, tensors: dict[str, StreamedTensor]) -> None:
    order = sorted(tensors, key=lambda n: (-_RANK[tensors[n].dtype], n))
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name in order:
        t = tensors[name]
        header[name] = {"dtype": _NAME[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(head)) + head)
        for name in order:
            t, written = tensors[name], 0
            for block in t.blocks():
                block = block.detach().to("cpu", t.dtype).contiguous()
                f.write(block.view(-1).view(torch.uint8).numpy().tobytes() if block.numel() else b"")
                written += block.numel() * block.element_size()
            if written != t.nbytes:
                raise ValueError(f"{name}: wrote {written} of {t.nbytes} bytes (blocks do not match its shape)")
    os.chmod(path, 0o644)


def write_safetensors(out_dir: str, tensors: dict[str, StreamedTensor], max_shard_size: str | int = "2GB") -> list[str]:
    """Write `tensors` (in this order for the split) under out_dir; returns the files written."""
    shards = _shards(tensors, parse_size(max_shard_size))
    if len(shards) == 1:
        _write_file(os.path.join(out_dir, SINGLE_FILE), tensors)
        return [SINGLE_FILE]
    files, weight_map = [], {}
    for i, names in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        _write_file(os.path.join(out_dir, fname), {n: tensors[n] for n in names})
        files.append(fname)
        weight_map.update({n: fname for n in names})
    index = {
        "metadata": {"total_size": sum(t.nbytes for t in tensors.values())},
        "weight_map": dict(sorted(weight_map.items())),
    }
    with open(os.path.join(out_dir, INDEX_FILE), "w") as f:
        f.write(json.dumps(index, indent=2, sort_keys=True) + "\n")
    os.chmod(os.path.join(out_dir, INDEX_FILE), 0o644)
    return files + [INDEX_FILE]
