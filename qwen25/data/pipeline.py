"""`qwen25 data run`: ingest -> filters + decontamination -> exact and MinHash dedup -> model quality -> mixture ->
tokenize and pack, resumable shard by shard, in this process or on Ray.

The driver (`run`) ingests the inputs into shards of `docs_per_shard` documents, hands the per-shard stages
(`qwen25.data.stages`) to an executor (`qwen25.data.executor`), and does the global steps itself: dedup over all
shards' hashes and signatures, the judge and the classifier's training (`qwen25.data.quality`), and the final
write of the token shards in document order. Every stage's output lives in the work directory and a finished
shard is never redone, so a killed run (even by SIGKILL) restarted with the same config picks up where it
stopped; the work directory remembers the config's fingerprint and refuses another config. Ingest is the one
stage that restarts from the beginning when interrupted (it only reads and splits, and rewrites the same files).

The output directory receives the token shards and `manifest.json` (counts per stage, tokens and documents per
source, the config, the inputs' SHA-256, the tokenizer) written with the other files into a temporary directory
and renamed into place; `removed.jsonl` lists every removed document with its stage and rule (and the benchmark
item for decontamination); `report.md` and `report.png` (`qwen25.data.report`) add timings. The manifest holds
nothing that depends on timing or executor, so a local run, a Ray run and a resumed run write the same one.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from qwen25.data import stages
from qwen25.data.decontam import Decontaminator
from qwen25.data.executor import Executor, LocalExecutor
from qwen25.data.filters import load_langid
from qwen25.data.ingest import Document, Malformed, input_specs, iter_documents
from qwen25.data.minhash import lsh_clusters
from qwen25.data.pack import _replace_dir, find_sources
from qwen25.data.run_config import RunConfig, fingerprint
from qwen25.data.shards import ShardWriter

__all__ = ["RunResult", "run"]

STAGES = ("ingest", "filter", "dedup", "quality", "pack", "write")


@dataclass
class RunResult:
    output: Path
    manifest: dict[str, Any]
    seconds: dict[str, float] = field(default_factory=dict)
    processed: dict[str, int] = field(default_factory=dict)  # shards done by this run, per stage
    resumed: dict[str, int] = field(default_factory=dict)  # shards found finished, per stage
    notes: list[str] = field(default_factory=list)


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


class _Progress:
    """One tqdm bar per stage (stderr), or nothing."""

    def __init__(self, enabled: bool):
        self.enabled = enabled

    def bar(self, desc: str, total: int, unit: str = "shard") -> Any:
        from tqdm import tqdm

        return tqdm(total=total, desc=f"{desc:>8}", unit=unit, disable=not self.enabled or None, file=sys.stderr,
                    leave=True)


def _ingest(cfg: RunConfig, work: Path, progress: _Progress, warn: Callable[[str], None]) -> dict[str, Any]:
    done = work / "ingest.json"
    if done.is_file():
        return json.loads(done.read_text())
    (work / "ingest").mkdir(parents=True, exist_ok=True)
    shard, buf, docs, empty = 0, [], Counter(), 0
    malformed: list[str] = []
    with progress.bar("ingest", 0, "doc") as bar:
        def flush() -> None:
            nonlocal shard
            stages.write_atomic(work / "ingest" / f"{stages.shard_name(shard)}.jsonl",
                                "".join(json.dumps(d.record(), ensure_ascii=False) + "\n" for d in buf))
            shard += 1
            buf.clear()

        for item, _ in iter_documents(cfg.inputs, cfg.include, cfg.text_field):
            bar.update()
            if isinstance(item, Malformed):
                malformed.append(str(item))
                warn(f"{item}; skipped")
            elif item is None:
                empty += 1
            else:
                assert isinstance(item, Document)
                buf.append(item)
                docs[item.source] += 1
                if len(buf) >= cfg.docs_per_shard:
                    flush()
        if buf or shard == 0:
            flush()
    info = {"shards": shard, "documents": sum(docs.values()), "per_source": dict(sorted(docs.items())),
            "empty": empty, "malformed": malformed}
    stages.write_json(done, info)
    return info


def _dedup(cfg: RunConfig, work: Path, shards: int) -> dict[str, Any]:
    done = work / "dedup.json"
    if done.is_file():
        return json.loads(done.read_text())
    owners, keys, sigs = [], [], []
    for s in range(shards):
        info = json.loads((work / "filter" / f"{stages.shard_name(s)}.json").read_text())
        owners += [(s, i) for i in range(info["kept"])]
        keys += info["exact_keys"]
        sigs.append(np.load(work / "filter" / f"{stages.shard_name(s)}.npy"))
    alive = np.ones(len(owners), dtype=bool)
    exact_removed = near_removed = 0
    if cfg.dedup.exact:
        seen: set[str] = set()
        for i, k in enumerate(keys):
            if k in seen:
                alive[i] = False
            seen.add(k)
        exact_removed = int((~alive).sum())
    if cfg.dedup.minhash and alive.any():
        index = np.flatnonzero(alive)
        rep = lsh_clusters(np.concatenate(sigs)[index], cfg.dedup.bands, cfg.dedup.rows, cfg.dedup.threshold)
        dup = rep != np.arange(len(index))
        alive[index[dup]] = False
        near_removed = int(dup.sum())
    keep: dict[str, list[int]] = {str(s): [] for s in range(shards)}
    removed = []
    for (s, i), a in zip(owners, alive):
        if a:
            keep[str(s)].append(i)
        else:
            removed.append([s, i])
    info = {"keep": keep, "exact_removed": exact_removed, "near_removed": near_removed, "removed": removed}
    stages.write_json(done, info)
    return info


def _map(executor: Executor, fn: Callable[..., None], work: Path, stage: str, todo: list[int], total: int,
         progress: _Progress, on_shard: Callable[[str, int], None] | None, *args: Any) -> None:
    with progress.bar(stage, total) as bar:
        bar.update(total - len(todo))

        def done(shard: int) -> None:
            bar.update()
            if on_shard is not None:
                on_shard(stage, shard)

        executor.map(fn, work, todo, *args, on_done=done)


def run(cfg: RunConfig, executor: Executor | None = None, progress: bool = True,
        warn: Callable[[str], None] | None = None,
        on_shard: Callable[[str, int], None] | None = None) -> RunResult:
    """Run (or resume) the pipeline of `cfg`; see the module docstring. `on_shard(stage, shard)` is called in
    this process as each shard of a per-shard stage finishes."""
    from qwen25.checkpoint import load_tokenizer
    from qwen25.data.pack import _plain_text_encoder
    from qwen25.weights.registry import resolve_model

    executor = executor or LocalExecutor()
    warn = warn or (lambda m: None)
    bars = _Progress(progress)
    work, output = Path(cfg.work_dir), Path(cfg.output)
    result = RunResult(output, {})
    clock = time.perf_counter()

    def lap(stage: str) -> None:
        nonlocal clock
        result.seconds[stage] = round(time.perf_counter() - clock, 3)
        clock = time.perf_counter()

    inputs = [{"path": str(s.path), "bytes": s.bytes, "sha256": _sha256(s.path)}
              for root, _, globs in input_specs(cfg.inputs, cfg.include) for s in find_sources([root], globs)]
    fp = fingerprint(cfg, [i["sha256"] for i in inputs])
    work.mkdir(parents=True, exist_ok=True)
    state = work / "run.json"
    if state.is_file() and json.loads(state.read_text()).get("fingerprint") != fp:
        raise ValueError(f"work directory {work} holds a run of another config or other inputs; remove it or "
                         "choose another work_dir")
    stages.write_json(state, {"fingerprint": fp})
    tokenizer = load_tokenizer(resolve_model(cfg.tokenizer))
    tokenizer_sha, encoder = _plain_text_encoder(tokenizer)
    eot = tokenizer.token_to_id("<|endoftext|>")
    if eot is None:
        raise ValueError(f"tokenizer {cfg.tokenizer} has no <|endoftext|> token")

    ingest = _ingest(cfg, work, bars, warn)
    n = ingest["shards"]
    lap("ingest")

    def todo(stage: str, suffix: str) -> list[int]:
        (work / stage).mkdir(exist_ok=True)
        left = [s for s in range(n) if not (work / stage / f"{stages.shard_name(s)}{suffix}").is_file()]
        result.processed[stage], result.resumed[stage] = len(left), n - len(left)
        return left

    decontaminator = Decontaminator.from_config(cfg.decontaminate) if cfg.decontaminate.enabled else None
    _map(executor, stages.filter_shard, work, "filter", todo("filter", ".json"), n, bars, on_shard, cfg.filters,
         asdict(cfg.dedup), decontaminator, load_langid() if cfg.filters.langid else None)
    filtered = [json.loads((work / "filter" / f"{stages.shard_name(s)}.json").read_text()) for s in range(n)]
    if cfg.filters.langid and not filtered[0]["langid"]:
        result.notes.append("language ID skipped: py3langid is not installed (pip install py3langid)")
    lap("filter")
    dedup = _dedup(cfg, work, n)
    lap("dedup")

    threshold = None
    quality_info: dict[str, Any] = {}
    if cfg.quality.enabled:
        from qwen25.data.quality import prepare_classifier

        quality_info = prepare_classifier(cfg, work, dedup["keep"], bars.enabled)
        _map(executor, stages.score_shard, work, "quality", todo("quality", ".json"), n, bars, on_shard,
             Path(quality_info["classifier"]))
        threshold = cfg.quality.threshold
    lap("quality")

    _map(executor, _pack_one, work, "pack", todo("pack", ".npz"), n, bars, on_shard, dedup["keep"], threshold,
         cfg.seed, cfg.mixture.weights, cfg.mixture.default_weight, encoder)
    lap("pack")

    summary = _counts(ingest, filtered, dedup)
    result.manifest = _write_output(cfg, work, output, n, eot, tokenizer, tokenizer_sha, inputs, fp, summary,
                                    filtered, dedup, quality_info)
    lap("write")
    from qwen25.data.report import write_report

    write_report(output, result)
    return result


def _pack_one(work: Path, shard: int, keep: dict[str, list[int]], threshold: float | None, seed: int,
              weights: dict[str, float], default_weight: float, encoder: Any) -> None:
    stages.pack_shard(work, shard, keep[str(shard)], threshold, seed, weights, default_weight, encoder)


def _counts(ingest: dict[str, Any], filtered: list[dict[str, Any]], dedup: dict[str, Any]) -> dict[str, Any]:
    rules: Counter = Counter()
    for info in filtered:
        rules.update(r["reason"] for r in info["removed"])
    per_stage: Counter = Counter()
    for rule, k in rules.items():
        per_stage[rule.split(":")[0]] += k
    return {"documents_in": ingest["documents"], "malformed": len(ingest["malformed"]), "empty": ingest["empty"],
            "removed_by_stage": {**dict(sorted(per_stage.items())), "exact_dedup": dedup["exact_removed"],
                                 "minhash_dedup": dedup["near_removed"]},
            "removed_by_rule": dict(sorted(rules.items()))}


def _write_output(cfg: RunConfig, work: Path, output: Path, n: int, eot: int, tokenizer: Any, tokenizer_sha: str,
                  inputs: list[dict[str, Any]], fp: str, summary: dict[str, Any], filtered: list[dict[str, Any]],
                  dedup: dict[str, Any], quality_info: dict[str, Any]) -> dict[str, Any]:
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.partial-", dir=output.parent))
    try:
        packs = [np.load(work / "pack" / f"{stages.shard_name(s)}.npz") for s in range(n)]
        tokens: Counter = Counter()
        documents: Counter = Counter()
        low_quality = sum(int(p["low_quality"]) for p in packs)
        unique = sum(len(p["lengths"]) for p in packs)
        rounds = max([int(p["copies"].max()) for p in packs if len(p["copies"])] or [0])
        with ShardWriter(tmp, eot, tokenizer.vocab_size, cfg.pack.max_tokens_per_file) as writer:
            for r in range(rounds):  # copy r of every document with more than r copies, in document order
                for p in packs:
                    offsets = np.concatenate(([0], np.cumsum(p["lengths"])))
                    for d in np.flatnonzero(p["copies"] > r):
                        source = str(p["sources"][d])
                        tokens[source] += writer.add(p["tokens"][offsets[d]:offsets[d + 1]])
                        documents[source] += 1
            summary["removed_by_stage"]["quality"] = low_quality
            summary["kept_documents"] = unique
            summary["documents_after_mixture"] = sum(documents.values())
            manifest = writer.close({
                "tokenizer": {"name": cfg.tokenizer, "vocab_size": tokenizer.vocab_size, "eot_token_id": eot,
                              "sha256": tokenizer_sha},
                "pipeline": {"counts": summary, "tokens_per_source": dict(sorted(tokens.items())),
                             "documents_per_source": dict(sorted(documents.items())),
                             "quality": {k: v for k, v in quality_info.items() if k != "classifier"}},
                "config": {k: v for k, v in asdict(cfg).items() if k not in ("output", "work_dir")},
                "inputs": inputs, "fingerprint": fp})
        with open(tmp / "removed.jsonl", "w", encoding="utf-8") as f:
            for info in filtered:
                for r in info["removed"]:
                    f.write(json.dumps(r, ensure_ascii=False) + "\n")
            by_shard: dict[int, list[int]] = {}
            for s, i in dedup["removed"]:
                by_shard.setdefault(s, []).append(i)
            for s, rows in sorted(by_shard.items()):
                docs = stages.read_jsonl(work / "filter" / f"{stages.shard_name(s)}.jsonl")
                for i in rows:
                    f.write(json.dumps({"id": docs[i]["id"], "source": docs[i]["source"], "reason": "dedup"},
                                       ensure_ascii=False) + "\n")
        _replace_dir(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest
