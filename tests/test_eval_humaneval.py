"""HumanEval harness: code extraction, the sanitizer, FIM splitting, and the canonical solutions scoring 164/164
through the whole harness (runner + sanitizer + sandbox) with a scripted backend instead of a model."""

from __future__ import annotations

import pytest

from qwen25.eval.humaneval import (
    BASE_STOP,
    INSTRUCT_STOP,
    HumanEvalFimTask,
    HumanEvalTask,
    extract_code,
    fim_exact_match,
    fim_program,
    fim_prompt,
    fim_splits,
    sanitize,
    solution_from_completion,
)
from qwen25.eval.results import ResultsFile
from qwen25.eval.runner import run_task
from test_eval_fakes import ScriptedBackend

# --- extraction and sanitizing on hand-written cases ---------------------------------------------------------


def test_extract_code_inside_prefilled_block():
    text = "def f():\n    return 1\n```\n\nThis function returns 1."
    assert extract_code(text, inside_block=True) == "def f():\n    return 1\n"
    assert extract_code("def f(): pass", inside_block=True) == "def f(): pass"


def test_extract_code_from_a_reply():
    text = "Here you go:\n```python\ndef f():\n    return 2\n```\nAnd a shell line:\n```bash\nls\n```"
    assert extract_code(text, inside_block=False) == "def f():\n    return 2\n"
    assert extract_code("```\nx = 1\n```", inside_block=False) == "x = 1\n"
    assert extract_code("no fences here", inside_block=False) == "no fences here"


def test_sanitize_keeps_imports_target_and_helpers_only():
    code = '''import math
from typing import List

THRESHOLD = 3

def helper(x):
    return math.sqrt(x) + THRESHOLD

def unused():
    return 0

class Box:
    pass

def target(xs: List[int]) -> float:
    return sum(helper(x) for x in xs)

print(target([1, 4]))
assert target([]) == 0

if __name__ == "__main__":
    print("demo")
'''
    out = sanitize(code, "target")
    assert "import math" in out and "from typing import List" in out
    assert "def helper" in out and "THRESHOLD = 3" in out and "def target" in out
    assert "def unused" not in out and "class Box" not in out
    assert "print(" not in out and "__main__" not in out and "assert" not in out
    namespace: dict = {}
    exec(out, namespace)
    assert namespace["target"]([1, 4]) == pytest.approx(1 + 3 + 2 + 3)


def test_sanitize_follows_helpers_transitively_and_keeps_decorators():
    code = '''import functools

def a(x):
    return b(x) + 1

def b(x):
    return c(x) * 2

def c(x):
    return x

@functools.lru_cache(maxsize=None)
def target(n):
    return a(n)
'''
    out = sanitize(code, "target")
    assert "@functools.lru_cache" in out
    for name in ("def a", "def b", "def c", "def target"):
        assert name in out


def test_sanitize_drops_a_truncated_tail():
    code = "def target(x):\n    return x + 1\n\ndef other(y):\n    if y >\n"
    out = sanitize(code, "target")
    assert out.strip() == "def target(x):\n    return x + 1"


def test_sanitize_finds_the_function_after_prose():
    code = "Sure! Here is the code:\n\ndef target(x):\n    return 2 * x\n\nIt doubles x."
    out = sanitize(code, "target")
    assert out.strip() == "def target(x):\n    return 2 * x"


def test_sanitize_keeps_helpers_the_tests_need():
    code = "def encode(s):\n    return s[::-1]\n\ndef decode(s):\n    return s[::-1]\n"
    assert "def encode" not in sanitize(code, "decode")
    assert "def encode" in sanitize(code, "decode", {"encode", "candidate"})


def test_sanitize_unparsable_is_empty():
    assert sanitize("this is not python at all (", "f") == ""


def test_solution_from_body_only_completion_uses_the_prompt():
    problem = {"prompt": "def add(a, b):\n    \"\"\"Add.\"\"\"\n", "entry_point": "add",
               "test": "def check(candidate):\n    assert candidate(1, 2) == 3\n"}
    body = "    return a + b\n"
    solution = solution_from_completion(problem, body, "instruct")
    namespace: dict = {}
    exec(solution, namespace)
    assert namespace["add"](1, 2) == 3
    assert "def add" in solution_from_completion(problem, body, "base")


def test_stop_strings_match_the_protocol():
    assert "\n```" in INSTRUCT_STOP and "\nif __name__" in INSTRUCT_STOP and "\n#" in INSTRUCT_STOP
    assert "\ndef " in BASE_STOP


