"""`qwen25 data run` end to end on a small real corpus with planted problems.

Corpus: English prose (the docstrings of Python stdlib modules, jsonl with ids), code (stdlib .py files, a
directory), a parquet file, and planted documents: an exact copy (other case and spacing), a near copy, a
benchmark item inside a page (decontamination via an extra jsonl), lorem ipsum, keyword spam, an auto-generated
code file, a malformed jsonl line. Checks: each planted document is removed by the stage meant to catch it and
listed in removed.jsonl (the contaminated one with its item), counts add up, the mixture copies documents by
source weight, the shards decode back to the kept texts, the report is written; a local 2-CPU Ray run writes
the same manifest and token files; a run SIGKILLed during packing or after filtering resumes to the same
manifest with no shard done twice; `qwen25 train pretrain` trains on the output unchanged.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from qwen25.data.pipeline import run
from qwen25.data.run_config import load_run_config
from qwen25.data.shards import ShardReader

STDLIB = Path(ast.__file__).parent
ITEM = ("Write a function that returns the number of distinct prime factors of a positive integer n, "
        "counting each prime once even when it divides n several times.")


def _docstrings(limit: int = 24) -> list[tuple[str, str]]:
    """Stdlib module docstrings (paragraphs unwrapped) that the default filters keep."""
    from qwen25.data.filters import FilterConfig, apply_filters

    out = []
    for path in sorted(STDLIB.glob("*.py")):
        try:
            doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8")))
        except (SyntaxError, UnicodeDecodeError):
            continue
        if doc and 90 <= len(doc.split()) <= 1500 and "lorem" not in doc.lower():
            paragraphs = [" ".join(p.split()) for p in doc.split("\n\n")]  # unwrapped, as web text comes
            text = "\n\n".join(p for p in paragraphs if p)
            if apply_filters(path.stem, text, {}, FilterConfig(langid=False), None)[1] is None:
                out.append((path.stem, text))
        if len(out) == limit:
            break
    return out


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    prose = _docstrings()
    assert len(prose) == 24
    lines = [json.dumps({"id": name, "text": text, "lang": "en"}) for name, text in prose]
    lines.append(json.dumps({"id": "copy-of-" + prose[3][0], "text": prose[3][1].upper().replace(" ", "  ")}))
    text = prose[5][1]
    i = text.index(" ", len(text) // 2)
    j = text.index(" ", i + 1)  # one word in the middle replaced, the layout kept
    lines.append(json.dumps({"id": "near-" + prose[5][0], "text": text[:i + 1] + "changed" + text[j:]}))
    lines.append(json.dumps({"id": "contaminated", "text": prose[7][1] + "\n\n" + ITEM.upper()}))
    lines.append(json.dumps({"id": "lorem", "text": "Lorem ipsum dolor sit amet, consectetur adipiscing elit. " * 20}))
    lines.append(json.dumps({"id": "spam", "text": "Buy cheap watches online at the best price. " * 40}))
    lines.append("{not json")
    (root / "prose.jsonl").write_text("\n".join(lines) + "\n")
    code = root / "code"
    code.mkdir()
    for name in ("bisect", "colorsys", "keyword", "heapq", "fnmatch", "this"):
        (code / f"{name}.py").write_text((STDLIB / f"{name}.py").read_text())
    (code / "gen.py").write_text("# This file is auto-generated. Do not edit.\nX = 1\n")
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    docs = _docstrings(30)[24:]
    pq.write_table(pa.table({"text": [t for _, t in docs], "id": [n for n, _ in docs]}), root / "more.parquet")
    (root / "items.jsonl").write_text(json.dumps({"id": "primes", "text": ITEM}) + "\n")
    return root


def _config(corpus: Path, out: Path, tokenizer: Path, **over) -> dict:
    cfg = {"inputs": [{"path": str(corpus / "prose.jsonl"), "source": "prose"},
                      {"path": str(corpus / "code"), "source": "code", "include": ["*.py"]},
                      {"path": str(corpus / "more.parquet"), "source": "prose"}],
           "output": str(out), "tokenizer": str(tokenizer), "docs_per_shard": 5, "seed": 3,
           "decontaminate": {"benchmarks": [], "extra": [str(corpus / "items.jsonl")]},
           "mixture": {"weights": {"code": 2.0, "prose": 0.5}}, "pack": {"max_tokens_per_file": 4000}}
    cfg.update(over)
    return cfg


def _digest(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.glob("tokens-*"))}


@pytest.fixture(scope="module")
def local_run(corpus, tmp_path_factory, tiny_hf_dir):
    out = tmp_path_factory.mktemp("local") / "out"
    return run(load_run_config(_config(corpus, out, tiny_hf_dir)), progress=False)


def test_planted_documents_are_removed_by_their_stage(local_run, corpus):
    out = local_run.output
    removed = {r["id"]: r for r in map(json.loads, (out / "removed.jsonl").read_text().splitlines())}
    assert removed["lorem"]["reason"] == "c4:lorem_ipsum"
    assert removed["spam"]["reason"].startswith("gopher_")
    assert removed["gen.py"]["reason"] == "code:auto_generated"
    assert removed["contaminated"]["reason"] == "decontaminate:items.jsonl"
    assert removed["contaminated"]["item"] == "items.jsonl/primes"
    assert removed["copy-of-" + _docstrings()[3][0]]["reason"] == "dedup"
    assert removed["near-" + _docstrings()[5][0]]["reason"] == "dedup"
    c = local_run.manifest["pipeline"]["counts"]
    assert c["malformed"] == 1 and c["removed_by_stage"]["exact_dedup"] == 1
    assert c["removed_by_stage"]["minhash_dedup"] == 1
    assert c["documents_in"] == 24 + 5 + 7 + 6  # jsonl (one malformed line less), code files, parquet rows
    assert c["documents_in"] - sum(c["removed_by_stage"].values()) == c["kept_documents"]
    assert len(removed) == sum(c["removed_by_stage"].values())


def test_mixture_and_shards_match_the_kept_documents(local_run, tiny_hf_dir):
    from qwen25.checkpoint import load_tokenizer

    m = local_run.manifest
    reader = ShardReader(local_run.output)
    assert reader.num_tokens == m["num_tokens"] == sum(m["pipeline"]["tokens_per_source"].values())
    per_source = m["pipeline"]["documents_per_source"]
    removed = {r["id"] for r in map(json.loads, (local_run.output / "removed.jsonl").read_text().splitlines())}
    kept_code = 6 - sum(1 for r in removed if r.endswith(".py") and r != "gen.py")
    assert per_source["code"] == 2 * kept_code  # weight 2.0: every code document twice
    kept_prose = m["pipeline"]["counts"]["kept_documents"] - kept_code
    assert 0.25 * kept_prose <= per_source["prose"] <= 0.75 * kept_prose  # weight 0.5: about half, seeded
    tok = load_tokenizer(tiny_hf_dir)
    texts = [tok.decode(reader[i][:-1].tolist()) for i in range(len(reader))]
    assert any(t.startswith('"""Bisection algorithms') for t in texts)
    assert not any("Lorem ipsum" in t or "auto-generated" in t for t in texts)
    assert (local_run.output / "report.md").read_text().count("items.jsonl/primes") == 1
    assert (local_run.output / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_ray_run_writes_the_same_manifest_and_tokens(local_run, corpus, tmp_path, tiny_hf_dir):
    pytest.importorskip("ray")
    from qwen25.data.executor import RayExecutor

    executor = RayExecutor("local", num_cpus=2)
    try:
        result = run(load_run_config(_config(corpus, tmp_path / "out", tiny_hf_dir)), executor, progress=False)
    finally:
        executor.close()
    assert result.manifest == local_run.manifest
    assert _digest(result.output) == _digest(local_run.output)


KILLER = """
import json, os, signal, sys
from qwen25.data.pipeline import run
from qwen25.data.run_config import load_run_config
cfg = load_run_config(json.load(open(sys.argv[1])))
stage, after, log = sys.argv[2], int(sys.argv[3]), sys.argv[4]
seen = []
def on_shard(s, k):
    with open(log, "a") as f:
        f.write(f"{s} {k}\\n")
    seen.append(s)
    if seen.count(stage) == after:
        os.kill(os.getpid(), signal.SIGKILL)
run(cfg, progress=False, on_shard=on_shard)
"""


@pytest.mark.parametrize("stage,after", [("pack", 3), ("filter", 9)])
def test_sigkilled_run_resumes_to_the_same_manifest(local_run, corpus, tmp_path, tiny_hf_dir, stage, after):
    out = tmp_path / "out"
    cfg = _config(corpus, out, tiny_hf_dir)
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    log = tmp_path / "log"
    proc = subprocess.run([sys.executable, "-c", KILLER, str(tmp_path / "cfg.json"), stage, str(after), str(log)],
                          capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert not out.exists()
    done_before = [line.split() for line in log.read_text().splitlines()]
    result = run(load_run_config(cfg), progress=False)
    n = len(list((tmp_path / "out.work" / "ingest").glob("*.jsonl")))
    for s in ("filter", "pack"):
        before = sum(1 for st, _ in done_before if st == s)
        assert result.resumed[s] == before and result.processed[s] == n - before  # nothing twice, nothing lost
    assert result.manifest == local_run.manifest
    assert _digest(out) == _digest(local_run.output)


def test_packed_output_trains_with_pretrain_unchanged(local_run, tmp_path, tiny_hf_dir):
    from qwen25.cli import main as cli_main

    code = cli_main(["train", "pretrain", "--data", str(local_run.output), "--model-config",
                     str(tiny_hf_dir / "config.json"), "--output", str(tmp_path / "run"), "--seq-len", "32",
                     "--batch-size", "2", "--max-steps", "3", "--threads", "2", "--no-progress"])
    assert code == 0
    records = [json.loads(x) for x in (tmp_path / "run" / "stage1" / "metrics.jsonl").read_text().splitlines()]
    assert sum(1 for r in records if "loss" in r) == 3


def test_bad_config_and_work_dir_of_another_run(corpus, tmp_path, tiny_hf_dir):
    with pytest.raises(ValueError, match="unknown key bogus in \\[dedup\\]"):
        load_run_config(_config(corpus, tmp_path / "o", tiny_hf_dir, dedup={"bogus": 1}))
    with pytest.raises(ValueError, match="bands x rows"):
        load_run_config(_config(corpus, tmp_path / "o", tiny_hf_dir, dedup={"bands": 40}))
    cfg = _config(corpus, tmp_path / "o", tiny_hf_dir, work_dir=str(tmp_path / "w"))
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "run.json").write_text(json.dumps({"fingerprint": "other"}))
    with pytest.raises(ValueError, match="another config"):
        run(load_run_config(cfg), progress=False)


def test_cli_runs_a_toml_config_with_relative_paths(local_run, corpus, tmp_path, tiny_hf_dir, capsys):
    from qwen25.cli import main as cli_main

    shutil.copytree(corpus, tmp_path / "corpus")
    (tmp_path / "mix.toml").write_text(f"""
inputs = [{{path = "corpus/prose.jsonl", source = "prose"}},
          {{path = "corpus/code", source = "code", include = ["*.py"]}},
          {{path = "corpus/more.parquet", source = "prose"}}]
output = "out"
tokenizer = "{tiny_hf_dir}"
docs_per_shard = 5
seed = 3
[decontaminate]
benchmarks = []
extra = ["corpus/items.jsonl"]
[mixture]
weights = {{code = 2.0, prose = 0.5}}
[pack]
max_tokens_per_file = 4000
""")
    assert cli_main(["data", "run", str(tmp_path / "mix.toml"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert f"packed {m['num_documents']:,} documents, {m['num_tokens']:,} tokens into {tmp_path / 'out'}" in out
    same = {k: v for k, v in local_run.manifest.items() if k not in ("inputs", "config", "fingerprint")}
    assert {k: v for k, v in m.items() if k not in ("inputs", "config", "fingerprint")} == same
    assert all(i["path"].startswith(str(tmp_path / "corpus")) for i in m["inputs"])
    assert (tmp_path / "out.work" / "run.json").is_file()
