"""Ingest for `qwen25 data run`: text files, directories, jsonl and parquet -> `Document`s with id, source, metadata.

A text file is one document (id: its path relative to the input it was found under; source: the `source` given
for that input, else the input's name). A `.jsonl` line is one document: `{"text": str, "id"?: str|int,
"source"?: str, ...}`, every other field kept as metadata; a `.parquet` row likewise (the `text` column must be
strings; other columns become metadata). A record without an id gets `<file>:<line>` (`<file>:<row>` for parquet).
A malformed record (not JSON, not an object, no string text, undecodable file) is never silently lost: it is
reported as `Malformed(file, line, reason)`, skipped and counted. Empty documents are counted as `empty`.

The order is deterministic: inputs as given, directories walked in sorted order (`qwen25.data.pack.find_sources`),
records in file order. Nothing here filters or tokenizes.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qwen25.data.pack import DEFAULT_INCLUDE, find_sources

__all__ = ["Document", "Malformed", "input_specs", "iter_documents"]


@dataclass
class Document:
    id: str
    source: str
    text: str
    metadata: dict[str, Any] = field(default_factory=dict)

    def record(self) -> dict[str, Any]:
        return {"id": self.id, "source": self.source, "text": self.text, "metadata": self.metadata}

    @classmethod
    def from_record(cls, r: dict[str, Any]) -> Document:
        return cls(r["id"], r["source"], r["text"], r.get("metadata") or {})


@dataclass(frozen=True)
class Malformed:
    file: str
    line: int  # 1-based line (jsonl) or row (parquet); 0 for a whole file
    reason: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.reason}" if self.line else f"{self.file}: {self.reason}"


Item = Document | Malformed | None  # None: an empty document (counted, not kept)


def iter_documents(inputs: Sequence[str | Path | dict[str, Any]], include: Sequence[str] = DEFAULT_INCLUDE,
                   text_field: str = "text") -> Iterator[tuple[Item, str]]:
    """(document | Malformed | None for an empty one, input file path) for every record of `inputs` in order.

    An input is a path or `{"path": ..., "source": ..., "include": [globs]}`; `source` names the documents'
    source (default: the input's file or directory name) unless a jsonl/parquet record carries its own
    `source`; `include` replaces the run's file-name globs for a directory input."""
    for root, default_source, globs in input_specs(inputs, include):
        for src in find_sources([root], globs):
            rel = str(src.path.relative_to(root)) if root.is_dir() else src.path.name
            name = str(src.path)
            if src.kind == "jsonl":
                for item in _jsonl(src.path, rel, default_source, text_field):
                    yield item, name
            elif src.kind == "parquet":
                for item in _parquet(src.path, rel, default_source, text_field):
                    yield item, name
            else:
                yield _text_file(src.path, rel, default_source), name


def input_specs(inputs: Sequence[str | Path | dict[str, Any]],
                include: Sequence[str]) -> list[tuple[Path, str, list[str]]]:
    """(path, source, include globs) of each input: a path, or {"path", "source"?, "include"?}."""
    out = []
    for given in inputs:
        spec = given if isinstance(given, dict) else {"path": str(given)}
        if not isinstance(spec.get("path"), str):
            raise ValueError(f"input {given!r}: needs a 'path' string")
        unknown = set(spec) - {"path", "source", "include"}
        if unknown:
            raise ValueError(f"input {given!r}: unknown key {', '.join(sorted(unknown))} (path, source, include)")
        root = Path(spec["path"]).expanduser()
        out.append((root, str(spec.get("source") or root.stem), list(spec.get("include") or include)))
    return out


def _text_file(path: Path, rel: str, source: str) -> Item:
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return Malformed(str(path), 0, f"not UTF-8 text ({e.reason})")
    if "\x00" in text:
        return Malformed(str(path), 0, "NUL bytes (binary file)")
    return Document(rel, source, text, {"file": rel}) if text.strip() else None


def _from_record(record: dict[str, Any], text_field: str, where: str, source: str) -> Document | None:
    text = record[text_field]
    if not text.strip():
        return None
    doc_id = record.get("id")
    metadata = {k: v for k, v in record.items() if k not in (text_field, "id", "source")}
    return Document(str(doc_id) if doc_id is not None else where, str(record.get("source") or source), text, metadata)


def _jsonl(path: Path, rel: str, source: str, text_field: str) -> Iterator[Item]:
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError:
                yield Malformed(str(path), lineno, "not UTF-8")
                continue
            except json.JSONDecodeError as e:
                yield Malformed(str(path), lineno, f"not valid JSON ({e.msg} at column {e.colno})")
                continue
            if not isinstance(record, dict):
                yield Malformed(str(path), lineno, f"expected a JSON object, got {type(record).__name__}")
            elif not isinstance(record.get(text_field), str):
                got = "missing" if text_field not in record else f"it holds {type(record[text_field]).__name__}"
                yield Malformed(str(path), lineno, f"no {text_field!r} string field ({got})")
            else:
                yield _from_record(record, text_field, f"{rel}:{lineno}", source)


def _parquet(path: Path, rel: str, source: str, text_field: str) -> Iterator[Item]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise ValueError(f"{path}: reading parquet needs pyarrow (pip install 'qwen25[data]')") from None
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        yield Malformed(str(path), 0, f"not a readable parquet file ({e})")
        return
    if text_field not in pf.schema_arrow.names:
        yield Malformed(str(path), 0, f"no column {text_field!r} (columns: {', '.join(pf.schema_arrow.names)})")
        return
    row = 0
    for batch in pf.iter_batches(batch_size=1024):
        for record in batch.to_pylist():
            row += 1
            if not isinstance(record.get(text_field), str):
                yield Malformed(str(path), row, f"{text_field!r} is {type(record.get(text_field)).__name__}")
            else:
                yield _from_record(record, text_field, f"{rel}:{row}", source)
