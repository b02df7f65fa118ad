"""Per-sample JSONL results: crash-safe appends, resume, and the summary table.

The file's first line is a `{"_meta": {...}}` record naming the task and every setting that changes results;
each later line is one finished sample with a unique "id". A record is appended and fsync'ed the moment its
sample is scored, so an interrupt loses at most the sample being evaluated. On resume the ids already in the
file are skipped; a torn last line (killed mid-write) is cut off first, so no sample is lost or counted twice.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

Record = dict[str, Any]


class ResultsFile:
    """Append-only JSONL results for one evaluation run.

    meta: the settings that determine results (task, model, backend, protocol, ...). Resuming a file whose
    meta differs is refused: mixing samples from two configurations would make the summary meaningless."""

    def __init__(self, path: str | os.PathLike, meta: Record, resume: bool) -> None:
        self.path = Path(path)
        self.meta = meta
        self.records: dict[str, Record] = {}
        exists = self.path.exists() and self.path.stat().st_size > 0
        if exists and not resume:
            raise FileExistsError(f"{self.path} already exists: pass --resume to continue it, "
                                  "or choose another --output")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if exists:
            old_meta, records = read_results(self.path, repair=True)
            if old_meta is not None and _comparable(old_meta) != _comparable(meta):
                diff = sorted(k for k in set(old_meta) | set(meta)
                              if k in _comparable(meta) or k in _comparable(old_meta)
                              if old_meta.get(k) != meta.get(k))
                raise ValueError(f"{self.path} was written with different settings ({', '.join(diff)}); "
                                 "use another --output or the original settings")
            self.records = {r["id"]: r for r in records}
            if old_meta is None:
                self._append({"_meta": meta})
        else:
            self._append({"_meta": meta})

    def done(self, sample_id: str) -> bool:
        return sample_id in self.records

    def add(self, record: Record) -> None:
        """Append one finished sample (durably) and remember it."""
        if record["id"] in self.records:
            raise ValueError(f"sample {record['id']} was already recorded")
        self._append(record)
        self.records[record["id"]] = record

    def _append(self, obj: Record) -> None:
        line = json.dumps(obj, ensure_ascii=False) + "\n"
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())


# Settings that do not change a sample's result: they may differ between the runs that fill one file.
_VOLATILE = {"limit", "batch_size", "threads", "output", "resume", "started", "version"}


def _comparable(meta: Record) -> Record:
    return {k: v for k, v in meta.items() if k not in _VOLATILE}


def read_results(path: str | os.PathLike, repair: bool = False) -> tuple[Record | None, list[Record]]:
    """(meta, sample records) of a results file. A torn last line is ignored, and with repair=True cut off."""
    path = Path(path)
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data) and repair:  # the process died mid-write: drop the partial line
        with open(path, "r+b") as f:
            f.truncate(end)
            f.flush()
            os.fsync(f.fileno())
    meta: Record | None = None
    records: list[Record] = []
    seen: set[str] = set()
    for number, line in enumerate(data[:end].decode("utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{number}: not a JSON line ({e.msg})") from None
        if "_meta" in obj:
            meta = meta or obj["_meta"]
        elif obj.get("id") not in seen:
            seen.add(obj["id"])
            records.append(obj)
    return meta, records


# --- summary table -----------------------------------------------------------------------------------
def format_table(rows: Iterable[tuple[str, str]], title: str | None = None) -> str:
    rows = list(rows)
    width = max((len(k) for k, _ in rows), default=0)
    lines = [title, "-" * len(title)] if title else []
    lines += [f"{k:<{width}}  {v}" for k, v in rows]
    return "\n".join(lines)


def percent(numerator: float, denominator: float) -> str:
    if denominator == 0:
        return "n/a (0 samples)"
    return f"{100.0 * numerator / denominator:.1f}%  ({numerator:g}/{denominator:g})"


def mcnemar_p(only_a: int, only_b: int) -> float:
    """Two-sided exact McNemar p-value for paired pass/fail results: the probability, were both runs equally good,
    of a split of the discordant samples (passed by one run only) at least as uneven as only_a : only_b (a binomial
    test of min(only_a, only_b) successes in only_a + only_b trials at 1/2)."""
    n = only_a + only_b
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(only_a, only_b) + 1)) / 2 ** n
    return min(1.0, 2 * tail)
