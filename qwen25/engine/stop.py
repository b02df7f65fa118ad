"""Stop strings over a stream of text deltas: hold back what could still become a stop string, cut at a match.

Text-level only (token-level stops are the scheduler's job); shared by `LLM` and `LLMEngine`.

Cost: each stop string is matched incrementally (Knuth-Morris-Pratt, its failure table built lazily as far as the
stream has matched it), so feeding a delta costs O(len(delta)) per stop string, amortised, however long the stop
strings are; a stop string whose first character is not in the delta is skipped with one `str.find`. A request
with 16 stop strings of 100 KB each costs the engine no more per token than one with 16 short ones.
"""

from __future__ import annotations


class _Pattern:
    """One stop string's KMP matcher: `state` = length of the longest prefix of it that the stream ends with."""

    __slots__ = ("text", "pi", "state")

    def __init__(self, text: str) -> None:
        self.text = text
        self.pi: list[int] = [0]  # prefix function, extended on demand (never further than `state` has reached)
        self.state = 0

    def _fail(self, i: int) -> int:
        """pi[i]: the longest proper prefix of text[:i+1] that is also its suffix."""
        pi, s = self.pi, self.text
        while len(pi) <= i:  # amortised O(1) per index: the standard construction, resumed where it stopped
            j, k = len(pi), pi[-1]
            while k > 0 and s[j] != s[k]:
                k = pi[k - 1]
            pi.append(k + 1 if s[j] == s[k] else 0)
        return pi[i]

    def advance(self, delta: str, offset: int) -> int | None:
        """Feed `delta` (which starts at stream position `offset`); the stream position where the first match
        completed inside it starts, or None (the state then covers all of `delta`)."""
        s, k, i, n, first = self.text, self.state, 0, len(delta), self.text[0]
        while i < n:
            if k == 0:
                i = delta.find(first, i)
                if i < 0:
                    break
            c = delta[i]
            while k > 0 and s[k] != c:
                k = self._fail(k - 1)
            if s[k] == c:
                k += 1
                if k == len(s):
                    self.state = k
                    return offset + i + 1 - k
            i += 1
        self.state = k
        return None


class StopMatcher:
    """Holds back text that could be the start of a stop string; cuts the stream at the first match (the one
    starting earliest; of two starting at the same place, the smaller string)."""

    def __init__(self, stops: list[str], include_stop: bool) -> None:
        self.stops = stops
        self.include_stop = include_stop
        self.pending = ""  # held back: the stream's longest suffix that is a proper prefix of a stop string
        self.done = False
        self._patterns = [_Pattern(s) for s in dict.fromkeys(stops) if s]
        self._fed = 0  # characters fed so far; the stream position just after `pending`

    def feed(self, text: str, final: bool) -> tuple[str, bool]:
        """Returns (text safe to emit, whether a stop string matched)."""
        if self.done:
            return "", True
        if not self._patterns:
            return text, False
        start = self._fed - len(self.pending)  # stream position of pending[0]
        hits = []
        for p in self._patterns:
            at = p.advance(text, self._fed)
            if at is not None:
                hits.append((at, p.text))
        self._fed += len(text)
        self.pending += text
        if hits:
            at, stop = min(hits)
            self.done = True
            out = self.pending[: at - start + (len(stop) if self.include_stop else 0)]
            self.pending = ""
            return out, True
        if final:
            out, self.pending = self.pending, ""
            return out, False
        keep = max(p.state for p in self._patterns)
        out = self.pending[: len(self.pending) - keep]
        self.pending = self.pending[len(out):]
        return out, False
