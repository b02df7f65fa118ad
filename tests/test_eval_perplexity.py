"""Perplexity: every token after the first scored exactly once; token-level mean NLL; the default text."""

from __future__ import annotations

import math

import pytest

from qwen25.eval.perplexity import PerplexityTask, windows
from qwen25.eval.results import ResultsFile
from qwen25.eval.runner import run_task
from test_eval_fakes import ByteTokenizer, LogitBackend


@pytest.mark.parametrize("n, window, stride", [(10, 4, 2), (10, 4, 4), (1000, 128, 64), (5, 8, 4), (9, 4, 3)])
def test_windows_score_each_token_once(n, window, stride):
    spans = windows(n, window, stride)
    scored = []
    for begin, end, n_scored in spans:
        assert end - begin <= window and 0 < n_scored <= end - begin - (1 if begin == 0 else 0)
        scored += list(range(end - n_scored, end))
    assert scored == list(range(1, n))


def test_bad_window_settings():
    with pytest.raises(ValueError):
        windows(10, 4, 5)
    with pytest.raises(ValueError):
        windows(10, 1, 1)


def test_mean_nll_over_tokens(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("abcdefghij" * 10)
    task = PerplexityTask(str(text), None, window=16, stride=8)
    task.tokens(ByteTokenizer())
    backend = LogitBackend(nll_fn=lambda ids, n: 2.0 * n)  # 2 nats per token
    results = ResultsFile(tmp_path / "p.jsonl", {"task": task.name}, resume=False)
    report = run_task(task, lambda: backend, results, progress=False)
    assert report.summary["tokens"] == 99
    assert report.summary["mean_nll"] == pytest.approx(2.0)
    assert report.summary["perplexity"] == pytest.approx(math.exp(2.0))


def test_default_text_is_hamlet():
    from qwen25.eval.data import load_text

    text, source = load_text(None, 2000)
    assert "HAMLET" in text and len(text) == 2000 and "hamlet_gut.txt" in source
