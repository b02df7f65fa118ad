"""`qwen25 quantize`: write a checkpoint's weights as a quantized GGUF file (Q8_0, or a Q4_K / Q5_0 mix) that
llama.cpp and qwen25 both load.

The command's config dataclass (its fields are the flags, see `qwen25.cli_args`) and `main_quantize(cfg)`.
The blocks and their layout are `qwen25.weights.quantized`'s; this module checks the flags before any work,
builds the tokenizer for the file's metadata (`qwen25.checkpoint`) and writes atomically.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from qwen25.cli_args import add_command, arg

QUANTIZE_EPILOG = """examples:
  qwen25 quantize ~/models/Qwen2.5-1.5B-Instruct                  an HF directory (bf16/fp16/fp32) to Q8_0
  qwen25 chat --model Qwen2.5-1.5B-Instruct-q8_0.gguf              ...which runs the file's own blocks
  qwen25 quantize qwen2.5-coder-0.5b-instruct --bits 4 -o coder-q4.gguf
  llama-cli -m coder-q4.gguf                                      llama.cpp loads the same file

formats (--bits):
  8  every matrix Q8_0: one fp16 scale per 32 int8 weights, 1.06 bytes/weight; perplexity within ~0.1% of
     fp32 on Qwen2.5-Coder-0.5B. What `--quantization q8` builds in memory (and `auto` for a GGUF with --lora).
  4  layer projections Q4_K (0.56 bytes/weight) where a row is a multiple of 256 weights, else Q5_0 (0.69);
     v_proj, the last layer, the embedding and lm_head stay Q8_0. What `--quantization q4` builds in memory.
There is no cache: `--quantization q8|q4` quantizes at load in seconds; a file from this command is for
loading without that step, for llama.cpp, or for sharing. The output appears whole or not at all."""


@dataclass
class QuantizeConfig:
    """Write a model's weights as a quantized GGUF file (Q8_0, or Q4_K/Q5_0) for qwen25 and llama.cpp."""

    source: str = arg(positional=True, metavar="SRC")
    """HF model directory (safetensors), .gguf file or known model name"""
    bits: int = arg(8, short="-b", metavar="{8,4}")
    """8: Q8_0 blocks; 4: Q4_K / Q5_0 blocks (default: 8)"""
    output: str | None = arg(None, short="-o", metavar="FILE")
    """the .gguf file to write (default: SRC's name with -q8_0 / -q4 in the current directory)"""
    overwrite: bool = False
    """replace an existing output (only once the new one is complete)"""
    threads: int | None = None
    """torch threads (default: all cores, at most 8)"""
    no_progress: bool = False
    """no progress bar"""


def _output(cfg: QuantizeConfig) -> Path:
    """The output path, checked: a .gguf file name in an existing directory, not there unless --overwrite."""
    if cfg.output is None:
        stem = Path(cfg.source.rstrip("/")).name.removesuffix(".gguf")
        return Path(f"{stem}-{'q8_0' if cfg.bits == 8 else 'q4'}.gguf")
    output = Path(cfg.output).expanduser()
    if output.suffix != ".gguf" or output.is_dir():
        raise ValueError(f"--output {cfg.output}: must be a file name ending in .gguf")
    if not output.parent.exists():
        raise FileNotFoundError(f"{output.parent}: no such directory for the output")
    return output


def main_quantize(cfg: QuantizeConfig) -> int:
    from tqdm import tqdm

    from qwen25.checkpoint import load_tokenizer
    from qwen25.runtime import configure_runtime
    from qwen25.weights.export import write_atomically
    from qwen25.weights.quantized import check_bits, quantize_checkpoint
    from qwen25.weights.registry import resolve_model

    check_bits(cfg.bits)  # before any download or load
    output = _output(cfg)
    if output.exists() and not cfg.overwrite:
        raise FileExistsError(f"{output}: already exists (choose another --output, or --overwrite to replace it)")
    configure_runtime(cfg.threads)
    source = resolve_model(cfg.source)
    tokenizer = load_tokenizer(source)
    result = None
    with tqdm(desc=f"quantizing to q{cfg.bits}", unit="tensor", disable=cfg.no_progress or None) as bar:
        def progress(total: int):  # noqa: ANN202
            bar.reset(total)
            return lambda: bar.update(1)

        def write(path: Path) -> None:
            nonlocal result
            result = quantize_checkpoint(source, path, tokenizer, cfg.bits, progress)

        write_atomically(output, write, cfg.overwrite)
    print(f"wrote {output}")
    print(f"  q{result.bits}: {result.file_bytes / 1e6:.1f} MB for {result.weights / 1e6:.1f}M weights = "
          f"{result.bytes_per_weight:.3f} bytes/weight ({8 * result.bytes_per_weight:.2f} bits), in "
          f"{result.seconds:.1f} s")
    print(f"  decoder-layer projections: {result.layer_bytes_per_weight:.3f} bytes/weight; embedding and "
          "lm_head: Q8_0")
    print(f"  use it: qwen25 chat --model {output}", file=sys.stderr)
    return 0


def add_quantize_parser(sub) -> None:  # noqa: ANN001 - argparse's subparsers action
    """Register `qwen25 quantize` (called by `qwen25.cli.build_parser`)."""
    add_command(sub, "quantize", QuantizeConfig, main_quantize, epilog=QUANTIZE_EPILOG,
                help="write a model's weights as a quantized GGUF file (Q8_0, or Q4_K/Q5_0) for qwen25 and llama.cpp")
