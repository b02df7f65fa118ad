"""Exact-answer math reward: 1.0 when the completion's final answer equals the example's `answer`, else 0.0.

The final answer is, in order of preference: the content of the last `\\boxed{...}`; the number after the last
`#### ` (GSM8K's marker); the text after the last "the answer is"; and, unless `last_number=False`, the last
number in the completion. It is compared with `example["answer"]` by `qwen25.eval.math.answers_match` after
the same normalisation the CHAMP evaluation uses (LaTeX wrappers, thousands separators, spacing and case
removed; numbers equal within 1e-6 relative, fractions and decimals alike; simple expressions through sympy).
A completion cut before its answer scores 0. An example without an `answer` is a failure of this reward
(`score_rewards` counts it), not a silent 0.
"""

from __future__ import annotations

import re

from qwen25.eval.math import answers_match, last_boxed

__all__ = ["MathAnswerReward", "final_answer"]

_GSM_MARK = re.compile(r"####\s*([^\n]+)")
_ANSWER_IS = re.compile(r"[Tt]he (?:final )?answer is[:\s]*([^\n]+)")
_NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?(?:/\d+)?")


def final_answer(text: str, last_number: bool = True) -> tuple[str | None, str]:
    """(answer, where it came from: "boxed", "gsm", "answer-is", "last-number" or "none")."""
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed.strip(), "boxed"
    marks = _GSM_MARK.findall(text)
    if marks:
        return marks[-1].strip().rstrip("."), "gsm"
    said = _ANSWER_IS.findall(text)
    if said:
        answer = said[-1].strip().rstrip(".")
        number = _NUMBER.search(answer)  # "the answer is 42 apples" -> 42
        return (number.group(0) if number and not answer.startswith("\\") else answer), "answer-is"
    if last_number:
        numbers = _NUMBER.findall(text)
        if numbers:
            return numbers[-1], "last-number"
    return None, "none"


class MathAnswerReward:
    """Verifiable math: 1.0 for the right final answer (see the module docstring)."""

    def __init__(self, name: str = "math", last_number: bool = True, answer_key: str = "answer") -> None:
        self.name, self.last_number, self.answer_key = name, last_number, answer_key

    def __call__(self, prompts: list[str], completions: list[str], examples: list[dict]) -> list[float]:
        scores = []
        for completion, example in zip(completions, examples, strict=True):
            if self.answer_key not in example:
                raise KeyError(f"the example has no {self.answer_key!r} (keys: {sorted(example)})")
            predicted, _ = final_answer(completion, self.last_number)
            scores.append(1.0 if answers_match(predicted, str(example[self.answer_key]))[0] else 0.0)
        return scores
