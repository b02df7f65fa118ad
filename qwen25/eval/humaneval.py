"""HumanEval (pass@1) and HumanEval-FIM (exact match + pass@1): prompts, sanitizer, scoring.

Instruct protocol (Qwen2.5-Coder's EvalPlus setup, SPEC §5): greedy, ChatML with the system prompt below, the
user turn "Can you complete the following Python function?\\n```python\\n{prompt}\\n```\\n" and the assistant
turn pre-filled with "```python\\n"; stop strings INSTRUCT_STOP; 2048 new tokens. The completion (the code
after the pre-fill) is sanitized to the target function and what it needs, then run against the problem's
tests. The prompt's `{prompt}` is the problem text with surrounding whitespace stripped (as EvalPlus does).

Base protocol (plain completion): the raw problem prompt, greedy, EvalPlus's direct-completion stop strings
BASE_STOP; the program is `prompt + completion`, sanitized the same way.

The sanitizer (code extraction, then the entry point and what it needs) is `qwen25.eval.sanitize`.

HumanEval-FIM: each canonical solution is split at one line: prefix = prompt + the lines before it, middle = the
line, suffix = the lines after it. The prompt is `<|fim_prefix|>{prefix}<|fim_suffix|>{suffix}<|fim_middle|>`
(raw, no chat template) and generation stops on any FIM/repo token, <|im_end|> or <|endoftext|>. Exact match
compares `generated.strip() == middle.strip()` (leading/trailing whitespace, including the line's indentation
and newline, is ignored). pass@1 runs `prefix + generated + suffix` (a newline is inserted after the generated
text when it has none: the masked middle is a whole line) against the tests. `--fim-lines all` masks every
non-blank line of every solution (SantaCoder-style single-line infilling, 1,033 samples); `middle` masks one line
per problem (the middle non-blank line). Secondary metrics "first line" score only the first non-blank line
of the generation (the masked span is one line): an instruct model often does not stop after the middle but
goes on to rewrite the suffix, which the primary metrics count as a miss.
"""

from __future__ import annotations

import os
from typing import Any

from qwen25.eval.results import Record, percent
from qwen25.eval.runner import Task
from qwen25.eval.sandbox import SandboxLimits, SandboxResult, run_python
from qwen25.eval.sanitize import defines, extract_code, sanitize, test_names

SYSTEM_PROMPT = "You are an intelligent programming assistant to produce Python algorithmic solutions"
USER_TEMPLATE = "Can you complete the following Python function?\n```python\n{prompt}\n```\n"
RESPONSE_PREFIX = "```python\n"
INSTRUCT_STOP = ["<|endoftext|>", "\nif __name__", "\ndef main(", "\nprint(", "\n#", "\n```"]
BASE_STOP = ["<|endoftext|>", "<|endofmask|>", "</s>", "\nif __name__", "\ndef main(", "\nprint(",
             "\ndef ", "\nclass ", "\nimport ", "\nfrom ", "\nassert "]
FIM_STOP_TOKENS = ["<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>",
                   "<|file_sep|>", "<|im_end|>", "<|endoftext|>"]


# --- prompts ---------------------------------------------------------------------------------------------
def instruct_messages(problem: dict[str, Any]) -> list[dict[str, str]]:
    return [{"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": USER_TEMPLATE.format(prompt=problem["prompt"].strip())}]


def render_chatml(messages: list[dict[str, str]]) -> str:
    """Plain ChatML plus the assistant header (what Qwen2.5's template renders for system + user turns)."""
    text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return text + "<|im_start|>assistant\n"


def fim_prompt(prefix: str, suffix: str) -> str:
    return f"<|fim_prefix|>{prefix}<|fim_suffix|>{suffix}<|fim_middle|>"


