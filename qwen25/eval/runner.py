"""The evaluation loop shared by every task: select samples, skip finished ones, evaluate in batches,
append each record durably, summarise over everything in the results file.

A task says what its samples are, how to evaluate a batch of them on a backend, and how to summarise the
records. The loop owns resume (ids already in the file are skipped), the progress bar and the summary.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from qwen25.eval.results import Record, ResultsFile, format_table


class Task:
    """One evaluation. Subclasses fill in `name`, `settings()`, `samples()`, `evaluate()`, `summarize()`."""

    name = "?"
    batchable = False  # whether evaluate() benefits from several samples at once (generation on qwen25)

    def settings(self) -> dict[str, Any]:
        """Everything that changes a sample's result (goes into the results file's meta record)."""
        return {}

    def samples(self) -> list[dict[str, Any]]:
        """All samples in a fixed order (each has a unique "id"), already cut to the task's --limit."""
        raise NotImplementedError

    def evaluate(self, backend: Any, batch: list[dict[str, Any]]) -> list[Record]:
        """One record per sample, in order. Each record has the sample's "id"."""
        raise NotImplementedError

    def summarize(self, records: list[Record]) -> dict[str, Any]:
        """Metrics over `records` (JSON-serialisable), plus "rows": [(label, text)] for the table."""
        raise NotImplementedError

    def progress_postfix(self, records: list[Record]) -> str:
        return ""


@dataclass
class RunReport:
    total: int
    evaluated: int
    skipped: int
    seconds: float
    summary: dict[str, Any] = field(default_factory=dict)


def run_task(task: Task, backend_factory: Callable[[], Any], results: ResultsFile, batch_size: int = 1,
             progress: bool = True) -> RunReport:
    """Evaluate the task's samples that `results` does not hold yet; summarise over all of them."""
    from tqdm import tqdm

    samples = task.samples()
    todo = [s for s in samples if not results.done(s["id"])]
    skipped = len(samples) - len(todo)
    start = time.perf_counter()
    if todo:
        backend = backend_factory()
        step = batch_size if task.batchable else 1
        done_here: list[Record] = [results.records[s["id"]] for s in samples if results.done(s["id"])]
        with tqdm(total=len(samples), initial=skipped, desc=task.name, unit="sample", disable=not progress,
                  dynamic_ncols=True) as bar:
            for i in range(0, len(todo), step):
                batch = todo[i: i + step]
                records = task.evaluate(backend, batch)
                for sample, record in zip(batch, records, strict=True):
                    if record["id"] != sample["id"]:
                        raise RuntimeError(f"task returned record {record['id']} for sample {sample['id']}")
                    results.add(record)
                    done_here.append(record)
                bar.update(len(batch))
                postfix = task.progress_postfix(done_here)
                if postfix:
                    bar.set_postfix_str(postfix, refresh=False)
    seconds = time.perf_counter() - start
    selected = [results.records[s["id"]] for s in samples if results.done(s["id"])]
    summary = task.summarize(selected)
    return RunReport(len(samples), len(todo), skipped, seconds, summary)


def summary_table(task: Task, meta: dict[str, Any], report: RunReport, output: str) -> str:
    head = [("task", meta.get("title", task.name)), ("model", str(meta.get("model"))),
            ("backend", str(meta.get("backend"))),
            ("samples", f"{report.total} ({report.evaluated} evaluated now, {report.skipped} from the file)")]
    tail = [("wall time", f"{report.seconds:.1f} s (this run)"), ("results", output)]
    return format_table(head + list(report.summary.get("rows", [])) + tail, title="qwen25 eval")
