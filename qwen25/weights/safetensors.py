"""Read HF safetensors checkpoints (single file or index-sharded) zero-copy from a memory map.

Tensors whose dtype already matches the requested one are views of the mapped file (copy-on-write), so a
bf16 checkpoint loaded as bf16 costs no second copy in RAM. Writing checkpoints uses the `safetensors` package.
"""

from __future__ import annotations

import json
import mmap
import struct
from pathlib import Path

import torch

_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


class SafetensorsError(ValueError):
    """A safetensors file or index is missing, truncated or malformed."""


def _read_file(path: Path, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        raise SafetensorsError(f"{path}: file not found") from None
    with f:
        size = path.stat().st_size
        if size < 8:
            raise SafetensorsError(f"{path}: truncated (only {size} bytes)")
        (header_len,) = struct.unpack("<Q", f.read(8))
        if header_len > size - 8:
            raise SafetensorsError(f"{path}: corrupt header (header length {header_len} > file size {size})")
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise SafetensorsError(f"{path}: corrupt header ({e})") from None
        # ACCESS_COPY: a private, writable mapping -> torch.frombuffer without warnings, pages shared until written.
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    base = 8 + header_len
    tensors: dict[str, torch.Tensor] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        file_dtype = _DTYPES.get(info.get("dtype"))
        if file_dtype is None:
            raise SafetensorsError(f"{path}: tensor {name} has unsupported dtype {info.get('dtype')!r}")
        begin, end = info["data_offsets"]
        if base + end > size:
            raise SafetensorsError(f"{path}: truncated (tensor {name} ends at byte {base + end}, file has {size})")
        shape = tuple(info["shape"])
        numel = 1
        for s in shape:
            numel *= s
        t = torch.frombuffer(mapped, dtype=file_dtype, count=numel, offset=base + begin).view(shape) if numel \
            else torch.empty(shape, dtype=file_dtype)
        if dtype is not None and t.is_floating_point() and t.dtype != dtype:
            t = t.to(dtype)
        tensors[name] = t
    return tensors


def load_safetensors(path: str | Path, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint: a .safetensors file, or a directory with model.safetensors or
    model.safetensors.index.json (shards). Floating tensors are cast to `dtype` when given."""
    path = Path(path)
    if path.is_file():
        return _read_file(path, dtype)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise SafetensorsError(f"{index}: malformed index ({e})") from None
        tensors: dict[str, torch.Tensor] = {}
        for shard in sorted(set(weight_map.values())):
            tensors.update(_read_file(path / shard, dtype))
        missing = set(weight_map) - set(tensors)
        if missing:
            raise SafetensorsError(f"{index}: shards lack {len(missing)} indexed tensors, e.g. {sorted(missing)[0]}")
        return tensors
    single = path / "model.safetensors"
    if single.is_file():
        return _read_file(single, dtype)
    raise SafetensorsError(f"{path}: no model.safetensors or model.safetensors.index.json")


def save_safetensors(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """Write one safetensors file (tied tensors must be de-duplicated by the caller)."""
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata or {"format": "pt"})
