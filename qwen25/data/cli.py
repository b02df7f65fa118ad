"""`qwen25 data run CONFIG` (the pipeline, `qwen25.data.pipeline`) and `qwen25 data pack INPUT... --output DIR`
(tokenize text, jsonl and parquet into packed token shards, `qwen25.data.pack`).

Config dataclasses (their fields are the flags, `qwen25.cli_args`) and `main_run` / `main_pack`, which show
progress bars and print one summary line; `add_data_parser` registers `qwen25 data` with its sub-commands.
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

  qwen25 data run CONFIG                    filter, dedup, decontaminate, score, mix and pack (see its --help)
  qwen25 data pack INPUT... --output DIR    tokenize text/jsonl/parquet into packed token shards (see its --help)"""

RUN_EPILOG = """a minimal config (TOML; every table and key is described in qwen25/data/run_config.py):

  inputs = ["corpus/", {path = "web.jsonl", source = "web"}, {path = "src/", source = "code", include = ["*.py"]}]
  output = "shards/mix"
  [filters]
  min_doc_words = 50
  [decontaminate]
  benchmarks = ["humaneval", "mmlu", "champ"]     # n-gram overlap with qwen25's eval sets (10-grams)
  [quality]
  enabled = true                                   # Qwen2.5 judge on qwen25's engine, then a fast classifier
  [mixture]
  weights = {web = 0.5, code = 2.0}

stages: ingest -> heuristic filters (Gopher quality + repetition, C4 lines, code rules, language ID) and
decontamination -> exact + MinHash dedup -> quality -> mixture -> tokenize and pack. Stage outputs are kept in
work_dir (default <output>.work): a killed run started again with the same config resumes from the finished
shards. The output holds the token shards (train them with `qwen25 train pretrain --data DIR`), manifest.json,
removed.jsonl, report.md and report.png.

examples:
  qwen25 data run mix.toml
  qwen25 data run mix.toml --ray local --num-cpus 2      the same stages on a local Ray
  qwen25 data run mix.toml --ray ray://head:10001         on a Ray cluster (work_dir on a shared file system)"""


@dataclass
class RunCommandConfig:
    """Run the data pipeline of a TOML/JSON config: filter, dedup, decontaminate, score, mix, pack."""

    pipeline: str = arg(positional=True, metavar="CONFIG")
    """the pipeline config (.toml or .json)"""
    ray: str | None = arg(None, metavar="ADDRESS")
    """run the per-shard stages as Ray tasks: 'local' starts a Ray for this run, else a cluster address"""
    num_cpus: int | None = arg(None, metavar="N")
    """CPUs of the local Ray (default: all)"""
    no_progress: bool = False
    """no progress bars"""


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


def main_run(cfg: RunCommandConfig) -> int:
    from qwen25.data.executor import make_executor
    from qwen25.data.pipeline import run
    from qwen25.data.run_config import load_run_config

    config = load_run_config(cfg.pipeline)
    executor = make_executor(cfg.ray, cfg.num_cpus)
    try:
        result = run(config, executor, progress=not cfg.no_progress,
                     warn=lambda m: print(f"qwen25: warning: {m}", file=sys.stderr))
    finally:
        executor.close()
    m = result.manifest
    c = m["pipeline"]["counts"]
    resumed = sum(result.resumed.values())
    print(f"{c['documents_in']:,} documents in, {c['kept_documents']:,} kept; packed {m['num_documents']:,} "
          f"documents, {m['num_tokens']:,} tokens into {result.output} in {sum(result.seconds.values()):.1f} s"
          + (f" ({resumed} shard stages resumed)" if resumed else "") + f"; report: {result.output / 'report.md'}")
    for note in result.notes:
        print(f"note: {note}")
    return 0


def add_data_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add `qwen25 data` (sub-commands: run, pack) to the qwen25 command line."""
    p = subparsers.add_parser("data", help="prepare training data: filter, dedup, mix and pack into token shards",
                              description=DATA_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])
    commands = p.add_subparsers(dest="data_command", metavar="COMMAND")
    add_command(commands, "run", RunCommandConfig, main_run, help=RunCommandConfig.__doc__.strip().rstrip("."),
                epilog=RUN_EPILOG)
    add_command(commands, "pack", PackConfig, main_pack, help=PackConfig.__doc__.strip().rstrip("."),
                epilog=PACK_EPILOG)
    return p
