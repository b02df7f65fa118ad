"""`qwen25 data pack INPUT... --output DIR`: tokenize text, jsonl and parquet into packed token shards.

A config dataclass (its fields are the flags, `qwen25.cli_args`) and `main_pack(cfg)`, which resolves the
tokenizer, shows a progress bar and prints one summary line; `add_data_parser` registers `qwen25 data` with its
sub-commands. The work itself is `qwen25.data.pack.pack`.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from typing import Any

from qwen25.cli_args import add_command, arg
from qwen25.data.pack import DEFAULT_INCLUDE
from qwen25.data.shards import DEFAULT_TOKENS_PER_FILE
from qwen25.weights.registry import DEFAULT_MODEL

PACK_EPILOG = f"""examples:
  qwen25 data pack notes/ --output shards/notes                 every *.txt, *.md, *.jsonl, *.parquet under notes/
  qwen25 data pack corpus.jsonl --output shards/corpus          one document per line: {{"text": "..."}}
  qwen25 data pack data.parquet --text-field content --output shards/web
  qwen25 data pack /usr/lib/python3.13 --include '*.py' --output shards/stdlib
  qwen25 data pack a.jsonl b/ --output shards/ab --tokenizer ~/models/Qwen2.5-0.5B   an HF directory's tokenizer

inputs: a text file is one document; a .jsonl file one document per line (a malformed line is reported with its
line number and skipped); a .parquet file one document per row. Directories are walked recursively in sorted
order, keeping the files --include matches (default: {' '.join(DEFAULT_INCLUDE)}).
output: token files (uint32, 1 KiB header), a document index per file and manifest.json (inputs and their SHA-256,
tokens per input, tokenizer, settings). Written to a temporary directory and renamed when complete; rerunning the
same pack is a no-op, a different pack into the same directory needs --overwrite."""


DATA_DESCRIPTION = """Prepare training data.

  qwen25 data pack INPUT... --output DIR    tokenize text/jsonl/parquet into packed token shards (see its --help)"""


@dataclass
class PackConfig:
    """Tokenize text, jsonl and parquet files into packed token shards."""

    inputs: list[str] = arg(positional=True, nargs="+", metavar="INPUT")
    """text/.jsonl/.parquet files or directories"""
    output: str = arg(short="-o", metavar="DIR")
    """the shard directory to write"""
    tokenizer: str = arg(DEFAULT_MODEL, short="-t", metavar="MODEL_OR_DIR")
    """whose tokenizer: a known model name, a .gguf file or an HF directory"""
    text_field: str = "text"
    """the jsonl field / parquet column holding the text"""
    include: list[str] = arg(default_factory=lambda: list(DEFAULT_INCLUDE), metavar="GLOB")
    """file-name glob to keep when walking directories (repeatable; replaces the default list)"""
    max_tokens_per_file: int = arg(DEFAULT_TOKENS_PER_FILE, metavar="N")
    """start a new token file past this many tokens"""
    overwrite: bool = False
    """replace an output directory that holds a different pack or other files"""
    no_progress: bool = False
    """no progress bar"""


def main_pack(cfg: PackConfig) -> int:
    from tqdm import tqdm

    from qwen25.checkpoint import load_tokenizer
    from qwen25.data.pack import PackSettings, find_sources, pack
    from qwen25.weights.registry import resolve_model

    if cfg.max_tokens_per_file < 1:
        raise ValueError(f"--max-tokens-per-file must be >= 1, got {cfg.max_tokens_per_file}")
    settings = PackSettings(cfg.text_field, tuple(cfg.include), cfg.max_tokens_per_file)
    sources = find_sources(cfg.inputs, settings.include)  # before the tokenizer: a typo fails at once
    tokenizer = load_tokenizer(resolve_model(cfg.tokenizer))
    warnings = 0
    with tqdm(total=sum(s.bytes for s in sources), unit="B", unit_scale=True, desc="packing",
              disable=cfg.no_progress or None, file=sys.stderr) as bar:
        def warn(message: str) -> None:
            nonlocal warnings
            warnings += 1
            if warnings <= 20:
                bar.write(f"qwen25: warning: {message}", file=sys.stderr)
            elif warnings == 21:
                bar.write("qwen25: warning: (further warnings not shown; counts below)", file=sys.stderr)

        result = pack(cfg.inputs, cfg.output, tokenizer, cfg.tokenizer, settings, cfg.overwrite, sources,
                      on_progress=bar.update, warn=warn)
    m = result.manifest
    if result.up_to_date:
        print(f"{result.output}: already holds this pack ({m['num_documents']:,} documents, {m['num_tokens']:,} "
              "tokens); nothing to do")
        return 0
    skipped = ", ".join(f"{n:,} {k.replace('_', ' ').removesuffix('s' if n == 1 else '')}"
                        for k, n in result.skipped.items() if n)
    print(f"packed {m['num_documents']:,} documents, {m['num_tokens']:,} tokens from {len(m['sources']):,} files "
          f"into {result.output} ({len(m['files'])} token files) in {result.seconds:.1f} s"
          + (f"; skipped {skipped}" if skipped else ""))
    return 0


def add_data_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add `qwen25 data` (sub-commands: pack) to the qwen25 command line."""
    p = subparsers.add_parser("data", help="prepare training data: pack text/jsonl/parquet into token shards",
                              description=DATA_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])
    commands = p.add_subparsers(dest="data_command", metavar="COMMAND")
    add_command(commands, "pack", PackConfig, main_pack, help=PackConfig.__doc__.strip().rstrip("."),
                epilog=PACK_EPILOG)
    return p
