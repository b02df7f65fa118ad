"""Text, jsonl and parquet inputs -> a tokenized shard directory (`qwen25.data.shards`), written atomically.

Inputs: a text file is one document (UTF-8; a file that is not UTF-8 text is reported and skipped); a `.jsonl`
file holds one document per line in a string field (`text` by default; a malformed line is reported with its
file and line number, skipped and counted); a `.parquet` file holds one document per row of a string column (a
missing column is an error). A directory is walked recursively in sorted order, keeping files whose name matches
one of the include globs (hidden files and directories are skipped). Text is tokenized with special-token
strings kept as plain text, so a literal `<|endoftext|>` inside a document cannot fake a document boundary.

The pack is written to a temporary directory beside the output and renamed into place only when complete, so an
error or an interrupt never leaves a half-written pack. The manifest records the inputs (path, size, SHA-256,
documents and tokens each), the tokenizer (name, vocabulary size, end-of-text id, SHA-256 of its definition) and
the settings; their `fingerprint` tells a rerun of the same pack (nothing to do) from a different one (refused
unless `overwrite`). The command line around this is `qwen25.data.cli`.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import shutil
import tempfile
import time
import weakref
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from qwen25.data.shards import MANIFEST, ShardWriter, read_manifest
from qwen25.tokenizer import Tokenizer

EOT_TOKEN = "<|endoftext|>"
DEFAULT_INCLUDE = ("*.txt", "*.md", "*.jsonl", "*.parquet")
_BATCH_DOCS = 256  # documents tokenized together (the Rust side runs a batch on all cores)
_BATCH_CHARS = 8 << 20

__all__ = ["DEFAULT_INCLUDE", "PackResult", "PackSettings", "Source", "find_sources", "pack"]


@dataclass(frozen=True)
class PackSettings:
    text_field: str = "text"
    include: tuple[str, ...] = DEFAULT_INCLUDE
    max_tokens_per_file: int = 2**27


@dataclass
class Source:
    """One input file: its kind (text/jsonl/parquet), size and content hash, and what packing it gave."""

    path: Path
    kind: str
    bytes: int = 0
    sha256: str = ""
    documents: int = 0
    tokens: int = 0
    skipped: int = 0

    def record(self) -> dict[str, Any]:
        return {**asdict(self), "path": str(self.path)}


@dataclass
class PackResult:
    output: Path
    manifest: dict[str, Any]
    up_to_date: bool = False  # the output already held this exact pack; nothing was written
    seconds: float = 0.0
    skipped: dict[str, int] = field(default_factory=dict)


# --- inputs --------------------------------------------------------------------------------------------------
def _kind(path: Path) -> str:
    suffix = path.suffix.lower()
    return "jsonl" if suffix == ".jsonl" else "parquet" if suffix == ".parquet" else "text"


def find_sources(inputs: Sequence[str | Path], include: Sequence[str] = DEFAULT_INCLUDE) -> list[Source]:
    """The input files in order: files as given, directories walked recursively (sorted, include globs)."""
    sources: list[Source] = []
    seen: set[Path] = set()
    for given in inputs:
        path = Path(given).expanduser()
        if path.is_file():
            found = [path]
        elif path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and _wanted(p.relative_to(path), include))
            if not found:
                raise ValueError(f"{given}: no files match --include {' '.join(include)}")
        else:
            raise FileNotFoundError(f"{given}: no such file or directory")
        for p in found:
            if p.resolve() not in seen:
                seen.add(p.resolve())
                sources.append(Source(p, _kind(p), p.stat().st_size))
    if not sources:
        raise ValueError("no input files given")
    return sources


def _wanted(relative: Path, include: Sequence[str]) -> bool:
    if any(part.startswith(".") for part in relative.parts):
        return False
    return any(fnmatch.fnmatch(relative.name, g) or fnmatch.fnmatch(str(relative), g) for g in include)


def _hash_file(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


Warn = Callable[[str], None]


def read_documents(source: Source, text_field: str, skipped: Counter, warn: Warn) -> Iterator[tuple[str, int]]:
    """(text, bytes of input consumed) for each document of `source`; bad lines and files are warned and counted,
    and come through as empty text (progress only, never packed)."""
    if source.kind == "jsonl":
        yield from _read_jsonl(source, text_field, skipped, warn)
    elif source.kind == "parquet":
        yield from _read_parquet(source, text_field, skipped)
    else:
        raw = source.path.read_bytes()
        try:
            text = raw.decode("utf-8")
            if "\x00" in text:
                raise UnicodeDecodeError("utf-8", raw, 0, 1, "NUL bytes (binary file)")
        except UnicodeDecodeError as e:
            warn(f"{source.path}: not UTF-8 text ({e.reason}); skipped")
            skipped["undecodable_files"] += 1
            text = ""
        else:
            if not text.strip():
                skipped["empty_documents"] += 1
                text = ""
        source.skipped += not text
        yield text, len(raw)


def _read_jsonl(source: Source, text_field: str, skipped: Counter, warn: Warn) -> Iterator[tuple[str, int]]:
    with open(source.path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            problem = None
            try:
                record = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError:
                problem = "not UTF-8"
            except json.JSONDecodeError as e:
                problem = f"not valid JSON ({e.msg} at column {e.colno})"
            else:
                if not isinstance(record, dict):
                    problem = f"expected a JSON object, got {type(record).__name__}"
                elif not isinstance(record.get(text_field), str):
                    got = "missing" if text_field not in record else f"it holds {type(record[text_field]).__name__}"
                    problem = f"no {text_field!r} string field ({got}; choose the field with --text-field)"
            if problem is not None:
                warn(f"{source.path}:{lineno}: {problem}; skipped")
                skipped["malformed_lines"] += 1
                source.skipped += 1
                text = ""
            else:
                text = record[text_field]
                if not text.strip():
                    skipped["empty_documents"] += 1
                    source.skipped += 1
                    text = ""
            yield text, len(raw)  # empty text: progress only, nothing is packed


def _read_parquet(source: Source, text_field: str, skipped: Counter) -> Iterator[tuple[str, int]]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise ValueError(f"{source.path}: reading parquet needs pyarrow (pip install 'qwen25[data]')") from None
    try:
        pf = pq.ParquetFile(source.path)
    except (pa.ArrowException, OSError) as e:
        raise ValueError(f"{source.path}: not a readable parquet file ({e})") from None
    names = pf.schema_arrow.names
    if text_field not in names:
        raise ValueError(f"{source.path}: no column {text_field!r} (columns: {', '.join(names)}); "
                         "choose one with --text-field")
    column_type = pf.schema_arrow.field(text_field).type
    if not (pa.types.is_string(column_type) or pa.types.is_large_string(column_type)):
        raise ValueError(f"{source.path}: column {text_field!r} holds {column_type}, not strings")
    rows = max(pf.metadata.num_rows, 1)
    for batch in pf.iter_batches(columns=[text_field], batch_size=1024):
        step = source.bytes * batch.num_rows // rows  # progress: a batch's share of the file, on its first row
        for text in batch.column(0).to_pylist():
            if text is None or not text.strip():
                skipped["empty_documents"] += 1
                source.skipped += 1
                text = ""
            yield text, step
            step = 0


# --- packing -------------------------------------------------------------------------------------------------
_ENCODERS: weakref.WeakKeyDictionary[Tokenizer, tuple[str, Any]] = weakref.WeakKeyDictionary()


def _plain_text_encoder(tokenizer: Tokenizer) -> tuple[str, Any]:
    """(SHA-256 of the tokenizer's definition, a copy of its backend that encodes special-token strings as
    ordinary text); kept per tokenizer object, since building the copy takes about a second."""
    if tokenizer not in _ENCODERS:
        from tokenizers import Tokenizer as RustTokenizer

        spec = tokenizer.backend.to_str()
        backend = RustTokenizer.from_str(spec)
        backend.encode_special_tokens = True
        _ENCODERS[tokenizer] = (hashlib.sha256(spec.encode()).hexdigest(), backend)
    return _ENCODERS[tokenizer]


def _fingerprint(sources: Sequence[Source], settings: PackSettings, tokenizer_sha: str) -> str:
    spec = {"inputs": [s.sha256 for s in sources], "settings": asdict(settings), "tokenizer": tokenizer_sha}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


def _check_output(output: Path, fingerprint: str, overwrite: bool) -> bool:
    """True when `output` already holds this pack; raises when it holds something else and overwrite is off."""
    if output.exists() and not output.is_dir():
        raise ValueError(f"--output {output}: exists and is not a directory")
    if not output.exists() or not any(output.iterdir()) or overwrite:
        return False
    if (output / MANIFEST).is_file():
        try:
            same = read_manifest(output).get("fingerprint") == fingerprint
        except ValueError:
            same = False
        if same:
            return True
        raise ValueError(f"--output {output}: holds a different pack (other inputs, tokenizer or settings); "
                         "pass --overwrite to replace it")
    raise ValueError(f"--output {output}: exists and holds other files; pass --overwrite to replace it, or choose "
                     "an empty or new directory")


def pack(inputs: Sequence[str | Path], output: str | Path, tokenizer: Tokenizer, tokenizer_name: str,
         settings: PackSettings = PackSettings(), overwrite: bool = False, sources: list[Source] | None = None,
         on_progress: Callable[[int], None] | None = None, warn: Warn | None = None) -> PackResult:
    """Tokenize `inputs` into a shard directory at `output` (see the module docstring).

    `sources` (from `find_sources`) may be passed to avoid walking the inputs twice; `on_progress(n)` is called
    with the input bytes consumed, `warn(message)` with each skipped line or file."""
    start = time.perf_counter()
    output = Path(output).expanduser()
    sources = sources if sources is not None else find_sources(inputs, settings.include)
    eot = tokenizer.token_to_id(EOT_TOKEN)
    if eot is None:
        raise ValueError(f"tokenizer {tokenizer_name} has no {EOT_TOKEN} token")
    for s in sources:
        s.sha256 = _hash_file(s.path)
    tokenizer_sha, encoder = _plain_text_encoder(tokenizer)
    fingerprint = _fingerprint(sources, settings, tokenizer_sha)
    if _check_output(output, fingerprint, overwrite):
        return PackResult(output, read_manifest(output), up_to_date=True, seconds=time.perf_counter() - start)

    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.partial-", dir=output.parent))
    try:
        skipped: Counter = Counter()
        with ShardWriter(tmp, eot, tokenizer.vocab_size, settings.max_tokens_per_file) as writer:
            for source in sources:
                _pack_source(source, writer, encoder, settings.text_field, skipped, warn or (lambda m: None),
                             on_progress or (lambda n: None))
            manifest = writer.close({
                "tokenizer": {"name": tokenizer_name, "vocab_size": tokenizer.vocab_size, "eot_token_id": eot,
                              "sha256": tokenizer_sha},
                "settings": {**asdict(settings), "special_tokens_in_text": "encoded as plain text"},
                "skipped": {k: skipped[k] for k in ("malformed_lines", "empty_documents", "undecodable_files")},
                "sources": [s.record() for s in sources],
                "fingerprint": fingerprint,
            })
        _replace_dir(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return PackResult(output, manifest, seconds=time.perf_counter() - start, skipped=dict(manifest["skipped"]))


def _pack_source(source: Source, writer: ShardWriter, encoder: Any, text_field: str, skipped: Counter, warn: Warn,
                 on_progress: Callable[[int], None]) -> None:
    batch: list[str] = []
    consumed = chars = 0

    def flush() -> None:
        nonlocal consumed, chars
        for encoding in encoder.encode_batch_fast(batch, add_special_tokens=False):
            source.tokens += writer.add(encoding.ids)
            source.documents += 1
        on_progress(consumed)
        batch.clear()
        consumed = chars = 0

    for text, nbytes in read_documents(source, text_field, skipped, warn):
        consumed += nbytes
        if text:
            batch.append(text)
            chars += len(text)
        if len(batch) >= _BATCH_DOCS or chars >= _BATCH_CHARS:
            flush()
    flush()


def _replace_dir(tmp: Path, output: Path) -> None:
    """Move the finished `tmp` to `output`, replacing what is there (already allowed by _check_output)."""
    old = None
    if output.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{output.name}.old-", dir=output.parent))
        output.rename(old / "pack")
    tmp.rename(output)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
