"""RL task files: GSM-symbolic splits and CodeI/O code tasks from a reasoning-gym package file.

The tests build a tiny stand-in wheel (two toy generators, a utils.py, three CodeI/O records) so nothing is
downloaded; the gold solutions and reference programs it holds are the references the verifiers must accept.
Set QWEN25_REASONING_GYM=/path/to/reasoning_gym-*.whl to also build from the real package."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from qwen25.data.code_tasks import build_code_tasks
from qwen25.data.rl_tasks import ReasoningGymSource, build_gsm_splits, read_codeio
from qwen25.train.rewards import CodeTestReward, MathAnswerReward

ROOT = Path(__file__).resolve().parent.parent

UTILS = '''
def format_number(num, max_decimals=2):
    if isinstance(num, int) or float(num).is_integer():
        return str(int(num))
    text = f"{num:.{max_decimals}f}".rstrip("0").rstrip(".")
    if float(text) != num:
        raise ValueError("too many decimals")
    return text


def is_integer(obj):
    return isinstance(obj, int) or float(obj).is_integer()
'''

GENERATORS = '''from random import Random
from typing import Any

from reasoning_gym.utils import format_number, is_integer


def generate_0(rng: Random, difficulty: float = 1.0) -> dict[str, Any]:
    a, b = rng.randint(2, 500), rng.randint(2, 500)
    return {"question": f"Ann has {a} apples and buys {b} more. How many apples does she have?",
            "answer": format_number(a + b),
            "metadata": {"answer_cot": f"{a} + {b} = {a + b}\\n#### {a + b}"}}


def generate_1(rng: Random, difficulty: float = 1.0) -> dict[str, Any]:
    n, d = rng.randint(1, 400), rng.choice([2, 4, 8])
    if d == 8:
        raise ValueError("refused draw")
    return {"question": f"{n} liters are shared by {d} people. How many liters does each get?",
            "answer": format_number(n / d),
            "metadata": {"answer_cot": f"{n} / {d} = {format_number(n / d)}\\n#### {format_number(n / d)}"}}


def generate_2(rng: Random, difficulty: float = 1.0) -> dict[str, Any]:
    raise AssertionError("generator 2 is not in tasks_ok and must never run")
'''

CODEIO = [
    {"task_description": "Sum the squares of the numbers.", "input_output_spec": "Input: `xs` (list of int)",
     "code_sample": "import math\n\ndef main_solution(xs):\n    return {'total': sum(x * x for x in xs), "
                    "'root': math.sqrt(sum(x * x for x in xs))}\n",
     "input_generator": "def generate_inputs(rng):\n    return {'xs': [rng.randint(-9, 9) for _ in range(4)]}\n"},
    {"task_description": "Random pick.", "input_output_spec": "Input: `n` (int)",
     "code_sample": "import random\n\ndef main_solution(n):\n    return random.randint(0, n)\n",
     "input_generator": "def generate_inputs(rng):\n    return {'n': rng.randint(1, 9)}\n"},
    {"task_description": "Crashes.", "input_output_spec": "Input: `n` (int)",
     "code_sample": "def main_solution(n):\n    return 1 / 0\n",
     "input_generator": "def generate_inputs(rng):\n    return {'n': rng.randint(1, 9)}\n"},
]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("rg") / "reasoning_gym-0.0.1-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("reasoning_gym/utils.py", UTILS)
        z.writestr("reasoning_gym/arithmetic/gsm_symbolic/gsm_symbolic.py", "tasks_ok = [\n    0,\n    1,\n]\n")
        z.writestr("reasoning_gym/arithmetic/gsm_symbolic/generators_00_49.py", GENERATORS)
        z.writestr("reasoning_gym/data/codeio.jsonl.gz",
                   gzip.compress("".join(json.dumps(r) + "\n" for r in CODEIO).encode()))
    return path


def test_gsm_splits_are_fixed_disjoint_and_verifiable(wheel):
    source = ReasoningGymSource(wheel)
    assert source.ok_generators() == [0, 1] and source.version() == "0.0.1"
    train, heldout, stats = build_gsm_splits(source, 60, 20, seed=3)
    assert (len(train), len(heldout)) == (60, 20)
    assert stats["refused"] > 0  # generator 1 refuses a third of its draws; they are skipped, not kept
    again = build_gsm_splits(ReasoningGymSource(wheel), 60, 20, seed=3)
    assert (again[0], again[1]) == (train, heldout)  # a fixed seed gives the same files
    assert build_gsm_splits(source, 60, 20, seed=4)[1] != heldout
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in heldout}
    assert {r["generator"] for r in train + heldout} == {0, 1}
    r = heldout[0]
    assert r["messages"] == [{"role": "user", "content": r["prompt"]}] and "\\boxed{}" in r["prompt"]
    # the generators' own step-by-step solutions are the reference: the verifier accepts every one of them
    records = train + heldout
    assert MathAnswerReward()([x["prompt"] for x in records], [x["solution"] for x in records], records) == \
        [1.0] * len(records)
    wrong = [x["solution"].rsplit("#### ", 1)[0] + "#### 100000" for x in records]
    assert sum(MathAnswerReward()([""] * len(records), wrong, records)) == 0


def test_code_tasks_keep_deterministic_references_and_their_tests_check_solutions(wheel):
    records = read_codeio(ReasoningGymSource(wheel))
    tasks, stats = build_code_tasks(records, n_tasks=5, seed=0, n_cases=4)
    assert stats["eligible"] == 2 and stats["failed_reference"] == 1 and len(tasks) == 1  # random: not eligible
    task = tasks[0]
    assert task["entry_point"] == "main_solution" and "main_solution(xs)" in task["prompt"]
    reward = CodeTestReward(timeout=5.0)
    reference = "```python\n" + CODEIO[0]["code_sample"] + "```"
    tuple_version = ("```python\nimport math\ndef main_solution(xs):\n    s = sum(x ** 2 for x in xs)\n"
                     "    return {'root': s ** 0.5, 'total': s}\n```")
    off_by_one = "```python\ndef main_solution(xs):\n    return {'total': sum(x * x for x in xs) + 1, 'root': 0}\n```"
    assert reward(["p"] * 3, [reference, tuple_version, off_by_one], [task] * 3) == [1.0, 1.0, 0.0]


def test_bad_sources_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="pip download"):
        ReasoningGymSource(tmp_path / "missing.whl")
    other = tmp_path / "other.whl"
    with zipfile.ZipFile(other, "w") as z:
        z.writestr("pkg/x.py", "")
    with pytest.raises(ValueError, match="reasoning-gym"):
        ReasoningGymSource(other)


def test_script_writes_the_files(wheel, tmp_path):
    out = tmp_path / "rl"
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "make_rl_tasks.py"), str(wheel), "-o", str(out),
                          "--gsm-train", "30", "--gsm-heldout", "10", "--code-tasks", "3", "--code-cases", "2"],
                         capture_output=True, text=True, cwd=ROOT, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert run.returncode == 0, run.stderr
    lines = lambda name: (out / name).read_text().splitlines()  # noqa: E731
    assert len(lines("gsm_train.jsonl")) == 30 and len(lines("gsm_heldout.jsonl")) == 10
    assert len(lines("code_train.jsonl")) + len(lines("code_heldout.jsonl")) == 1
    assert json.loads((out / "manifest.json").read_text())["gsm"]["train"] == 30


def test_the_real_package_when_given():
    path = os.environ.get("QWEN25_REASONING_GYM")
    if not path:
        pytest.skip("set QWEN25_REASONING_GYM to a reasoning-gym wheel (pip download --no-deps reasoning-gym)")
    source = ReasoningGymSource(path)
    assert len(source.generators()) == 100 and len(source.ok_generators()) > 80
    train, heldout, _ = build_gsm_splits(source, 300, 100, seed=0)
    records = train + heldout
    scores = MathAnswerReward()([""] * len(records), [x["solution"] for x in records], records)
    assert sum(scores) == len(records)
