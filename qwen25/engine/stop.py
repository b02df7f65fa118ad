"""Stop strings over a stream of text deltas: hold back what could still become a stop string, cut at a match.

Text-level only (token-level stops are the scheduler's job); shared by `LLM` and `LLMEngine`.
"""

from __future__ import annotations


class StopMatcher:
    """Holds back text that could be the start of a stop string; cuts the stream at the first match."""

    def __init__(self, stops: list[str], include_stop: bool) -> None:
        self.stops = stops
        self.include_stop = include_stop
        self.pending = ""
        self.done = False

    def feed(self, text: str, final: bool) -> tuple[str, bool]:
        """Returns (text safe to emit, whether a stop string matched)."""
        if self.done:
            return "", True
        if not self.stops:
            return text, False
        self.pending += text
        hits = [(self.pending.find(s), s) for s in self.stops if s in self.pending]
        if hits:
            at, stop = min(hits)
            self.done = True
            out = self.pending[: at + (len(stop) if self.include_stop else 0)]
            self.pending = ""
            return out, True
        if final:
            out, self.pending = self.pending, ""
            return out, False
        keep = max((k for s in self.stops for k in range(1, len(s)) if self.pending.endswith(s[:k])), default=0)
        out = self.pending[: len(self.pending) - keep]
        self.pending = self.pending[len(out):]
        return out, False
