"""The report of a data run: `report.md` (counts per stage and rule, tokens per source, decontaminated documents
with their benchmark items, timings, shards resumed) and `report.png` (bar charts: documents removed per stage,
tokens per source), written into the output directory next to the manifest."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["write_report"]


def _table(rows: list[tuple[Any, ...]], header: tuple[str, ...]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(f"{c:,}" if isinstance(c, int) else str(c) for c in r) + " |" for r in rows]
    return out + [""]


def write_report(output: Path, result: Any) -> None:
    """Write report.md and report.png for a finished `qwen25.data.pipeline.RunResult`."""
    m = result.manifest
    p = m["pipeline"]
    c = p["counts"]
    lines = [f"# Data run: {output}", "",
             f"{c['documents_in']:,} documents in ({c['malformed']:,} malformed records skipped, {c['empty']:,} "
             f"empty); {c['kept_documents']:,} kept; {m['num_documents']:,} documents and {m['num_tokens']:,} "
             "tokens after the mixture.", ""]
    lines += ["## Removed per stage", ""] + _table(list(c["removed_by_stage"].items()), ("stage", "documents"))
    lines += ["## Removed per rule", ""] + _table(list(c["removed_by_rule"].items()), ("rule", "documents"))
    lines += ["## Mixture", ""] + _table([(s, p["documents_per_source"][s], t) for s, t in
                                          p["tokens_per_source"].items()], ("source", "documents", "tokens"))
    if p.get("quality"):
        lines += ["## Quality", ""] + [f"- {k}: {v}" for k, v in p["quality"].items()] + [""]
    removed = output / "removed.jsonl"
    contaminated = [json.loads(x) for x in removed.read_text(encoding="utf-8").splitlines() if '"item"' in x]
    if contaminated:
        lines += ["## Decontaminated", ""] + _table([(r["id"], r["source"], r["item"]) for r in contaminated[:200]],
                                                    ("document", "source", "benchmark item"))
    lines += ["## Run", ""] + _table([(s, result.seconds.get(s, ""), result.processed.get(s, ""),
                                       result.resumed.get(s, "")) for s in result.seconds],
                                     ("stage", "seconds", "shards processed", "shards resumed"))
    lines += [f"- {n}" for n in result.notes]
    (output / "report.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    _plot(output / "report.png", c["removed_by_stage"], p["tokens_per_source"])


def _plot(path: Path, removed: dict[str, int], tokens: dict[str, int]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    a.barh(list(removed), list(removed.values()), color="#c0504d")
    a.set_title("documents removed per stage")
    a.invert_yaxis()
    b.barh(list(tokens) or ["(none)"], list(tokens.values()) or [0], color="#4f81bd")
    b.set_title("tokens per source (after the mixture)")
    b.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
