"""MinHash signatures (vectorised in numpy) and LSH clustering with verification; exact normalised-text hashes.

Text is normalised (`normalize`: lower case, punctuation dropped, runs of whitespace -> one space) and cut into word
shingles of `shingle_size` words (default 5). Each word is hashed once with xxh32 (seeded, so the same on every
machine and process); a shingle's hash mixes its words' hashes in uint64 arithmetic and keeps 32 bits. Permutation k
maps a shingle hash h to the top 32 bits of (a_k * h + b_k) mod 2^64 (multiply-shift hashing, a_k odd; a_k, b_k
drawn from a seeded generator): only multiplies, adds and shifts, no division, so numpy runs it at memory speed. The
signature keeps each permutation's minimum. The fraction of equal positions of two signatures estimates their
shingle sets' Jaccard similarity (standard error sqrt(J (1 - J) / num_perm), 0.035 at J = 0.8 with 128
permutations).

LSH: the signature is cut into `bands` x `rows` (defaults 16 x 8 = 128): two documents sharing one whole band are
candidates. A pair at Jaccard J becomes a candidate with probability 1 - (1 - J^rows)^bands: 0.92 at 0.8, 0.99 at
0.85, 0.39 at 0.6. Candidates are verified: only a pair whose signature estimate reaches `threshold` (0.8) is
joined, so precision does not depend on the banding. Joined documents form clusters (union-find); each cluster
keeps its smallest index, which is the earliest document in ingest order, so the result is deterministic.

datasketch's MinHash computes the same family of signatures one document at a time; `benchmarks/bench_data.py`
measures both, and this vectorised one was the faster (see BENCHMARKS.md), so it is the one used.
"""

from __future__ import annotations

import re
import unicodedata

import numpy as np
import xxhash

__all__ = ["MinHasher", "exact_key", "lsh_clusters", "normalize"]

_MIX = np.uint64(0x9E3779B97F4A7C15)
_NON_WORD = re.compile(r"[^\w\s]+")
_SPACE = re.compile(r"\s+")
_EMPTY = np.uint64(0xFFFFFFFF)  # the signature of a document with no shingle


def normalize(text: str) -> str:
    """NFKC, lower case, punctuation removed, whitespace collapsed: what both dedup stages compare."""
    text = unicodedata.normalize("NFKC", text).lower()
    return _SPACE.sub(" ", _NON_WORD.sub(" ", text)).strip()


def exact_key(text: str) -> str:
    """A 128-bit hash of the whitespace-collapsed, lower-cased text (exact duplicates up to case and spacing)."""
    return xxhash.xxh3_128_hexdigest(_SPACE.sub(" ", unicodedata.normalize("NFKC", text).lower()).strip().encode())


class MinHasher:
    """Signatures of `num_perm` 32-bit values for word `shingle_size`-grams; same seed -> same signatures."""

    def __init__(self, num_perm: int = 128, shingle_size: int = 5, seed: int = 1):
        if num_perm < 1 or shingle_size < 1:
            raise ValueError(f"num_perm and shingle_size must be >= 1, got {num_perm}, {shingle_size}")
        self.num_perm, self.shingle_size, self.seed = num_perm, shingle_size, seed
        rng = np.random.default_rng(seed)
        self.a = rng.integers(0, 1 << 63, size=num_perm, dtype=np.uint64) * np.uint64(2) + np.uint64(1)  # odd
        self.b = rng.integers(0, 1 << 63, size=num_perm, dtype=np.uint64)

    def shingles(self, text: str) -> np.ndarray:
        """The distinct shingle hashes of `text` (uint64 below 2^32)."""
        words = normalize(text).split()
        if not words:
            return np.zeros(0, dtype=np.uint64)
        seed = self.seed & 0xFFFFFFFF
        h = np.fromiter((xxhash.xxh32_intdigest(w.encode(), seed) for w in words), dtype=np.uint64, count=len(words))
        n = self.shingle_size
        if len(h) < n:  # a short document is one shingle of all its words
            n = len(h)
        acc = np.zeros(len(h) - n + 1, dtype=np.uint64)
        with np.errstate(over="ignore"):
            for j in range(n):
                acc = (acc ^ h[j:len(h) - n + 1 + j]) * _MIX
                acc ^= acc >> np.uint64(29)
        return np.unique(acc & np.uint64(0xFFFFFFFF))

    def signatures(self, texts: list[str], chunk: int = 1 << 15) -> np.ndarray:
        """(len(texts), num_perm) uint32 signatures, hashing up to `chunk` shingles x num_perm at a time."""
        out = np.full((len(texts), self.num_perm), _EMPTY, dtype=np.uint64)
        pending: list[tuple[int, np.ndarray]] = []
        size = 0

        def flush() -> None:
            nonlocal size
            idx = [i for i, _ in pending]
            lengths = np.array([len(s) for _, s in pending])
            h = np.concatenate([s for _, s in pending])
            with np.errstate(over="ignore"):
                v = np.multiply.outer(self.a, h)  # (perms, shingles): reduceat runs along contiguous rows
                v += self.b[:, None]
                v >>= np.uint64(32)
            starts = np.concatenate(([0], np.cumsum(lengths)[:-1]))
            out[idx] = np.minimum.reduceat(v, starts, axis=1).T
            pending.clear()
            size = 0

        for i, text in enumerate(texts):
            s = self.shingles(text)
            if len(s):
                pending.append((i, s))
                size += len(s)
            if size >= chunk:
                flush()
        if pending:
            flush()
        return out.astype(np.uint32)


def lsh_clusters(signatures: np.ndarray, bands: int, rows: int, threshold: float) -> np.ndarray:
    """For each document the index of its cluster's representative (its smallest member); see the module doc."""
    n, num_perm = signatures.shape
    if bands * rows > num_perm:
        raise ValueError(f"bands x rows = {bands * rows} exceeds the {num_perm} permutations")
    parent = np.arange(n)

    def find(x: int) -> int:
        root = x
        while parent[root] != root:
            root = parent[root]
        while parent[x] != root:
            parent[x], x = root, parent[x]
        return root

    empty = (signatures == np.uint32(_EMPTY)).all(axis=1)
    sig64 = signatures.astype(np.uint64)
    need = int(np.ceil(threshold * num_perm - 1e-9))
    for band in range(bands):
        cols = sig64[:, band * rows:(band + 1) * rows]
        key = np.zeros(n, dtype=np.uint64)
        with np.errstate(over="ignore"):
            for j in range(rows):
                key = (key ^ cols[:, j]) * _MIX
        key[empty] = np.arange(int(empty.sum()), dtype=np.uint64) ^ _MIX  # empty documents never match
        order = np.argsort(key, kind="stable")
        sorted_key = key[order]
        same = np.flatnonzero(sorted_key[1:] == sorted_key[:-1]) + 1  # positions equal to the one before
        if not len(same):
            continue
        run_start = np.flatnonzero(np.concatenate(([True], sorted_key[1:] != sorted_key[:-1])))
        first = order[run_start[np.searchsorted(run_start, same, side="right") - 1]]
        cand = np.concatenate([np.stack([first, order[same]], 1), np.stack([order[same - 1], order[same]], 1)])
        agree = (signatures[cand[:, 0]] == signatures[cand[:, 1]]).sum(axis=1)
        for x, y in cand[agree >= need]:
            rx, ry = find(int(x)), find(int(y))
            if rx != ry:
                parent[max(rx, ry)] = min(rx, ry)
    return np.array([find(i) for i in range(n)])
