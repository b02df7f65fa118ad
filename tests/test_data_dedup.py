"""MinHash dedup and decontamination on planted corpora.

Dedup: base documents with planted copies at known similarity (2-12 word substitutions of 200, J 0.55-0.9, a
reordered paragraph, a changed boilerplate header/footer, exact copies with other case and spacing). The truth for
every pair is the exact Jaccard similarity of the two documents' shingle sets (computed from the sets, no MinHash);
precision and recall are measured over pairs above the 0.8 threshold against the clusters `lsh_clusters` forms. The
signature estimates are checked against the exact Jaccard and against datasketch's MinHash on the same shingles.

Decontamination: HumanEval- and MMLU-shaped items (written here; the real sets are not needed) planted verbatim
and reformatted (re-wrapped, re-cased, re-punctuated, embedded in other text) are all found with their item;
false positives on clean text (Python stdlib source) are counted and must be zero.
"""

from __future__ import annotations

import itertools
import random
import sys
from pathlib import Path

import numpy as np
import pytest

from qwen25.data.decontam import Decontaminator, humaneval_items, mmlu_items
from qwen25.data.minhash import MinHasher, exact_key, lsh_clusters

WORDS = [f"w{i}" for i in range(4000)]


def _base(rng: random.Random, n: int = 200) -> list[str]:
    return [rng.choice(WORDS) for _ in range(n)]


def _substitute(words: list[str], k: int, rng: random.Random) -> list[str]:
    out = list(words)
    for i in rng.sample(range(len(out)), k):
        out[i] = f"edit{rng.randrange(10**9)}"
    return out


