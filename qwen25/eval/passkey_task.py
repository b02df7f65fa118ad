"""`qwen25 eval passkey`: passkey retrieval accuracy by prompt length and key depth (`qwen25.eval.passkey`).

One sample per (length, depth): a prompt of exactly `length` tokens of the model's tokenizer with a seeded 5-digit
key at `depth`, answered greedily (ANSWER_TOKENS new tokens) by the backend, scored by the answer's first number.
The summary is the found/total table per length and depth. Samples need the tokenizer (`prepare`) before use.
"""

from __future__ import annotations

import time
from typing import Any

from qwen25.eval.passkey import first_number, is_found, passkey_keys, passkey_prompt
from qwen25.eval.results import Record
from qwen25.eval.runner import Task

ANSWER_TOKENS = 8


class PasskeyTask(Task):
    name = "passkey"

    def __init__(self, lengths: list[int], depths: list[float], seed: int = 0, limit: int | None = None) -> None:
        if not lengths or not depths:
            raise ValueError("passkey needs at least one length and one depth")
        self.lengths, self.depths, self.seed, self.limit = list(lengths), list(depths), seed, limit
        self._prompts: dict[str, Any] | None = None

    @property
    def n_ctx(self) -> int:
        """The context a backend needs: the longest prompt plus the answer."""
        return max(self.lengths) + ANSWER_TOKENS

    def settings(self) -> dict[str, Any]:
        return {"lengths": self.lengths, "depths": self.depths, "seed": self.seed}

    def prepare(self, tokenizer: Any) -> None:
        """Build every prompt in `tokenizer`'s tokens (the CLI calls this before samples())."""
        cases = [(n, d) for n in self.lengths for d in self.depths]
        keys = passkey_keys(len(cases), self.seed)
        self._prompts = {f"L{n}-d{d:g}": passkey_prompt(tokenizer, n, d, k) for (n, d), k in zip(cases, keys)}

    def samples(self) -> list[dict[str, Any]]:
        if self._prompts is None:
            raise RuntimeError("call prepare(tokenizer) before samples()")
        return [dict(id=i, length=len(p.ids), depth=p.depth) for i, p in self._prompts.items()][: self.limit]

    def evaluate(self, backend: Any, batch: list[dict[str, Any]]) -> list[Record]:
        assert self._prompts is not None
        records = []
        for s in batch:
            prompt = self._prompts[s["id"]]
            start = time.perf_counter()
            out = backend.generate([prompt.ids], ANSWER_TOKENS, [], [])[0]
            records.append(dict(id=s["id"], length=s["length"], depth=s["depth"], key=prompt.key,
                                answer=out.text, number=first_number(out.text), found=is_found(out.text, prompt.key),
                                seconds=round(time.perf_counter() - start, 3)))
        return records

    def summarize(self, records: list[Record]) -> dict[str, Any]:
        by_length: dict[int, list[Record]] = {}
        for r in records:
            by_length.setdefault(r["length"], []).append(r)
        rows = []
        table = {}
        for length, recs in sorted(by_length.items()):
            found = sum(r["found"] for r in recs)
            table[length] = {f"{r['depth']:g}": r["found"] for r in sorted(recs, key=lambda r: r["depth"])}
            marks = " ".join(f"{d}:{'yes' if ok else 'no'}" for d, ok in table[length].items())
            rows.append((f"{length} tokens", f"{found}/{len(recs)} found (depth {marks})"))
        total = sum(r["found"] for r in records)
        rows.append(("accuracy", f"{total}/{len(records)}" if records else "n/a"))
        return {"accuracy": total / len(records) if records else None, "by_length": table, "rows": rows}

    def progress_postfix(self, records: list[Record]) -> str:
        return f"found={sum(r['found'] for r in records)}/{len(records)}"
