"""Verifiable coding tasks with unit tests, built from reasoning-gym's CodeI/O records (codeio.jsonl.gz).

Each CodeI/O record has a task description, an input/output spec, a reference `main_solution(...)` and a
`generate_inputs(rng)` input generator. A record becomes a task when its reference imports only a small set of
deterministic standard-library modules (no `random`, no numpy: the tests must mean the same thing on every
run) and, run in the sandbox (`qwen25.eval.sandbox`), it returns JSON-serialisable outputs that are the same
when called twice on `n_cases` generated inputs. Those input/output pairs become the task's unit tests:
`main_solution(**args)` must equal the expected output (numbers within 1e-6 relative, containers element-wise,
tuples compared as lists). The prompt asks for `main_solution` with the reference's parameter list.

Record: {"id", "task": "codeio", "prompt", "messages", "entry_point": "main_solution", "tests", "source"},
scored by `qwen25.train.rewards.CodeTestReward`. The reference solution is not kept in the record.
"""

from __future__ import annotations

import ast
import json
import os
import random
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from qwen25.eval.sandbox import SandboxLimits, run_python

__all__ = ["ALLOWED_IMPORTS", "build_code_tasks", "code_task_record", "unit_test_source"]

ALLOWED_IMPORTS = frozenset({"math", "itertools", "collections", "functools", "string", "re", "heapq", "bisect",
                             "fractions", "decimal", "json", "typing", "copy", "operator", "statistics", "cmath"})

_HARNESS = """\
import copy as _copy, json as _json
from random import Random
{solution}

{generator}

_cases = []
for _i in range({n_cases}):
    _args = generate_inputs(Random({seed} + _i))
    _first = _json.dumps(main_solution(**_copy.deepcopy(_args)), allow_nan=False, sort_keys=True)
    _again = _json.dumps(main_solution(**_copy.deepcopy(_args)), allow_nan=False, sort_keys=True)
    assert _first == _again, "not deterministic"
    _cases.append([_args, _json.loads(_first)])
print(_json.dumps(_cases, allow_nan=False))
"""

_TESTS = """\
import json as _json
import math as _math


def _same(a, b):
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return _math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b


for _args, _expected in _json.loads({cases!r}):
    _got = _json.loads(_json.dumps(main_solution(**_args)))
    assert _same(_got, _expected), f"main_solution(**{{_args!r}}) returned {{_got!r}}, expected {{_expected!r}}"
"""


def _imports(code: str) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            found.add((node.module or "").split(".")[0])
    return found


def _signature(code: str) -> str | None:
    for node in ast.parse(code).body:
        if isinstance(node, ast.FunctionDef) and node.name == "main_solution":
            return f"main_solution({ast.unparse(node.args)})"
    return None


def _eligible(record: dict[str, Any]) -> bool:
    try:
        return (_imports(record["code_sample"]) <= ALLOWED_IMPORTS and _signature(record["code_sample"]) is not None
                and "def generate_inputs" in record["input_generator"])
    except (SyntaxError, KeyError, TypeError):
        return False


def unit_test_source(cases: list) -> str:
    """The unit-test program appended to a candidate solution."""
    return _TESTS.format(cases=json.dumps(cases))


def code_task_record(record: dict[str, Any], cases: list, index: int, source: str) -> dict[str, Any]:
    signature = _signature(record["code_sample"])
    prompt = (f"Write a Python function `{signature}` for the following task.\n\n{record['task_description'].strip()}"
              f"\n\n{record['input_output_spec'].strip()}\n\nReply with the complete function (and any imports it "
              "needs) in one ```python code block.")
    return {"id": f"codeio-{index}", "task": "codeio", "prompt": prompt,
            "messages": [{"role": "user", "content": prompt}], "entry_point": "main_solution",
            "tests": unit_test_source(cases), "source": source}


def _cases(record: dict[str, Any], n_cases: int, seed: int, limits: SandboxLimits) -> list | None:
    program = _HARNESS.format(solution=record["code_sample"], generator=record["input_generator"], n_cases=n_cases,
                              seed=seed)
    result = run_python(program, limits)
    if not result.ok:
        return None
    try:
        cases = json.loads(result.stdout)
    except json.JSONDecodeError:
        return None
    return cases if len(cases) == n_cases and len(json.dumps(cases)) <= 20_000 else None


def build_code_tasks(records: Sequence[dict[str, Any]], n_tasks: int, seed: int = 0, n_cases: int = 5,
                     source: str = "reasoning-gym codeio", timeout: float = 10.0,
                     progress: bool = False) -> tuple[list[dict], Counter]:
    """Up to n_tasks task records from CodeI/O records (in an order shuffled by seed) and counters (eligible,
    failed_reference: the reference crashed, was slow, non-deterministic or not JSON)."""
    order = list(range(len(records)))
    random.Random(f"{seed}:codeio").shuffle(order)
    candidates = [i for i in order if _eligible(records[i])]
    stats = Counter(records=len(records), eligible=len(candidates))
    limits = SandboxLimits(timeout=timeout, memory_mb=1024)
    tasks: list[dict] = []
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=n_tasks, desc="code tasks", unit="task")
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        for start in range(0, len(candidates), 16):
            batch = candidates[start:start + 16]
            for i, cases in zip(batch, pool.map(lambda i: _cases(records[i], n_cases, seed, limits), batch)):
                if cases is None:
                    stats["failed_reference"] += 1
                    continue
                if len(tasks) < n_tasks:
                    tasks.append(code_task_record(records[i], cases, i, source))
                    if bar is not None:
                        bar.update(1)
            if len(tasks) >= n_tasks:
                break
    if bar is not None:
        bar.close()
    stats["tasks"] = len(tasks)
    return tasks, stats
