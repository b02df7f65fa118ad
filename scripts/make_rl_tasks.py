"""Build the verifiable RL task files (math and code) from a downloaded reasoning-gym package.

    pip download --no-deps reasoning-gym -d /tmp/rg          # the package file only; nothing is installed
    python scripts/make_rl_tasks.py /tmp/rg/reasoning_gym-*.whl --output data/rl

writes into --output (fixed seed: the same files on every machine):
    gsm_train.jsonl, gsm_heldout.jsonl      GSM-symbolic word problems, answer checked by the `math` reward
    code_train.jsonl, code_heldout.jsonl    CodeI/O functions with unit tests, checked by the `code` reward
    arith_train.jsonl, arith_heldout.jsonl  short integer expressions (no source needed), the `math` reward
    manifest.json                           source, seed, counts
    python scripts/make_rl_tasks.py --output data/rl --gsm-train 0 --gsm-heldout 0 --code-tasks 0  # arith only
See qwen25/data/rl_tasks.py, qwen25/data/code_tasks.py and qwen25/data/arith_tasks.py for the record format and how the splits are drawn.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from qwen25.data.arith_tasks import build_arith_splits
from qwen25.data.code_tasks import build_code_tasks
from qwen25.data.rl_tasks import ReasoningGymSource, build_gsm_splits, read_codeio


def write_jsonl(path: Path, records: list[dict]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", nargs="?", help="the reasoning-gym .whl or .tar.gz from `pip download --no-deps` (or a "
                   "directory); needed for the gsm and code files, not for arith")
    p.add_argument("--output", "-o", required=True, help="directory for the jsonl files")
    p.add_argument("--seed", type=int, default=0, help="seeds every draw (default 0)")
    p.add_argument("--gsm-train", type=int, default=2000, help="math train problems (default 2000)")
    p.add_argument("--gsm-heldout", type=int, default=200, help="math held-out problems (default 200)")
    p.add_argument("--code-tasks", type=int, default=300, help="code tasks in all; a fifth are held out (default "
                   "300; 0 = none)")
    p.add_argument("--arith-train", type=int, default=2000, help="arithmetic train expressions (default 2000; 0 = "
                   "none)")
    p.add_argument("--arith-heldout", type=int, default=200, help="arithmetic held-out expressions (default 200)")
    p.add_argument("--code-cases", type=int, default=5, help="unit-test cases per code task (default 5)")
    a = p.parse_args(argv)
    try:
        needs_source = a.gsm_train + a.gsm_heldout > 0 or a.code_tasks > 0
        if needs_source and a.source is None:
            raise ValueError("the gsm and code files need the reasoning-gym package file as the first argument "
                             "(or pass --gsm-train 0 --gsm-heldout 0 --code-tasks 0 for arith only)")
        source = ReasoningGymSource(a.source) if needs_source else None
        out = Path(a.output)
        out.mkdir(parents=True, exist_ok=True)
        manifest: dict = {"source": Path(a.source).name if a.source else None, "seed": a.seed}
        if a.gsm_train + a.gsm_heldout > 0:
            train, heldout, stats = build_gsm_splits(source, a.gsm_train, a.gsm_heldout, a.seed)
            write_jsonl(out / "gsm_train.jsonl", train)
            write_jsonl(out / "gsm_heldout.jsonl", heldout)
            print(f"gsm: {len(train)} train, {len(heldout)} held-out ({dict(stats)})", flush=True)
            manifest["gsm"] = {"train": len(train), "heldout": len(heldout), **stats}
        if a.arith_train + a.arith_heldout > 0:
            train, heldout, stats = build_arith_splits(a.arith_train, a.arith_heldout, a.seed)
            write_jsonl(out / "arith_train.jsonl", train)
            write_jsonl(out / "arith_heldout.jsonl", heldout)
            print(f"arith: {len(train)} train, {len(heldout)} held-out ({dict(stats)})", flush=True)
            manifest["arith"] = {"train": len(train), "heldout": len(heldout), **stats}
        if a.code_tasks:
            tasks, code_stats = build_code_tasks(read_codeio(source), a.code_tasks, a.seed, a.code_cases,
                                                 source=f"reasoning-gym {source.version()} codeio", progress=True)
            cut = len(tasks) - len(tasks) // 5
            write_jsonl(out / "code_train.jsonl", tasks[:cut])
            write_jsonl(out / "code_heldout.jsonl", tasks[cut:])
            print(f"code: {cut} train, {len(tasks) - cut} held-out ({dict(code_stats)})", flush=True)
            manifest["code"] = {"train": cut, "heldout": len(tasks) - cut, **code_stats}
        (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    except (OSError, ValueError, KeyError) as e:
        print(f"make_rl_tasks: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
