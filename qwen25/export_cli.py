"""`qwen25 export`: load any checkpoint qwen25 runs, optionally merge a LoRA adapter, write it as an HF
directory or a GGUF file.

The command's config dataclass (its fields are the flags, see `qwen25.cli_args`) and `main_export(cfg)`.
Loading (model + tokenizer + generation defaults) is `qwen25.checkpoint`'s, merging `qwen25.train.lora`'s,
writing `qwen25.weights.export`'s; this module wires them and checks every flag before the slow load.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from qwen25.cli_args import add_command, arg

EXPORT_EPILOG = """examples:
  qwen25 export qwen2.5-coder-0.5b-instruct --output ./qwen-0.5b-hf
        the default model (a Q4_K_M GGUF, dequantized) as an HF directory in fp32: transformers, vLLM,
        `qwen25 chat --model ./qwen-0.5b-hf` load it
  qwen25 export ./qwen-0.5b-hf --output qwen-0.5b-f16.gguf
        an HF directory as a GGUF file in f16, the tokenizer and chat template in its metadata (llama.cpp)
  qwen25 export BASE --merge-lora out/checkpoint-200 --output merged.gguf --dtype q8_0
        a fine-tuned LoRA adapter (peft format) merged into its base, as a Q8_0 GGUF
  qwen25 export out/checkpoint-200 --format hf --dtype bf16 --output ./finetuned --overwrite

formats (--format, default: gguf when --output ends in .gguf, else hf):
  hf    a directory: config.json, generation_config.json, model.safetensors (sharded past --max-shard-size
        with model.safetensors.index.json), tokenizer.json, tokenizer_config.json with the chat template.
        --dtype f32 (default: exactly the weights qwen25 computes with), bf16 or f16.
  gguf  one GGUF v3 file: --dtype f16 (default), f32 or q8_0 for the matrices (norms and biases stay f32).
The output appears whole or not at all (written under a temporary name, then renamed); an existing output
is kept unless --overwrite."""


@dataclass
class ExportConfig:
    """Write a checkpoint as an HF directory or a GGUF file (optionally with a LoRA adapter merged in)."""

    checkpoint: str = arg(positional=True, metavar="CKPT")
    """what to export: a known model name, a .gguf file, an HF directory or a training checkpoint directory"""
    output: str = arg(short="-o", metavar="PATH")
    """the HF directory or .gguf file to write"""
    format: Literal["hf", "gguf"] | None = arg(None, short="-f")
    """output format (default: gguf for a .gguf --output, else hf)"""
    dtype: Literal["f32", "f16", "bf16", "q8_0"] | None = None
    """weight type written (default: f32 for hf, f16 for gguf; bf16 is hf only, q8_0 gguf only)"""
    merge_lora: str | None = arg(None, metavar="ADAPTER_DIR")
    """merge this LoRA adapter (peft format) into the weights before writing"""
    max_shard_size: str = arg("5GB", metavar="SIZE")
    """hf: the largest safetensors file before the weights are split into shards"""
    overwrite: bool = False
    """replace an existing output (only once the new one is complete)"""
    threads: int | None = None
    """torch threads (default: all cores, at most 8)"""


def main_export(cfg: ExportConfig) -> int:
    import torch

    from qwen25.runtime import configure_runtime
    from qwen25.weights.export import check_export, export_model, infer_format
    from qwen25.weights.registry import resolve_model
    from qwen25.weights.save import parse_size

    fmt = infer_format(cfg.output, cfg.format)
    output = Path(cfg.output).expanduser()
    dtype = check_export(output, fmt, cfg.dtype, cfg.overwrite)  # everything a flag can get wrong, before loading
    parse_size(cfg.max_shard_size)
    if cfg.merge_lora is not None:
        from qwen25.train.lora import read_adapter_config

        read_adapter_config(cfg.merge_lora)
    configure_runtime(cfg.threads)
    source = resolve_model(cfg.checkpoint)
    _refuse_bare_adapter(source)
    checkpoint = _load(source, cfg.merge_lora, torch.float32)
    name = Path(str(source)).name.removesuffix(".gguf")
    export_model(checkpoint.model, output, fmt, tokenizer=checkpoint.tokenizer, dtype=dtype,
                 generation_config=_generation_defaults(checkpoint), name=name,
                 max_shard_size=cfg.max_shard_size, overwrite=cfg.overwrite)
    size = sum(p.stat().st_size for p in output.rglob("*")) if output.is_dir() else output.stat().st_size
    merged = f" with {cfg.merge_lora} merged" if cfg.merge_lora else ""
    print(f"wrote {output} ({fmt}, {dtype}, {size / 1e6:.1f} MB) from {source}{merged}")
    print(f"  use it: qwen25 chat --model {output}", file=sys.stderr)
    return 0


def _refuse_bare_adapter(source: Path) -> None:
    if source.is_dir() and (source / "adapter_config.json").is_file() and not (source / "config.json").is_file():
        raise ValueError(f"{source}: is a LoRA adapter, not a model; export its base with --merge-lora {source}")


def _load(source: Path, adapter: str | None, dtype):  # noqa: ANN001, ANN202 - torch dtype, Checkpoint
    if adapter is None:
        from qwen25.checkpoint import load

        return load(source, dtype)
    from qwen25.train.lora import load_merged

    return load_merged(source, adapter, dtype)


def _generation_defaults(checkpoint):  # noqa: ANN001, ANN202 - Checkpoint -> GenerationDefaults
    """What qwen25 samples this checkpoint with, so the export behaves the same: its generation_config.json, or
    for a GGUF (which ships none) Qwen2.5-Instruct's defaults when it is an instruct model."""
    from qwen25.checkpoint import QWEN25_INSTRUCT_DEFAULTS, is_instruct, stop_token_ids
    from qwen25.config import GenerationDefaults

    if checkpoint.generation_defaults is not None:
        return checkpoint.generation_defaults
    eos = checkpoint.config.eos_token_ids
    eos += sorted(stop_token_ids(checkpoint) - set(eos))
    sampling = QWEN25_INSTRUCT_DEFAULTS if is_instruct(checkpoint) else {}
    return GenerationDefaults(**sampling, eos_token_ids=eos)


def add_export_parser(sub) -> None:  # noqa: ANN001 - argparse's subparsers action
    """Register `qwen25 export` (called by `qwen25.cli.build_parser`)."""
    add_command(sub, "export", ExportConfig, main_export, epilog=EXPORT_EPILOG,
                help="write a checkpoint as an HF directory or a GGUF file (optionally merging a LoRA adapter)")
