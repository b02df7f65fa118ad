"""Training batches: `Batch`, `PackedLoader` (pretraining, from token shards) and `SFTLoader` (chat jsonl).

Both loaders fill rows of up to `seq_len` tokens with several documents each; a batch is as wide as its
longest row (at least 2), the shorter rows padded; `document_ids` numbers the documents of a row 0, 1, 2, ...
(padding is one more document of its own), and the model restarts positions and
masks attention at each change (`qwen25.model.rope.positions_in_documents`, `qwen25.model.attention`). labels[t]
is the token after t in the same document, -100 at each document's last token, on padding and (SFT) on every
token that is not the assistant's.

PackedLoader: each epoch concatenates the documents in a shuffled order (numpy's default_rng seeded with
(seed, epoch)) and cuts the stream into rows; a document longer than what is left of a row continues at the start
of the next row, its positions restarting there. SFTLoader: conversations are packed whole into rows (a longer conversation is truncated or dropped, counted), best-fit decreasing by default (longest first,
each into the fullest row it still fits: a few % padding where next-fit leaves ~20%) or next-fit in an order
shuffled once from `seed` (`packing="next_fit"`); each epoch shuffles the order of those rows with (seed, epoch).

Rows are dealt out per step: step s takes global rows [s*W*B, (s+1)*W*B) and rank r its B rows starting at
s*W*B + r*B, so ranks read disjoint rows and all take the same number of steps (with drop_last=False a rank past
the last row takes its step on one 2-token padding row that trains nothing). The position is the number of global rows consumed in the
current epoch: `state_dict()` after k batches and `load_state_dict` into a fresh loader continue with batch k + 1
(at another world size or batch size too: the next step starts at the first row not consumed). Iterating to the
end moves to the next epoch. One iteration at a time per loader.
"""

from __future__ import annotations

import bisect
import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from qwen25.data.shards import ShardReader
from qwen25.tokenizer import Tokenizer
from qwen25.train.sft_data import IGNORE_INDEX, EncodedConversation, load_sft_file

__all__ = ["IGNORE_INDEX", "Batch", "PackedLoader", "SFTLoader"]


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, T) int64
    labels: torch.Tensor  # (B, T) int64: the next token of the same document; -100 where no loss
    document_ids: torch.Tensor  # (B, T) int64: documents of each row numbered from 0; padding is one of its own
    num_loss_tokens: int  # (labels != -100).sum()


Piece = tuple[np.ndarray, np.ndarray]  # (input ids, labels) of one document (or part of one) in a row