# --- FIM -----------------------------------------------------------------------------------------------------
PROBLEM = {"task_id": "T/0", "prompt": "def f(x):\n", "entry_point": "f",
           "canonical_solution": "    y = x + 1\n\n    return y * 2\n",
           "test": "def check(candidate):\n    assert candidate(1) == 4\n"}


def test_fim_splits_and_prompt():
    splits = fim_splits(PROBLEM, "all")
    assert [s["line"] for s in splits] == [0, 2]  # blank line skipped
    s = splits[1]
    assert s["prefix"] == "def f(x):\n    y = x + 1\n\n" and s["middle"] == "    return y * 2\n" and s["suffix"] == ""
    assert fim_prompt("P", "S") == "<|fim_prefix|>P<|fim_suffix|>S<|fim_middle|>"
    assert [s["line"] for s in fim_splits(PROBLEM, "middle")] == [2]


def test_fim_exact_match_and_program():
    assert fim_exact_match("return y * 2", "    return y * 2\n")
    assert not fim_exact_match("return y*2", "    return y * 2\n")
    s = fim_splits(PROBLEM, "all")[0]
    program = fim_program(s["prefix"], "    y = x + 1", s["suffix"])
    assert program == PROBLEM["prompt"] + PROBLEM["canonical_solution"]


# --- the whole harness on the real data, no model -------------------------------------------------------------
@pytest.fixture(scope="module")
def problems():
    from qwen25.eval.data import load_humaneval

    return load_humaneval()


def test_canonical_solutions_score_164_of_164(problems, tmp_path):
    assert len(problems) == 164
    by_prompt = {p["prompt"].strip(): p for p in problems}

    def reply(prompt: str) -> str:  # the "model" restates the function with the canonical body, then closes the fence
        for key, p in by_prompt.items():
            if key in prompt:
                return p["prompt"] + p["canonical_solution"]
        raise AssertionError("unknown prompt")

    task = HumanEvalTask("instruct")
    results = ResultsFile(tmp_path / "he.jsonl", {"task": task.name}, resume=False)
    report = run_task(task, lambda: ScriptedBackend(reply, stops=True), results, batch_size=41, progress=False)
    failures = [r["id"] for r in results.records.values() if not r["passed"]]
    assert failures == []
    assert report.summary["passed"] == 164 and report.summary["pass@1"] == 1.0


def test_base_protocol_canonical_and_wrong_solutions(problems, tmp_path):
    subset = {p["prompt"]: p for p in problems[:6]}

    def reply(prompt: str) -> str:
        p = subset[prompt]
        # even problems: the canonical body; odd ones: a body that returns None (must fail)
        return p["canonical_solution"] if int(p["task_id"].split("/")[1]) % 2 == 0 else "    return None\n"

    task = HumanEvalTask("base", limit=6)
    results = ResultsFile(tmp_path / "base.jsonl", {"task": task.name}, resume=False)
    report = run_task(task, lambda: ScriptedBackend(reply), results, batch_size=3, progress=False)
    assert [r["passed"] for r in results.records.values()] == [True, False, True, False, True, False]
    assert report.summary["passed"] == 3


def test_fim_task_with_the_reference_middles(problems, tmp_path):
    task = HumanEvalFimTask("middle", limit=8)
    samples = {s["id"]: s for s in task.samples()}
    by_prompt = {fim_prompt(s["prefix"], s["suffix"]): s for s in samples.values()}

    def reply(prompt: str) -> str:
        s = by_prompt[prompt]
        task_id = s["problem"]["task_id"]
        if task_id == "HumanEval/3":
            return "    pass\n"  # wrong
        if task_id == "HumanEval/5":
            return "\n" + s["middle"] + "    undefined_name()\n"  # right first line, then it runs on
        return s["middle"]

    results = ResultsFile(tmp_path / "fim.jsonl", {"task": task.name}, resume=False)
    report = run_task(task, lambda: ScriptedBackend(reply), results, batch_size=4, progress=False)
    records = {r["id"].split(":")[0]: r for r in results.records.values()}
    assert len(records) == 8
    assert report.summary["exact_match"] == 6 / 8 and report.summary["exact_match_first_line"] == 7 / 8
    assert not records["HumanEval/3"]["exact_match"] and not records["HumanEval/3"]["passed"]
    runs_on = records["HumanEval/5"]
    assert not runs_on["exact_match"] and runs_on["exact_match_first_line"] and runs_on["passed_first_line"]
    assert all(r["passed"] for k, r in records.items() if k not in ("HumanEval/3", "HumanEval/5"))
