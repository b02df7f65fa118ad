"""Math answer extraction, normalisation and matching on hand-written cases (CHAMP-style golds)."""

from __future__ import annotations

import pytest

from qwen25.eval.math import (
    answers_match,
    extract_answer,
    extract_program,
    last_boxed,
    last_output_line,
    normalize_answer,
)


def test_last_boxed():
    assert last_boxed(r"so \boxed{1} then finally \boxed{\frac{1}{2}}.") == r"\frac{1}{2}"
    assert last_boxed(r"\boxed{\{1, 2\}}") == r"\{1, 2\}"
    assert last_boxed(r"answer: \boxed 7.") == "7."
    assert last_boxed(r"\fbox{42}") == "42"
    assert last_boxed("no box") is None
    assert last_boxed(r"\boxed{unclosed") is None


def test_extract_answer_fallbacks():
    assert extract_answer(r"... \boxed{239}") == ("239", "boxed")
    assert extract_answer("Thus the answer is 12.") == ("12", "answer-is")
    assert extract_answer("we get 3 then 1,024 ways") == ("1,024", "last-number")
    assert extract_answer("nothing here") == (None, "none")


@pytest.mark.parametrize("raw, norm", [
    (r"$\frac{1}{2}$", "(1)/(2)"),
    (r"\dfrac{n(n+1)}{2}", "(n(n+1))/(2)"),
    (r"2^{n-1}", "2^(n-1)"),
    (r"\text{No}", "no"),
    (r"\sqrt{2} \cdot 3", "sqrt(2)*3"),
    (r"x \leq 5.", "x<=5"),
    ("1,000", "1000"),
    (r"\left( 1, 2 \right)", "(1,2)"),
    ("(x^3−x^2+1)", "(x^3-x^2+1)"),
])
def test_normalize(raw, norm):
    assert normalize_answer(raw) == norm


@pytest.mark.parametrize("pred, gold, rule", [
    ("239", "239", "exact"),
    (r"2^{n-1}", "2^(n-1)", "exact"),
    (r"\text{No}", "No", "exact"),
    ("No, it is impossible", "No", "yes-no"),
    ("0.5", "1/2", "numeric"),
    (r"\frac{3}{6}", "0.5", "numeric"),
    ("98", "98 values", "core"),
    ("n", "n times", "core"),
    (r"f(x)=0", "f(x)=0", "exact"),
    ("0", "f(x)=0", "variable"),
    (r"\frac{n(n+1)(2n+1)}{6}", "sum_(i=1)^n i^2, or equivalently n(n+1)(2n+1)/6", "sympy"),
    ("n(n+1)2^(n-2)", "n(n+1)*2^(n-2)", "sympy"),
    ("(n+1)n/2", "n(n+1)/2", "sympy"),
])
def test_answers_match(pred, gold, rule):
    assert answers_match(pred, gold) == (True, rule)


@pytest.mark.parametrize("pred, gold", [
    ("240", "239"), ("Yes", "No"), (None, "1"), ("2^n", "2^(n-1)"), ("97", "98 values"),
    ("__import__('os')", "0"),
])
def test_answers_do_not_match(pred, gold):
    assert answers_match(pred, gold)[0] is False


def test_program_of_thought_helpers():
    text = "Plan.\n```python\nprint(1)\n```\nBetter:\n```python\nx = 6 * 7\nprint(x)\n```\n"
    assert extract_program(text) == "x = 6 * 7\nprint(x)\n"
    assert extract_program("no code") is None
    with_output = "```python\nprint(6 * 3)\n```\n\nOutput:\n```\n18\n```\n"
    assert extract_program(with_output) == "print(6 * 3)\n"
    assert extract_program("```\nx = 2\nprint(x)\n```") == "x = 2\nprint(x)\n"
    assert extract_program("```\n42\n```") is None
    assert last_output_line("working...\n42\n\n") == "42"
    assert last_output_line("") is None