def planted_corpus(seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    docs = []
    for _ in range(60):
        base = _base(rng)
        docs.append(" ".join(base))
        kind = rng.randrange(5)
        if kind == 0:  # light edits: 2-4 words of 200, J ~ 0.82-0.9 (above the threshold)
            docs.append(" ".join(_substitute(base, rng.choice((2, 3, 4)), rng)))
        elif kind == 1:  # heavier edits: 5-12 words, J ~ 0.55-0.78 (near and below the threshold)
            docs.append(" ".join(_substitute(base, rng.choice((5, 6, 12)), rng)))
        elif kind == 2:  # paragraphs reordered: J ~ 0.97
            docs.append(" ".join(base[100:] + base[:100]))
        elif kind == 3:  # boilerplate header and footer changed
            docs.append(" ".join(["Posted", "by", "admin"] + base + ["share", "this", "page"]))
        else:  # exact copy up to case and spacing
            docs.append("  ".join(w.upper() for w in base))
    rng.shuffle(docs)
    return docs


def test_minhash_estimates_the_exact_jaccard_like_datasketch():
    datasketch = pytest.importorskip("datasketch")
    rng = random.Random(1)
    hasher = MinHasher(num_perm=256)
    errors, ds_errors = [], []
    for k in (0, 2, 6, 12, 25, 60):
        a = _base(rng)
        b = _substitute(a, k, rng)
        sa, sb = set(hasher.shingles(" ".join(a)).tolist()), set(hasher.shingles(" ".join(b)).tolist())
        truth = len(sa & sb) / len(sa | sb)
        sig = hasher.signatures([" ".join(a), " ".join(b)])
        errors.append(abs((sig[0] == sig[1]).mean() - truth))
        ma, mb = datasketch.MinHash(num_perm=256, seed=1), datasketch.MinHash(num_perm=256, seed=1)
        ma.update_batch([int(x).to_bytes(8, "little") for x in sa])
        mb.update_batch([int(x).to_bytes(8, "little") for x in sb])
        ds_errors.append(abs(ma.jaccard(mb) - truth))
    # standard error at 256 permutations is at most 0.031; both estimators stay within ~3 of them
    assert max(errors) < 0.1 and max(ds_errors) < 0.1
    assert np.mean(errors) < 2 * np.mean(ds_errors) + 0.02


def test_planted_near_duplicates_precision_recall_and_exact_duplicates():
    docs = planted_corpus()
    hasher = MinHasher(num_perm=128, shingle_size=5)
    shingles = [set(hasher.shingles(d).tolist()) for d in docs]
    rep = lsh_clusters(hasher.signatures(docs), bands=16, rows=8, threshold=0.8)
    truth = set()
    predicted = set()
    for i, j in itertools.combinations(range(len(docs)), 2):
        jac = len(shingles[i] & shingles[j]) / len(shingles[i] | shingles[j])
        if jac >= 0.8:
            truth.add((i, j))
        if rep[i] == rep[j]:
            predicted.add((i, j))
    assert len(truth) >= 30  # the corpus really holds pairs above the threshold
    precision = len(truth & predicted) / max(len(predicted), 1)
    recall = len(truth & predicted) / len(truth)
    print(f"\nnear-dup pairs: {len(truth)} true, {len(predicted)} found; precision {precision:.3f}, recall "
          f"{recall:.3f}")
    assert precision >= 0.95 and recall >= 0.90
    # keep-one-per-cluster is the smallest index, so the result does not depend on anything but the order
    assert all(rep[i] <= i and rep[rep[i]] == rep[i] for i in range(len(docs)))
    # exact duplicates (case and spacing differ) share the normalised key: every one is removed
    keys = [exact_key(d) for d in docs]
    copies = [i for i, k in enumerate(keys) if k in keys[:i]]
    assert len(copies) == sum(1 for d in docs if d.startswith("W"))
    assert len({keys[i] for i in range(len(docs)) if i not in copies}) == len(docs) - len(copies)


def test_lsh_refuses_bands_beyond_the_permutations():
    with pytest.raises(ValueError, match="exceeds"):
        lsh_clusters(np.zeros((2, 16), np.uint32), bands=5, rows=4, threshold=0.8)


# --- decontamination -----------------------------------------------------------------------------------------
HUMANEVAL_ROWS = [
    {"task_id": "Toy/0", "prompt": 'def count_vowels(text: str) -> int:\n    """Return how many characters of text '
     'are vowels, counting a, e, i, o and u in either case.\n    >>> count_vowels("Banana")\n    3\n    """\n',
     "canonical_solution": "    return sum(1 for ch in text.lower() if ch in 'aeiou')\n"},
    {"task_id": "Toy/1", "prompt": 'def rotate_left(items: list, k: int) -> list:\n    """Rotate the list items to '
     'the left by k positions, wrapping the first elements around to the end of the list.\n    """\n',
     "canonical_solution": "    if not items:\n        return []\n    k %= len(items)\n"
                           "    return items[k:] + items[:k]\n"},
]
MMLU_ROWS = [
    {"question": "Which layer of the atmosphere contains most of the ozone that absorbs ultraviolet radiation "
                 "arriving from the sun?", "choices": ["troposphere", "stratosphere", "mesosphere", "thermosphere"],
     "answer": "B", "subject": "astronomy"},
    {"question": "A merchant sells a lamp for 48 dollars after a discount of twenty percent on the marked price. "
                 "What was the marked price?", "choices": ["56", "58", "60", "64"], "answer": "C",
     "subject": "elementary_mathematics"},
]


def _reformat(text: str) -> str:
    """Light reformatting: re-cased, punctuation changed, every line re-wrapped into one paragraph."""
    return " ".join(text.replace(",", " ,").replace("?", " ?").split()).upper().replace(":", " -")


def test_planted_items_are_removed_verbatim_and_reformatted_with_their_item():
    items = humaneval_items(HUMANEVAL_ROWS) + mmlu_items(MMLU_ROWS)
    d = Decontaminator(items, ngram=10)
    assert len(d) == len(items)
    filler = "This page collects notes written by students about their weekend projects and hobbies. "
    for item_id, text in items:
        assert d.match(filler + text + filler) == item_id
        assert d.match(filler * 2 + _reformat(text)) == item_id
    mmlu_as_quiz = ("Quiz 4. " + MMLU_ROWS[1]["question"].lower() + "\n(a) 56 (b) 58 (c) 60 (d) 64")
    assert d.match(mmlu_as_quiz) == "mmlu/elementary_mathematics/0"
    assert d.match(filler * 3) is None


def test_no_false_positives_on_clean_source_text():
    items = humaneval_items(HUMANEVAL_ROWS) + mmlu_items(MMLU_ROWS)
    d = Decontaminator(items, ngram=10)
    stdlib = Path(sys.modules["json"].__file__).parent.parent
    files = sorted(stdlib.glob("*.py"))[:150]
    hits = [(f.name, item) for f in files if (item := d.match(f.read_text(encoding="utf-8", errors="replace")))]
    print(f"\ndecontamination false positives on {len(files)} stdlib files: {len(hits)} {hits[:5]}")
    assert len(files) >= 100 and hits == []


def test_short_items_are_skipped_and_counted():
    d = Decontaminator([("q/1", "What is two plus two?"), ("q/2", " ".join(WORDS[:12]))], ngram=10)
    assert d.skipped_items == 1 and d.ids == ["q/2"]