def fim_splits(problem: dict[str, Any], lines: str = "all") -> list[dict[str, Any]]:
    """The FIM samples of one problem: dicts with line (index), prefix, middle, suffix."""
    solution_lines = problem["canonical_solution"].splitlines(keepends=True)
    candidates = [i for i, line in enumerate(solution_lines) if line.strip()]
    if lines == "middle":
        candidates = [candidates[len(candidates) // 2]] if candidates else []
    elif lines != "all":
        raise ValueError(f"fim lines must be 'all' or 'middle', got {lines!r}")
    out = []
    for i in candidates:
        out.append(dict(line=i, prefix=problem["prompt"] + "".join(solution_lines[:i]),
                        middle=solution_lines[i], suffix="".join(solution_lines[i + 1:])))
    return out


def fim_program(prefix: str, generated: str, suffix: str) -> str:
    # the masked middle is a whole line: end the generated text with a newline if it has none
    joiner = "" if generated.endswith("\n") or not suffix else "\n"
    return prefix + generated + joiner + suffix


def fim_exact_match(generated: str, middle: str) -> bool:
    return generated.strip() == middle.strip()


def first_line(generated: str) -> str:
    """The first non-blank line of a generation (with its newline): what a single-line infill can use."""
    for line in generated.splitlines(keepends=True):
        if line.strip():
            return line
    return ""


# --- from completion to program ----------------------------------------------------------------------------
def solution_from_completion(problem: dict[str, Any], completion: str, protocol: str) -> str:
    """The program text to test, from the raw completion, per protocol."""
    entry = problem["entry_point"]
    names = test_names(problem)
    if protocol == "instruct":
        code = extract_code(completion, inside_block=True)
        solution = sanitize(code, entry, names)
        if not defines(solution, entry):  # the model wrote only a body: complete the prompt instead
            solution = sanitize(problem["prompt"] + code, entry, names)
        return solution
    if protocol == "base":
        return sanitize(problem["prompt"] + completion, entry, names)
    raise ValueError(f"protocol must be 'instruct' or 'base', got {protocol!r}")


# --- execution -------------------------------------------------------------------------------------------
def test_program(problem: dict[str, Any], solution: str) -> str:
    return f"{solution}\n\n{problem['test']}\n\ncheck({problem['entry_point']})\n"


def run_tests(problem: dict[str, Any], solution: str, limits: SandboxLimits) -> SandboxResult:
    return run_python(test_program(problem, solution), limits)


def run_many(programs: list[str], limits: SandboxLimits) -> list[SandboxResult]:
    """Run several test programs, one sandbox process each, as many at a time as there are cores."""
    if len(programs) <= 1:
        return [run_python(p, limits) for p in programs]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=min(len(programs), os.cpu_count() or 1)) as pool:
        return list(pool.map(lambda p: run_python(p, limits), programs))


def failure_reason(result: SandboxResult) -> str | None:
    if result.ok:
        return None
    if result.status == "timeout":
        return "timeout"
    last = [ln for ln in result.stderr.strip().splitlines() if ln.strip()]
    return (last[-1] if last else f"{result.status} (exit {result.returncode})")[:300]


# --- tasks -----------------------------------------------------------------------------------------------
def _stop_ids(tokenizer: Any, names: list[str]) -> list[int]:
    ids = [tokenizer.token_to_id(n) for n in names]
    return [i for i in ids if i is not None]


def _generation_rows(records: list[Record]) -> list[tuple[str, str]]:
    tokens = sum(r.get("gen_tokens", 0) for r in records)
    # batch-mates share their batch's wall time: count each batch once
    seconds = sum(r.get("gen_seconds", 0.0) / max(r.get("batch_size", 1), 1) for r in records)
    rate = f" ({tokens / seconds:.1f} tok/s)" if seconds > 0 else ""
    cut = sum(1 for r in records if r.get("finish_reason") == "length")
    return [("generated", f"{tokens:,} tokens in {seconds:.1f} s{rate}; {cut} hit max tokens")]


class HumanEvalTask(Task):
    """HumanEval pass@1, greedy; protocol "instruct" (chat, Qwen2.5-Coder's EvalPlus prompt) or "base"."""

    batchable = True

    def __init__(self, protocol: str = "instruct", limit: int | None = None, max_tokens: int = 2048,
                 timeout: float = 10.0) -> None:
        if protocol not in ("instruct", "base"):
            raise ValueError(f"--protocol must be instruct or base, got {protocol!r}")
        self.protocol = protocol
        self.name = f"humaneval-{protocol}"
        self.limit = limit
        self.max_tokens = max_tokens
        self.limits = SandboxLimits(timeout=timeout)

    def settings(self) -> dict[str, Any]:
        return {"protocol": self.protocol, "max_tokens": self.max_tokens, "timeout": self.limits.timeout}

    def samples(self) -> list[dict[str, Any]]:
        from qwen25.eval.data import load_humaneval

        problems = load_humaneval()[: self.limit]
        return [dict(id=p["task_id"], problem=p) for p in problems]

    def prompt_text(self, problem: dict[str, Any], chat_template: str | None) -> str:
        if self.protocol == "base":
            return problem["prompt"]
        messages = instruct_messages(problem)
        if chat_template:
            from qwen25.chat import render_chat

            return render_chat(chat_template, messages) + RESPONSE_PREFIX
        return render_chatml(messages) + RESPONSE_PREFIX

    def evaluate(self, backend: Any, batch: list[dict[str, Any]]) -> list[Record]:
        tok = backend.tokenizer
        prompts = [self.prompt_text(s["problem"], backend.chat_template) for s in batch]
        ids = [tok.encode(p) for p in prompts]
        stop = INSTRUCT_STOP if self.protocol == "instruct" else BASE_STOP
        gens = backend.generate(ids, self.max_tokens, stop, _stop_ids(tok, ["<|im_end|>", "<|endoftext|>"]))
        solutions = [solution_from_completion(s["problem"], g.text, self.protocol) for s, g in zip(batch, gens)]
        results = run_many([test_program(s["problem"], sol) for s, sol in zip(batch, solutions)], self.limits)
        records = []
        for sample, prompt, prompt_ids, gen, solution, result in zip(batch, prompts, ids, gens, solutions, results):
            records.append(dict(
                id=sample["id"], prompt=prompt, prompt_tokens=len(prompt_ids), completion=gen.text,
                solution=solution, passed=result.ok, failure=failure_reason(result),
                finish_reason=gen.finish_reason, gen_tokens=len(gen.token_ids), gen_seconds=round(gen.seconds, 3),
                batch_size=gen.batch_size, exec_seconds=round(result.seconds, 3)))
        return records

    def summarize(self, records: list[Record]) -> dict[str, Any]:
        passed = sum(1 for r in records if r["passed"])
        return {"pass@1": passed / len(records) if records else None, "passed": passed, "n": len(records),
                "rows": [("pass@1", percent(passed, len(records)))] + _generation_rows(records)}

    def progress_postfix(self, records: list[Record]) -> str:
        return f"pass@1={sum(r['passed'] for r in records) / max(len(records), 1):.3f}"


class HumanEvalFimTask(Task):
    """HumanEval-FIM: single-line infilling of the canonical solutions; exact match and pass@1."""

    name = "humaneval-fim"
    batchable = True

    def __init__(self, lines: str = "all", limit: int | None = None, max_tokens: int = 128,
                 timeout: float = 10.0) -> None:
        if lines not in ("all", "middle"):
            raise ValueError(f"--fim-lines must be all or middle, got {lines!r}")
        self.lines = lines
        self.limit = limit
        self.max_tokens = max_tokens
        self.limits = SandboxLimits(timeout=timeout)

    def settings(self) -> dict[str, Any]:
        return {"fim_lines": self.lines, "max_tokens": self.max_tokens, "timeout": self.limits.timeout}

    def samples(self) -> list[dict[str, Any]]:
        from qwen25.eval.data import load_humaneval

        out = []
        for p in load_humaneval()[: self.limit]:
            for split in fim_splits(p, self.lines):
                out.append(dict(id=f"{p['task_id']}:L{split['line']}", problem=p, **split))
        return out

    def evaluate(self, backend: Any, batch: list[dict[str, Any]]) -> list[Record]:
        tok = backend.tokenizer
        prompts = [fim_prompt(s["prefix"], s["suffix"]) for s in batch]
        ids = [tok.encode(p) for p in prompts]
        gens = backend.generate(ids, self.max_tokens, [], _stop_ids(tok, FIM_STOP_TOKENS))
        lines = [first_line(g.text) for g in gens]
        programs = [fim_program(s["prefix"], g.text, s["suffix"]) for s, g in zip(batch, gens)]
        programs += [fim_program(s["prefix"], line, s["suffix"]) for s, line in zip(batch, lines)]
        results = run_many([test_program(s["problem"], p) for s, p in zip(batch + batch, programs)], self.limits)
        records = []
        for k, (s, prompt, prompt_ids, gen) in enumerate(zip(batch, prompts, ids, gens)):
            result, line_result = results[k], results[len(batch) + k]
            records.append(dict(
                id=s["id"], prompt=prompt, prompt_tokens=len(prompt_ids), completion=gen.text,
                reference=s["middle"], exact_match=fim_exact_match(gen.text, s["middle"]), passed=result.ok,
                failure=failure_reason(result), first_line=lines[k],
                exact_match_first_line=fim_exact_match(lines[k], s["middle"]), passed_first_line=line_result.ok,
                finish_reason=gen.finish_reason, gen_tokens=len(gen.token_ids),
                gen_seconds=round(gen.seconds, 3), batch_size=gen.batch_size,
                exec_seconds=round(result.seconds, 3)))
        return records

    def summarize(self, records: list[Record]) -> dict[str, Any]:
        n = len(records)
        em = sum(1 for r in records if r["exact_match"])
        passed = sum(1 for r in records if r["passed"])
        em1 = sum(1 for r in records if r.get("exact_match_first_line"))
        passed1 = sum(1 for r in records if r.get("passed_first_line"))
        return {"exact_match": em / n if n else None, "pass@1": passed / n if n else None,
                "exact_match_first_line": em1 / n if n else None, "pass@1_first_line": passed1 / n if n else None,
                "n": n,
                "rows": [("exact match", percent(em, n)), ("pass@1", percent(passed, n)),
                         ("exact match, 1st line", percent(em1, n)), ("pass@1, 1st line", percent(passed1, n))]
                + _generation_rows(records)}

    def progress_postfix(self, records: list[Record]) -> str:
        n = max(len(records), 1)
        return f"EM={sum(r['exact_match'] for r in records) / n:.3f} pass={sum(r['passed'] for r in records) / n:.3f}"
