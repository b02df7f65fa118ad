"""Packed token shards on disk: a writer that appends documents and a memory-mapped reader.

A shard directory holds `manifest.json` and pairs of files `tokens-NNNNN.bin` + `tokens-NNNNN.idx`:

    tokens-NNNNN.bin   header: 256 x int32 (1,024 bytes), as in llm.c's token files
                         [0] magic 0x54353251 (b"Q25T" little-endian: uint32 tokens)  [1] version (1)
                         [2] number of tokens in the file (< 2**31)  [3] bytes per token (4)
                         [4] number of documents in the file  [5] vocabulary size (0 = not recorded)
                         [6..255] zero
                       then the tokens, uint32 little-endian (Qwen2.5's 151,936 ids do not fit in uint16)
    tokens-NNNNN.idx   header: 256 x int32: [0] magic 0x49353251 (b"Q25I")  [1] version (1)
                         [2] number of documents  [6..255] zero
                       then num_documents + 1 uint64 token offsets into the .bin: document d is
                       tokens[offsets[d]:offsets[d + 1]]; offsets[0] == 0 and offsets[-1] == the token count

Every document ends with the end-of-text token (`<|endoftext|>`, 151643 for Qwen2.5), appended by the writer. A
document never spans two files; the writer starts a new file before a document that would push the current one
past `max_tokens_per_file` (a single larger document gets a file of its own). The manifest lists the files and
totals; `qwen25.data.pack` adds the tokenizer, the inputs and their hashes, and the pack settings. This module
knows nothing of tokenizers or input formats.
"""

from __future__ import annotations

import bisect
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

TOKENS_MAGIC = int.from_bytes(b"Q25T", "little")
INDEX_MAGIC = int.from_bytes(b"Q25I", "little")
VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
TOKEN_DTYPE = np.dtype("<u4")
OFFSET_DTYPE = np.dtype("<u8")
MANIFEST = "manifest.json"
FORMAT_NAME = "qwen25-token-shards"
MAX_TOKENS_PER_FILE = 2**31 - 1  # the header's int32 count
DEFAULT_TOKENS_PER_FILE = 2**27  # 512 MiB of tokens per file

__all__ = ["DEFAULT_TOKENS_PER_FILE", "FORMAT_NAME", "MANIFEST", "ShardError", "ShardReader", "ShardWriter",
           "read_manifest"]


class ShardError(ValueError):
    """A shard directory or file that is missing, not a shard, of another version, or damaged."""


def _header(magic: int, *fields: int) -> bytes:
    h = np.zeros(HEADER_INTS, dtype="<u4")  # the magic is a uint32; the other fields are small non-negative ints
    h[0] = magic
    h[1] = VERSION
    h[2:2 + len(fields)] = fields
    return h.tobytes()


def _read_header(path: Path, magic: int, what: str) -> np.ndarray:
    try:
        with open(path, "rb") as f:
            raw = f.read(HEADER_BYTES)
    except OSError as e:
        raise ShardError(f"{path}: cannot read {what} ({e.strerror or e})") from None
    if len(raw) < HEADER_BYTES:
        raise ShardError(f"{path}: not a qwen25 {what} (only {len(raw)} bytes; the header alone is {HEADER_BYTES})")
    h = np.frombuffer(raw, dtype="<u4")
    if int(h[0]) != magic:
        raise ShardError(f"{path}: not a qwen25 {what} (magic {int(h[0]):#010x}, expected {magic:#010x}); "
                         "write shards with `qwen25 data pack`")
    if int(h[1]) != VERSION:
        raise ShardError(f"{path}: {what} version {int(h[1])}, this qwen25 reads version {VERSION}")
    return h


# --- writing -------------------------------------------------------------------------------------------------
@dataclass
class _OpenFile:
    name: str
    tokens: BinaryIO
    offsets: list[int]


