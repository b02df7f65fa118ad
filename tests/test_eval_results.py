"""Results files and resume: append + fsync per sample, finished samples skipped, none lost or doubled."""

from __future__ import annotations

import json

import pytest

from qwen25.eval.humaneval import HumanEvalTask
from qwen25.eval.results import ResultsFile, format_table, mcnemar_p, percent, read_results
from qwen25.eval.runner import run_task
from test_eval_fakes import ScriptedBackend


@pytest.fixture(scope="module")
def reply():
    from qwen25.eval.data import load_humaneval

    problems = {p["prompt"].strip(): p for p in load_humaneval()[:10]}

    def answer(prompt: str) -> str:
        for key, p in problems.items():
            if key in prompt:
                return p["prompt"] + p["canonical_solution"]
        raise AssertionError(prompt)

    return answer


META = {"task": "humaneval-instruct", "model": "m", "backend": "scripted", "limit": 10}


def test_interrupted_run_resumes_without_repeats_or_losses(tmp_path, reply):
    path = tmp_path / "r.jsonl"
    first = ScriptedBackend(reply, fail_after=4)
    with pytest.raises(KeyboardInterrupt):
        run_task(HumanEvalTask("instruct", limit=10), lambda: first, ResultsFile(path, META, resume=False),
                 batch_size=1, progress=False)
    meta, records = read_results(path)
    assert meta == META and [r["id"] for r in records] == [f"HumanEval/{i}" for i in range(4)]

    with pytest.raises(FileExistsError):
        ResultsFile(path, META, resume=False)
    second = ScriptedBackend(reply)
    report = run_task(HumanEvalTask("instruct", limit=10), lambda: second, ResultsFile(path, META, resume=True),
                      batch_size=3, progress=False)
    assert second.calls == 6  # only the unfinished samples were generated
    assert (report.evaluated, report.skipped, report.total) == (6, 4, 10)
    _, records = read_results(path)
    ids = [r["id"] for r in records]
    assert ids == [f"HumanEval/{i}" for i in range(10)] and len(set(ids)) == 10
    assert report.summary["passed"] == 10

    third = ScriptedBackend(reply)  # everything done: the backend is never even created
    created = []
    report = run_task(HumanEvalTask("instruct", limit=10), lambda: created.append(1) or third,
                      ResultsFile(path, META, resume=True), progress=False)
    assert created == [] and report.evaluated == 0 and report.summary["n"] == 10


def test_torn_last_line_is_repaired_and_that_sample_redone(tmp_path, reply):
    path = tmp_path / "r.jsonl"
    run_task(HumanEvalTask("instruct", limit=3), lambda: ScriptedBackend(reply),
             ResultsFile(path, META, resume=False), progress=False)
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:-1]) + lines[-1][: len(lines[-1]) // 2])  # killed mid-write
    backend = ScriptedBackend(reply)
    report = run_task(HumanEvalTask("instruct", limit=3), lambda: backend, ResultsFile(path, META, resume=True),
                      progress=False)
    assert backend.calls == 1 and report.summary["passed"] == 3
    assert all(json.loads(line) for line in path.read_text().splitlines())


def test_resume_with_other_settings_is_refused_but_limit_may_change(tmp_path):
    path = tmp_path / "r.jsonl"
    ResultsFile(path, META, resume=False).add({"id": "a", "passed": True})
    with pytest.raises(ValueError, match="different settings"):
        ResultsFile(path, dict(META, model="other"), resume=True)
    f = ResultsFile(path, dict(META, limit=20, batch_size=4), resume=True)
    assert f.done("a") and not f.done("b")
    with pytest.raises(ValueError, match="already recorded"):
        f.add({"id": "a"})


def test_table_helpers():
    assert percent(1, 4) == "25.0%  (1/4)"
    assert "n/a" in percent(0, 0)
    assert format_table([("a", "1"), ("long key", "2")]).splitlines() == ["a         1", "long key  2"]


@pytest.mark.parametrize(("only_a", "only_b"), [(0, 0), (2, 5), (5, 2), (0, 7), (1, 12), (10, 10), (3, 30)])
def test_mcnemar_p_is_the_exact_binomial_test(only_a: int, only_b: int) -> None:
    """The reference: scipy's two-sided exact binomial test of the discordant split at 1/2."""
    stats = pytest.importorskip("scipy.stats")
    n = only_a + only_b
    expected = 1.0 if n == 0 else stats.binomtest(only_a, n, 0.5).pvalue
    assert mcnemar_p(only_a, only_b) == pytest.approx(expected, rel=1e-12)