def _assemble(pieces: list[Piece]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One row's content: the pieces side by side, their documents numbered 0, 1, 2... (no padding yet)."""
    if not pieces:
        return (np.zeros(0, np.int64),) * 3
    ids = np.concatenate([piece_ids for piece_ids, _ in pieces]).astype(np.int64, copy=False)
    labels = np.concatenate([piece_labels for _, piece_labels in pieces]).astype(np.int64, copy=False)
    docs = np.repeat(np.arange(len(pieces), dtype=np.int64), [piece_ids.size for piece_ids, _ in pieces])
    return ids, labels, docs


def _pad_batch(rows: list[tuple[np.ndarray, np.ndarray, np.ndarray]], pad_id: int) -> tuple[torch.Tensor, ...]:
    """The rows padded to the longest of them (at least 2 columns): padding is one more document of its own, with
    no labels. Trailing padding trains nothing, so the batch is only as wide as its content."""
    width = max(2, *(ids.size for ids, _, _ in rows))
    ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    labels = np.full((len(rows), width), IGNORE_INDEX, dtype=np.int64)
    docs = np.empty((len(rows), width), dtype=np.int64)
    for r, (row_ids, row_labels, row_docs) in enumerate(rows):
        n = row_ids.size
        ids[r, :n], labels[r, :n], docs[r, :n] = row_ids, row_labels, row_docs
        docs[r, n:] = row_docs[-1] + 1 if n else 0
    return torch.from_numpy(ids), torch.from_numpy(labels), torch.from_numpy(docs)


class _RowLoader:
    """Epochs, rank slicing and the resumable position; subclasses say how many rows an epoch has and build them."""

    kind = ""
    pad_id = 0

    def __init__(self, seq_len: int, batch_size: int, seed: int, rank: int, world_size: int, drop_last: bool):
        if seq_len < 2 or batch_size < 1:
            raise ValueError(f"seq_len must be >= 2 and batch_size >= 1, got {seq_len} and {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        self.seq_len, self.batch_size, self.seed = seq_len, batch_size, seed
        self.rank, self.world_size, self.drop_last = rank, world_size, drop_last
        self.epoch = 0
        self._consumed = 0  # global rows of this epoch already handed out (all ranks)
        self.stats: dict[str, int] = {}

    # subclass hooks
    def _row_counts(self) -> tuple[int, int]:
        """(rows in an epoch, rows that are full)."""
        raise NotImplementedError

    def _build_row(self, epoch: int, row: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        raise NotImplementedError

    def _identity(self) -> dict[str, Any]:
        """What must match for a saved position to mean the same rows (data, seed, seq_len)."""
        return {"kind": self.kind, "seed": self.seed, "seq_len": self.seq_len}

    # public API
    def _steps_from(self, consumed: int) -> int:
        rows, full = self._row_counts()
        per_step = self.world_size * self.batch_size
        return max(full - consumed, 0) // per_step if self.drop_last else -(-max(rows - consumed, 0) // per_step)

    def __len__(self) -> int:
        """Batches per epoch for each rank."""
        return self._steps_from(0)

    def _check_not_empty(self, what: str) -> None:
        if len(self) == 0:
            raise ValueError(f"{what} fills {self._row_counts()[0]} rows of {self.seq_len} tokens: fewer than one step "
                             f"of {self.world_size} rank(s) x batch size {self.batch_size} (lower the batch size or "
                             "seq_len, or keep the last partial step with drop_last=False)")

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch to iterate; the position restarts unless it is already this epoch (a resume)."""
        if epoch != self.epoch:
            self.epoch, self._consumed = epoch, 0

    def __iter__(self) -> Iterator[Batch]:
        rows, _ = self._row_counts()
        per_step = self.world_size * self.batch_size
        epoch, start = self.epoch, self._consumed
        for step in range(self._steps_from(start)):
            first = start + step * per_step + self.rank * self.batch_size
            built = [self._build_row(epoch, r) for r in range(first, min(first + self.batch_size, rows))]
            # past the last row: one padding row, so every rank still takes the step
            ids, labels, docs = _pad_batch(built or [_assemble([])], self.pad_id)
            self._consumed = start + (step + 1) * per_step
            yield Batch(ids, labels, docs, int((labels != IGNORE_INDEX).sum()))
        if self.epoch == epoch:
            self.epoch, self._consumed = epoch + 1, 0

    def state_dict(self) -> dict[str, Any]:
        """The position in the data: epoch and global rows consumed, plus what identifies the data."""
        return {"epoch": self.epoch, "rows_consumed": self._consumed, **self._identity()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a `state_dict()`; ValueError when it was saved for other data, seed or seq_len."""
        mine = self._identity()
        for key, value in mine.items():
            if state.get(key) != value:
                raise ValueError(f"data position was saved for {key}={state.get(key)!r}, this loader has "
                                 f"{value!r}: resume with the same data and settings")
        self.epoch, self._consumed = int(state["epoch"]), int(state["rows_consumed"])


class PackedLoader(_RowLoader):
    """Pretraining batches from a shard directory (`qwen25 data pack`); see the module docstring."""

    kind = "packed"

    def __init__(self, shard_dir: str | Path, seq_len: int, batch_size: int, seed: int, rank: int = 0,
                 world_size: int = 1, drop_last: bool = True):
        super().__init__(seq_len, batch_size, seed, rank, world_size, drop_last)
        self.reader = ShardReader(shard_dir)
        self.pad_id = self.reader.eot_token_id
        self._lengths = self.reader.document_lengths()
        self._order_epoch: int | None = None
        self._order = self._starts = np.zeros(0, np.int64)
        n = self.reader.num_tokens
        self.stats = {"documents": len(self.reader), "tokens": n}
        self._check_not_empty(f"{shard_dir}: {n} tokens")

    def _identity(self) -> dict[str, Any]:
        m = self.reader.manifest
        return {**super()._identity(), "data": m.get("fingerprint") or f"{m['num_documents']}:{m['num_tokens']}"}

    def _row_counts(self) -> tuple[int, int]:
        n = self.reader.num_tokens
        return -(-n // self.seq_len), n // self.seq_len

    def _epoch_order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(document order, stream offset of each document in that order + the total) for an epoch."""
        if self._order_epoch != epoch:
            self._order = np.random.default_rng([self.seed, epoch]).permutation(len(self._lengths))
            self._starts = np.concatenate([[0], np.cumsum(self._lengths[self._order])])
            self._order_epoch = epoch
        return self._order, self._starts

    def _build_row(self, epoch: int, row: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        order, starts = self._epoch_order(epoch)
        a, b = row * self.seq_len, min((row + 1) * self.seq_len, int(starts[-1]))
        pieces: list[Piece] = []
        i = int(np.searchsorted(starts, a, side="right")) - 1
        while i < order.size and starts[i] < b:
            doc = np.asarray(self.reader[int(order[i])], dtype=np.int64)
            s, e = max(a, starts[i]) - starts[i], min(b, starts[i + 1]) - starts[i]
            labels = doc[s + 1:e + 1]
            if e == doc.size:  # the document's last token predicts nothing
                labels = np.append(labels, IGNORE_INDEX)
            pieces.append((doc[s:e], labels))
            i += 1
        return _assemble(pieces)


class SFTLoader(_RowLoader):
    """SFT batches from a jsonl of conversations (`qwen25.train.sft_data`); see the module docstring.

    overlong: "truncate" keeps a conversation's first seq_len tokens, "drop" leaves it out; either way it is
    counted in `stats`, and a truncated conversation left without an assistant token is dropped too. A malformed
    line raises ValueError naming it; a conversation without an assistant turn is skipped and counted."""

    kind = "sft"

    def __init__(self, path_jsonl: str | Path, tokenizer: Tokenizer, chat_template: str | None, seq_len: int,
                 batch_size: int, seed: int, rank: int = 0, world_size: int = 1, *,
                 overlong: Literal["truncate", "drop"] = "truncate", drop_last: bool = False,
                 pad_token_id: int | None = None, packing: Literal["best_fit", "next_fit"] = "best_fit"):
        super().__init__(seq_len, batch_size, seed, rank, world_size, drop_last)
        if overlong not in ("truncate", "drop"):
            raise ValueError(f"overlong must be 'truncate' or 'drop', got {overlong!r}")
        if packing not in PACKINGS:
            raise ValueError(f"packing must be one of {sorted(PACKINGS)}, got {packing!r}")
        conversations, stats = load_sft_file(path_jsonl, tokenizer, chat_template)
        stats.update(truncated=0, dropped_too_long=0)
        kept: list[EncodedConversation] = []
        for conv in conversations:
            if len(conv) > seq_len:
                if overlong == "drop" or conv.truncated(seq_len).num_loss_tokens == 0:
                    stats["dropped_too_long"] += 1
                    continue
                stats["truncated"] += 1
                conv = conv.truncated(seq_len)
            kept.append(conv)
        if not kept:
            raise ValueError(f"{path_jsonl}: no conversation left to train on ({dict(stats)})")
        self.conversations = kept
        self.pad_id = pad_token_id if pad_token_id is not None else tokenizer.pad_token_id or 0
        self.rows = PACKINGS[packing]([len(c) for c in kept], seq_len, np.random.default_rng(seed))
        digest = hashlib.sha256()
        for c in kept:
            digest.update(c.input_ids.tobytes() + c.labels.tobytes())
        self._data_sha = digest.hexdigest()
        self._row_order_epoch: int | None = None
        self._row_order = np.zeros(0, np.int64)
        self.stats = {**stats, "packed": len(kept), "rows": len(self.rows),
                      "loss_tokens": sum(c.num_loss_tokens for c in kept),
                      "padding_tokens": len(self.rows) * seq_len - sum(len(c) for c in kept)}
        self._check_not_empty(f"{path_jsonl}: {len(kept)} conversations")

    def _identity(self) -> dict[str, Any]:
        return {**super()._identity(), "data": self._data_sha}

    def _row_counts(self) -> tuple[int, int]:
        return len(self.rows), len(self.rows)

    def _build_row(self, epoch: int, row: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if self._row_order_epoch != epoch:
            self._row_order = np.random.default_rng([self.seed, epoch]).permutation(len(self.rows))
            self._row_order_epoch = epoch
        shuffled = int(self._row_order[row])
        pieces = [(self.conversations[c].input_ids, self.conversations[c].labels) for c in self.rows[shuffled]]
        return _assemble(pieces)


def _next_fit_rows(lengths: list[int], seq_len: int, rng: np.random.Generator) -> list[list[int]]:
    """Conversation indices grouped into rows of at most seq_len tokens: in a shuffled order, each into the
    current row if it fits, else a new one (no sorting by length: deterministic and cheap)."""
    rows: list[list[int]] = []
    used = seq_len
    for i in rng.permutation(len(lengths)).tolist():
        if used + lengths[i] > seq_len:
            rows.append([])
            used = 0
        rows[-1].append(i)
        used += lengths[i]
    return rows


def _best_fit_rows(lengths: list[int], seq_len: int, rng: np.random.Generator) -> list[list[int]]:
    """Conversation indices grouped into rows of at most seq_len tokens, best-fit decreasing: longest first (ties
    in a shuffled order), each into the row with the least room that still holds it, else a new row."""
    order = sorted(rng.permutation(len(lengths)).tolist(), key=lambda i: -lengths[i])
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, row index), sorted
    for i in order:
        at = bisect.bisect_left(free, (lengths[i], -1))
        if at == len(free):
            rows.append([i])
            bisect.insort(free, (seq_len - lengths[i], len(rows) - 1))
            continue
        room, row = free.pop(at)
        rows[row].append(i)
        bisect.insort(free, (room - lengths[i], row))
    return rows


PACKINGS = {"best_fit": _best_fit_rows, "next_fit": _next_fit_rows}
