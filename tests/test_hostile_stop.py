"""StopMatcher under hostile stop strings: the same cuts as the plain definition (find the earliest match, hold
back the longest suffix that starts a stop string) on random streams, and a per-token cost that does not grow
with the stop strings' length (16 stop strings of 100 KB each)."""

from __future__ import annotations

import random
import time

from qwen25.engine.stop import StopMatcher


class Reference:
    """The definition, quadratic and obviously right."""

    def __init__(self, stops: list[str], include_stop: bool) -> None:
        self.stops, self.include_stop, self.pending, self.done = stops, include_stop, "", False

    def feed(self, text: str, final: bool) -> tuple[str, bool]:
        if self.done:
            return "", True
        if not self.stops:
            return text, False
        self.pending += text
        hits = [(self.pending.find(s), s) for s in self.stops if s in self.pending]
        if hits:
            at, stop = min(hits)
            self.done = True
            out, self.pending = self.pending[: at + (len(stop) if self.include_stop else 0)], ""
            return out, True
        if final:
            out, self.pending = self.pending, ""
            return out, False
        keep = max((k for s in self.stops for k in range(1, len(s)) if self.pending.endswith(s[:k])), default=0)
        out = self.pending[: len(self.pending) - keep]
        self.pending = self.pending[len(out):]
        return out, False


def test_matches_the_definition_on_random_streams() -> None:
    rng = random.Random(0)
    for trial in range(4000):
        alphabet = "ab" if trial % 2 else "abc\n"
        stops = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 6))) for _ in range(rng.randint(0, 4))]
        include = rng.random() < 0.5
        ref, ours = Reference(stops, include), StopMatcher(stops, include)
        pieces = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 5))) for _ in range(rng.randint(1, 8))]
        for i, piece in enumerate(pieces):
            final = i == len(pieces) - 1 and rng.random() < 0.5
            assert ours.feed(piece, final) == ref.feed(piece, final), (stops, include, pieces, i)


def test_overlapping_and_nested_stops() -> None:
    m = StopMatcher(["abcd", "bc"], include_stop=False)
    assert m.feed("xabcd", False) == ("x", True)  # "abcd" starts first though "bc" completes first
    m = StopMatcher(["aab"], include_stop=True)
    assert m.feed("aaa", False) == ("a", False)  # "aa" could still start "aab"
    assert m.feed("ab!", False) == ("aaab", True)


def per_token_seconds(stops: list[str], pieces: list[str]) -> float:
    m = StopMatcher(stops, include_stop=False)
    start = time.perf_counter()
    for piece in pieces:
        m.feed(piece, False)
    return (time.perf_counter() - start) / len(pieces)


def test_cost_per_token_does_not_grow_with_stop_length() -> None:
    pieces = ["hello ", "x", "xx", " world", "xxx", "\n"] * 300
    short = per_token_seconds([f"x{i}" for i in range(16)], pieces)
    long = per_token_seconds(["x" * 100_000 + str(i) for i in range(16)], pieces)
    assert long < max(20 * short, 1e-3), (short, long)  # the old matcher took ~1 s a token here
    adversarial = per_token_seconds(["a" * 100_000 + str(i) for i in range(16)], ["aaaa"] * 2000)
    assert adversarial < 2e-3, adversarial  # every stop string stays a live prefix for 8,000 characters
