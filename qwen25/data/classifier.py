"""The fast quality classifier: ridge regression on hashed word 1- and 2-gram features, trained on the judge's scores.

Features: the normalised text's words (`minhash.normalize`) and adjacent word pairs, each hashed with xxh32 into
`features` buckets (collisions add up), counts damped with log1p and the row scaled to unit L2 norm. The model
predicts score = w . x + b, minimising sum_i (y_i - w . x_i - b)^2 + l2 * |w|^2 with b the mean label. It is
solved exactly in the dual, w = X^T (X X^T + l2 I)^-1 (y - b), which needs only an n x n solve for n judged
documents, whatever the number of buckets. `spearman` measures agreement with the judge on held-out documents.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import xxhash

from qwen25.data.minhash import normalize

__all__ = ["HashedLinear", "spearman"]


def _features(text: str, buckets: int) -> tuple[np.ndarray, np.ndarray]:
    words = normalize(text).split()
    grams = [w.encode() for w in words] + [f"{a} {b}".encode() for a, b in zip(words, words[1:])]
    if not grams:
        return np.zeros(0, np.int64), np.zeros(0, np.float64)
    idx = np.fromiter((xxhash.xxh32_intdigest(g) % buckets for g in grams), dtype=np.int64, count=len(grams))
    cols, counts = np.unique(idx, return_counts=True)
    vals = np.log1p(counts.astype(np.float64))
    return cols, vals / np.linalg.norm(vals)


class HashedLinear:
    def __init__(self, features: int = 1 << 18, l2: float = 1.0):
        self.features, self.l2 = features, l2
        self.weights = np.zeros(features, np.float64)
        self.bias = 0.0

    def fit(self, texts: list[str], scores: list[float]) -> HashedLinear:
        if len(texts) != len(scores) or len(texts) < 2:
            raise ValueError(f"need at least 2 texts with one score each, got {len(texts)} and {len(scores)}")
        rows = [_features(t, self.features) for t in texts]
        used = np.unique(np.concatenate([c for c, _ in rows]))
        x = np.zeros((len(rows), len(used)))
        for i, (c, v) in enumerate(rows):
            x[i, np.searchsorted(used, c)] = v
        y = np.asarray(scores, dtype=np.float64)
        self.bias = float(y.mean())
        alpha = np.linalg.solve(x @ x.T + self.l2 * np.eye(len(rows)), y - self.bias)
        self.weights = np.zeros(self.features)
        self.weights[used] = x.T @ alpha
        return self

    def predict(self, texts: list[str]) -> np.ndarray:
        out = np.empty(len(texts))
        for i, t in enumerate(texts):
            c, v = _features(t, self.features)
            out[i] = self.bias + float(self.weights[c] @ v)
        return out

    def save(self, path: str | Path) -> None:
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp")
        with open(tmp, "wb") as f:
            np.savez(f, weights=self.weights.astype(np.float32), bias=self.bias, l2=self.l2)
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | Path) -> HashedLinear:
        with np.load(path) as z:
            model = cls(len(z["weights"]), float(z["l2"]))
            model.weights = z["weights"].astype(np.float64)
            model.bias = float(z["bias"])
        return model


def _ranks(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(len(x))
    for v in np.unique(x):  # ties share their mean rank
        tie = x == v
        ranks[tie] = ranks[tie].mean()
    return ranks


def spearman(a: list[float] | np.ndarray, b: list[float] | np.ndarray) -> float:
    """Spearman's rank correlation (ties at their mean rank); nan when either side is constant."""
    ra, rb = _ranks(np.asarray(a, float)), _ranks(np.asarray(b, float))
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])