class ShardWriter:
    """Appends documents to token files in `directory`, rolling to a new file at `max_tokens_per_file` tokens.

    `add(ids)` writes `ids` followed by `eot_token_id`; `close()` finishes the last file and writes
    manifest.json with the file list, totals and `manifest_extra`. Use as a context manager; on an exception
    the files are left as they are (the caller writes into a temporary directory and removes it)."""

    def __init__(self, directory: str | Path, eot_token_id: int, vocab_size: int = 0,
                 max_tokens_per_file: int = DEFAULT_TOKENS_PER_FILE):
        if not 1 <= max_tokens_per_file <= MAX_TOKENS_PER_FILE:
            raise ValueError(f"max_tokens_per_file must be in [1, {MAX_TOKENS_PER_FILE}], got {max_tokens_per_file}")
        if vocab_size and not 0 <= eot_token_id < vocab_size:
            raise ValueError(f"eot_token_id {eot_token_id} is outside the vocabulary (size {vocab_size})")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.eot_token_id = eot_token_id
        self.vocab_size = vocab_size
        self.max_tokens_per_file = max_tokens_per_file
        self.files: list[dict[str, Any]] = []
        self.num_tokens = 0
        self.num_documents = 0
        self._open: _OpenFile | None = None

    def add(self, ids: Any) -> int:
        """Append one document (`ids` + end-of-text); returns its length in tokens, the end-of-text included."""
        doc = np.asarray(ids, dtype=np.int64)
        if doc.ndim != 1:
            raise ValueError(f"a document is a 1-D sequence of token ids, got shape {doc.shape}")
        if doc.size and (doc.min() < 0 or (self.vocab_size and doc.max() >= self.vocab_size)):
            raise ValueError(f"token ids must be in [0, {self.vocab_size or 2**32}), got [{doc.min()}, {doc.max()}]")
        n = doc.size + 1
        if n > MAX_TOKENS_PER_FILE:
            raise ValueError(f"a document of {n} tokens does not fit one token file ({MAX_TOKENS_PER_FILE} max)")
        f = self._open
        if f is not None and f.offsets[-1] > 0 and f.offsets[-1] + n > self.max_tokens_per_file:
            self._finish()
            f = None
        if f is None:
            f = self._start()
        f.tokens.write(doc.astype(TOKEN_DTYPE).tobytes())
        f.tokens.write(np.array([self.eot_token_id], dtype=TOKEN_DTYPE).tobytes())
        f.offsets.append(f.offsets[-1] + n)
        self.num_tokens += n
        self.num_documents += 1
        return n

    def close(self, manifest_extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """Finish the last file and write manifest.json; returns the manifest."""
        if self._open is not None:
            self._finish()
        manifest = {"format": FORMAT_NAME, "version": VERSION, "num_documents": self.num_documents,
                    "num_tokens": self.num_tokens, "eot_token_id": self.eot_token_id, "vocab_size": self.vocab_size,
                    "files": self.files, **(manifest_extra or {})}
        path = self.directory / MANIFEST
        path.write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        return manifest

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            if self._open is not None or not (self.directory / MANIFEST).exists():
                self.close()
        elif self._open is not None:
            self._open.tokens.close()

    def _start(self) -> _OpenFile:
        name = f"tokens-{len(self.files):05d}"
        handle = open(self.directory / f"{name}.bin", "wb")
        handle.write(_header(TOKENS_MAGIC, 0, TOKEN_DTYPE.itemsize, 0, self.vocab_size))  # counts patched at the end
        self._open = _OpenFile(name, handle, [0])
        return self._open

    def _finish(self) -> None:
        f = self._open
        assert f is not None
        num_tokens, num_docs = f.offsets[-1], len(f.offsets) - 1
        f.tokens.seek(0)
        f.tokens.write(_header(TOKENS_MAGIC, num_tokens, TOKEN_DTYPE.itemsize, num_docs, self.vocab_size))
        f.tokens.close()
        with open(self.directory / f"{f.name}.idx", "wb") as idx:
            idx.write(_header(INDEX_MAGIC, num_docs))
            idx.write(np.asarray(f.offsets, dtype=OFFSET_DTYPE).tobytes())
        self.files.append({"tokens": f"{f.name}.bin", "index": f"{f.name}.idx", "num_tokens": num_tokens,
                           "num_documents": num_docs})
        self._open = None


# --- reading -------------------------------------------------------------------------------------------------
def read_manifest(directory: str | Path) -> dict[str, Any]:
    """A shard directory's manifest.json, checked for format and version."""
    path = Path(directory) / MANIFEST
    if not Path(directory).is_dir():
        raise ShardError(f"{directory}: no such shard directory (make one with `qwen25 data pack`)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ShardError(f"{directory}: no {MANIFEST}; not a shard directory (or an unfinished pack)") from None
    except (OSError, json.JSONDecodeError) as e:
        raise ShardError(f"{path}: unreadable manifest ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise ShardError(f"{path}: not a qwen25 shard manifest (format {manifest.get('format')!r})"
                         if isinstance(manifest, dict) else f"{path}: not a qwen25 shard manifest")
    if manifest.get("version") != VERSION:
        raise ShardError(f"{path}: shard format version {manifest.get('version')}, this qwen25 reads {VERSION}")
    return manifest


class ShardReader:
    """Read-only view of a shard directory: `len(reader)` documents, `reader[i]` (a uint32 memmap slice, the
    end-of-text included), `num_tokens`, `document_lengths()`. Headers, sizes and indexes are checked on open."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self.manifest = read_manifest(self.directory)
        self.eot_token_id: int = self.manifest["eot_token_id"]
        self._tokens: list[np.ndarray] = []
        self._offsets: list[np.ndarray] = []
        for entry in self.manifest["files"]:
            tokens, offsets = self._open_pair(self.directory / entry["tokens"], self.directory / entry["index"])
            if (tokens.size, offsets.size - 1) != (entry["num_tokens"], entry["num_documents"]):
                raise ShardError(f"{self.directory / entry['tokens']}: holds {tokens.size} tokens in "
                                 f"{offsets.size - 1} documents, the manifest says {entry['num_tokens']} in "
                                 f"{entry['num_documents']}")
            self._tokens.append(tokens)
            self._offsets.append(offsets)
        # the global id of each file's first document, and the total
        self._first_doc = np.cumsum([0] + [o.size - 1 for o in self._offsets]).tolist()
        self.num_tokens = int(sum(t.size for t in self._tokens))
        if (self.num_tokens, len(self)) != (self.manifest["num_tokens"], self.manifest["num_documents"]):
            raise ShardError(f"{self.directory}: files hold {self.num_tokens} tokens in {len(self)} documents, the "
                             f"manifest says {self.manifest['num_tokens']} in {self.manifest['num_documents']}")

    @staticmethod
    def _open_pair(bin_path: Path, idx_path: Path) -> tuple[np.ndarray, np.ndarray]:
        h = _read_header(bin_path, TOKENS_MAGIC, "token file")
        num_tokens, width = int(h[2]), int(h[3])
        if width != TOKEN_DTYPE.itemsize:
            raise ShardError(f"{bin_path}: {width}-byte tokens, expected {TOKEN_DTYPE.itemsize}")
        expected = HEADER_BYTES + num_tokens * width
        if bin_path.stat().st_size != expected:
            raise ShardError(f"{bin_path}: {bin_path.stat().st_size} bytes, the header promises {expected} "
                             "(truncated or damaged)")
        hi = _read_header(idx_path, INDEX_MAGIC, "document index")
        num_docs = int(hi[2])
        if idx_path.stat().st_size != HEADER_BYTES + (num_docs + 1) * OFFSET_DTYPE.itemsize or int(h[4]) != num_docs:
            raise ShardError(f"{idx_path}: size or document count does not match its token file {bin_path.name}")
        tokens = (np.memmap(bin_path, dtype=TOKEN_DTYPE, mode="r", offset=HEADER_BYTES, shape=(num_tokens,))
                  if num_tokens else np.zeros(0, TOKEN_DTYPE))
        offsets = np.fromfile(idx_path, dtype=OFFSET_DTYPE, offset=HEADER_BYTES).astype(np.int64)
        if offsets[0] != 0 or offsets[-1] != num_tokens or np.any(np.diff(offsets) <= 0):
            raise ShardError(f"{idx_path}: offsets are not increasing from 0 to {num_tokens}")
        return tokens, offsets

    def __len__(self) -> int:
        return self._first_doc[-1]

    @property
    def num_documents(self) -> int:
        return len(self)

    def __getitem__(self, i: int) -> np.ndarray:
        """Document i's tokens (its end-of-text last), a read-only view into the memory map."""
        if not -len(self) <= i < len(self):
            raise IndexError(f"document {i} out of range ({len(self)} documents)")
        i %= len(self)
        f = bisect.bisect_right(self._first_doc, i) - 1
        d = i - self._first_doc[f]
        off = self._offsets[f]
        return self._tokens[f][off[d]:off[d + 1]]

    def document_lengths(self) -> np.ndarray:
        """(num_documents,) int64: each document's length in tokens, end-of-text included."""
        return np.concatenate([np.diff(o) for o in self._offsets]) if self._offsets else np.zeros(0, np.int64)
