"""Export a loaded model to an HF directory or a GGUF file, atomically: the output appears whole or not at all.

Owns the choice of writer (`weights.save` / `weights.gguf_writer`), the dtype rules per format and the
temporary-name-then-rename dance (an existing output is refused unless `overwrite`, and then swapped only
after the new one is complete). Loading the checkpoint and merging adapters happen one level up
(`qwen25.export_cli`, what `qwen25 export` runs), since weights/ does not assemble tokenizers.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qwen25.config import GenerationDefaults
from qwen25.weights.gguf_writer import GGUF_TYPES, write_qwen2_gguf
from qwen25.weights.save import DEFAULT_MAX_SHARD_SIZE, DTYPES, hf_state_dict, save_hf_directory

FORMATS = ("hf", "gguf")
DEFAULT_DTYPES = {"hf": "f32", "gguf": "f16"}  # lossless for what qwen25 computes / llama.cpp's default outtype

__all__ = ["DEFAULT_DTYPES", "FORMATS", "check_export", "export_model", "infer_format"]


def infer_format(output: str | os.PathLike, fmt: str | None) -> str:
    """`fmt` when given, else "gguf" for a .gguf output and "hf" otherwise."""
    if fmt is None:
        return "gguf" if str(output).endswith(".gguf") else "hf"
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}: use one of {', '.join(FORMATS)}")
    return fmt


def check_export(output: str | os.PathLike, fmt: str, dtype: str | None, overwrite: bool = False) -> str:
    """Validate an export before any work; returns the dtype to write."""
    fmt = infer_format(output, fmt)
    dtype = dtype or DEFAULT_DTYPES[fmt]
    allowed = tuple(DTYPES) if fmt == "hf" else tuple(GGUF_TYPES)
    if dtype not in allowed:
        raise ValueError(f"dtype {dtype!r} cannot be written to {fmt.upper()}: use one of {', '.join(allowed)}")
    out = Path(output)
    if fmt == "gguf" and out.is_dir():
        raise ValueError(f"{out}: is a directory; a GGUF export is a file (e.g. --output model.gguf)")
    if fmt == "hf" and out.is_file():
        raise ValueError(f"{out}: is a file; an HF export is a directory")
    if out.exists() and not overwrite and not (out.is_dir() and not any(out.iterdir())):
        raise FileExistsError(f"{out}: already exists (choose another --output, or --overwrite to replace it)")
    if not out.parent.exists():
        raise FileNotFoundError(f"{out.parent}: no such directory for the output")
    return dtype


def write_atomically(output: Path, write: Callable[[Path], None], overwrite: bool) -> None:
    """Write into a hidden sibling, then rename it into place (replacing `output` only when `overwrite`)."""
    tmp = output.with_name(f".{output.name}.tmp-{os.getpid()}")
    old = output.with_name(f".{output.name}.old-{os.getpid()}")
    for p in (tmp, old):
        _remove(p)
    try:
        write(tmp)
        if output.exists():
            if not overwrite and not (output.is_dir() and not any(output.iterdir())):
                raise FileExistsError(f"{output}: appeared while exporting; not replaced (the export is lost)")
            output.rename(old)
        tmp.rename(output)
    except BaseException:
        _remove(tmp)
        if old.exists() and not output.exists():
            old.rename(output)  # put the previous export back
        raise
    _remove(old)


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def export_model(model: nn.Module, output: str | os.PathLike, fmt: str | None = None, *, tokenizer: Any,
                 dtype: str | None = None, generation_config: Mapping[str, Any] | GenerationDefaults | None = None,
                 name: str = "qwen2", max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
                 overwrite: bool = False) -> Path:
    """Write `model` (float, unfused, LoRA merged) with `tokenizer` (qwen25's Tokenizer) to `output`.

    fmt "hf" (a directory: see `weights.save`) or "gguf" (a file: see `weights.gguf_writer`), inferred from the
    name when None. dtype: hf f32/f16/bf16 (default f32), gguf f32/f16/q8_0 (default f16)."""
    fmt = infer_format(output, fmt)
    dtype = check_export(output, fmt, dtype, overwrite)
    out = Path(output)
    if fmt == "hf":
        def write(path: Path) -> None:
            save_hf_directory(model, path, tokenizer=tokenizer, generation_config=generation_config,
                              max_shard_size=max_shard_size, dtype=dtype)
    else:
        state = hf_state_dict(model)  # refuses LoRA layers and fused/quantized projections up front

        def write(path: Path) -> None:
            write_qwen2_gguf(path, state, model.config, tokenizer, dtype=dtype, name=name)
    with torch.no_grad():
        write_atomically(out, write, overwrite)
    return out
