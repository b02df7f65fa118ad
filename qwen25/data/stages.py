"""The per-shard stages of a data run, as plain functions over files in the work directory.

Each function takes the work directory, one shard number and what it needs, reads that shard's input from the
previous stage and writes its output files atomically (a temporary name, then `os.replace`), its `.json` last:
a shard whose `.json` exists is finished, and nothing else is ever read as finished. That is what makes a
killed run resumable shard by shard with nothing done twice, and what lets the same functions run in this
process or in Ray tasks (`qwen25.data.executor`) with identical outputs.

    ingest/NNNNN.jsonl    documents {id, source, text, metadata} (written by the driver, qwen25.data.pipeline)
    filter/NNNNN.jsonl    documents left by the heuristic filters and decontamination (C4 may have cut lines)
    filter/NNNNN.npy      their MinHash signatures (documents x permutations, uint32)
    filter/NNNNN.json     counts, removed documents with stage and rule (and benchmark item), exact-dup keys
    quality/NNNNN.json    the classifier's score of each filtered document
    pack/NNNNN.npz        tokens of the documents kept by dedup and quality, their lengths, sources, copies
                          (one file, renamed into place: its existence marks the shard finished)
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import xxhash

from qwen25.data.decontam import Decontaminator
from qwen25.data.filters import FilterConfig, LangId, apply_filters
from qwen25.data.minhash import MinHasher, exact_key

__all__ = ["copies", "filter_shard", "pack_shard", "read_jsonl", "score_shard", "shard_name", "write_atomic"]


def shard_name(shard: int) -> str:
    return f"{shard:05d}"


def write_atomic(path: Path, data: bytes | str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    if isinstance(data, str):
        tmp.write_text(data, encoding="utf-8")
    else:
        tmp.write_bytes(data)
    os.replace(tmp, path)


def write_json(path: Path, obj: Any) -> None:
    write_atomic(path, json.dumps(obj, ensure_ascii=False, sort_keys=True) + "\n")


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def filter_shard(work: Path, shard: int, filters: FilterConfig, dedup: dict[str, Any],
                 decontaminator: Decontaminator | None, langid: LangId | None) -> None:
    """Heuristic filters, then decontamination, then exact keys and MinHash signatures of what is left."""
    name = shard_name(shard)
    out = work / "filter"
    docs = read_jsonl(work / "ingest" / f"{name}.jsonl")
    kept, removed = [], []
    for d in docs:
        text, reason = apply_filters(d["id"], d["text"], d["metadata"], filters, langid)
        if text is not None and decontaminator is not None:
            item = decontaminator.match(text)
            if item is not None:
                text, reason = None, "decontaminate:" + item.split("/")[0]
                removed.append({"id": d["id"], "source": d["source"], "reason": reason, "item": item})
                continue
        if text is None:
            removed.append({"id": d["id"], "source": d["source"], "reason": reason})
        else:
            kept.append({**d, "text": text})
    hasher = MinHasher(dedup["num_perm"], dedup["shingle_size"], dedup["seed"])
    sig = hasher.signatures([d["text"] for d in kept]) if dedup["minhash"] else np.zeros((len(kept), 0), np.uint32)
    write_atomic(out / f"{name}.jsonl", "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in kept))
    tmp = out / f".{name}.npy.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        np.save(f, sig)
    os.replace(tmp, out / f"{name}.npy")
    write_json(out / f"{name}.json", {
        "documents": len(docs), "kept": len(kept), "removed": removed,
        "exact_keys": [exact_key(d["text"]) for d in kept] if dedup["exact"] else [],
        "bytes_in": sum(len(d["text"].encode()) for d in docs), "langid": langid is not None})


def score_shard(work: Path, shard: int, classifier_path: Path) -> None:
    """The quality classifier's score of every document the filter stage kept."""
    from qwen25.data.classifier import HashedLinear

    name = shard_name(shard)
    model = HashedLinear.load(classifier_path)
    docs = read_jsonl(work / "filter" / f"{name}.jsonl")
    write_json(work / "quality" / f"{name}.json", {"scores": [round(float(s), 6) for s in
                                                               model.predict([d["text"] for d in docs])]})


def copies(seed: int, shard: int, index: int, weight: float) -> int:
    """How many times a document goes into the mix: floor(weight), plus one with probability frac(weight),
    drawn from (seed, its position), so every run and every worker draws the same."""
    whole = int(weight)
    u = xxhash.xxh64_intdigest(f"{shard}:{index}".encode(), seed) / 2.0**64
    return whole + (u < weight - whole)


def pack_shard(work: Path, shard: int, keep: list[int], threshold: float | None, seed: int,
               weights: dict[str, float], default_weight: float, encoder: Any) -> None:
    """Tokenize the documents dedup kept (and quality, when `threshold` is set) with their mixture copies.
    `encoder`: a `tokenizers.Tokenizer` that encodes special-token strings as text (`pack._plain_text_encoder`),
    so a literal <|endoftext|> in a document is text, not a document boundary."""
    name = shard_name(shard)
    docs = read_jsonl(work / "filter" / f"{name}.jsonl")
    scores = None
    if threshold is not None:
        scores = json.loads((work / "quality" / f"{name}.json").read_text())["scores"]
    chosen, n_copies, low_quality = [], [], 0
    for i in keep:
        if scores is not None and scores[i] < threshold:
            low_quality += 1
            continue
        k = copies(seed, shard, i, weights.get(docs[i]["source"], default_weight))
        chosen.append(docs[i])
        n_copies.append(k)
    encodings = encoder.encode_batch_fast([d["text"] for d in chosen], add_special_tokens=False) if chosen else []
    lengths = np.array([len(e.ids) for e in encodings], dtype=np.int64)
    tokens = np.concatenate([np.asarray(e.ids, dtype=np.uint32) for e in encodings]) if encodings else \
        np.zeros(0, np.uint32)
    tmp = work / "pack" / f".{name}.npz.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        np.savez(f, tokens=tokens, lengths=lengths, copies=np.array(n_copies, dtype=np.int64),
                 sources=np.array([d["source"] for d in chosen], dtype=str), low_quality=np.array(low_quality))
    os.replace(tmp, work / "pack" / f"{name}.npz")
