"""Code reward: 1.0 when the completion's program passes the example's unit tests in the sandbox, else 0.0.

The program is the first ```python block of the completion (or the whole text when it has no block); with an
`entry_point` in the example it is sanitized to that function and what it needs (`qwen25.eval.sanitize`, as
HumanEval scoring does), so example calls and prints the model adds do not run. `example["tests"]` (Python
source, typically `assert` statements) is appended and the whole runs in `qwen25.eval.sandbox`: a fresh
process per completion with a wall-clock timeout, CPU/memory/process/file limits and no network where the
kernel allows it. Any failure — an assertion, an exception, a timeout, a crash — scores 0; that is the
program's failure, not the reward's, so it is not counted as a reward failure. Completions run in parallel,
one process per core.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

from qwen25.eval.sandbox import SandboxLimits, SandboxResult, run_python
from qwen25.eval.sanitize import defines, extract_code, sanitize

__all__ = ["CodeTestReward", "program_for"]


def program_for(completion: str, example: dict) -> str:
    """The test program: the completion's code (sanitized to example['entry_point'] when given) + the tests."""
    if "tests" not in example:
        raise KeyError(f"the example has no 'tests' (keys: {sorted(example)})")
    code = extract_code(completion, inside_block=False)
    entry = example.get("entry_point")
    if entry:
        cleaned = sanitize(code, entry)
        code = cleaned if defines(cleaned, entry) else code
    return f"{code}\n\n{example['tests']}\n"


class CodeTestReward:
    """Unit tests in the sandbox (see the module docstring)."""

    def __init__(self, name: str = "code", timeout: float = 10.0, memory_mb: int = 1024,
                 workers: int | None = None) -> None:
        self.name = name
        self.limits = SandboxLimits(timeout=timeout, memory_mb=memory_mb)
        self.workers = workers or os.cpu_count() or 1

    def run(self, completions: list[str], examples: list[dict]) -> list[SandboxResult]:
        programs = [program_for(c, e) for c, e in zip(completions, examples, strict=True)]
        if len(programs) <= 1:
            return [run_python(p, self.limits) for p in programs]
        with ThreadPoolExecutor(max_workers=min(len(programs), self.workers)) as pool:
            return list(pool.map(lambda p: run_python(p, self.limits), programs))

    def __call__(self, prompts: list[str], completions: list[str], examples: list[dict]) -> list[float]:
        return [1.0 if r.ok else 0.0 for r in self.run(completions, examples)]
