"""Competition math on CHAMP: chain-of-thought with `\\boxed{}` answers, or program-of-thought.

Data: the 270 CHAMP problems (champ-dataset 1.0.0): number theory, inequalities, polynomials, sequences,
combinatorics. Gold answers are short free-form text ("239", "2^(n-1)", "No", "98 values",
"x=±1, ±2, ±1/2").

CoT (`--mode cot`, default): ChatML with the Qwen2.5-Math system prompt
"Please reason step by step, and put your final answer within \\boxed{}." and the problem as the user turn;
greedy. The answer is the content of the last `\\boxed{...}` (braces balanced); without one, the text after
"the answer is", else the last number in the reply (Qwen2.5-Math's evaluation does the same fallbacks).

PoT (`--mode pot`): the system prompt asks for a Python program that prints the final answer; the last
```python block of the reply runs in the sandbox (installed packages such as sympy are importable); the last
non-empty line it prints is the answer. A program that fails or prints nothing scores 0.

Matching (`answers_match`) after normalising both sides (LaTeX wrappers such as $, \\text{}, \\left/\\right and
spacing removed; \\frac{a}{b} -> (a)/(b), \\sqrt{x} -> sqrt(x), \\cdot/\\times -> *, {} -> (), \\le -> <=, unicode
minus -> -, lower case, no spaces, no trailing period):
1. equal strings (gold alternatives "X, or equivalently Y" are each tried);
2. yes/no golds: the prediction's first word;
3. both numbers (integers, decimals, fractions a/b): equal within 1e-6 relative;
4. golds with a trailing word ("98 values", "n times"): the part before it;
5. a leading "x=" on either side is ignored;
6. both simple expressions (digits, single-letter variables, + - * / ^ ( ) and sqrt/log/exp/pi/trig): sympy
   decides equivalence (2 s limit).
Free-form golds (a set of conditions, a sentence) can only match through 1-5, so the score is a lower bound.
"""

from __future__ import annotations

import re
import signal
import threading
from fractions import Fraction
from typing import Any

from qwen25.eval.results import Record, percent
from qwen25.eval.runner import Task
from qwen25.eval.sandbox import SandboxLimits, run_python

COT_SYSTEM = "Please reason step by step, and put your final answer within \\boxed{}."
POT_SYSTEM = ("Solve the problem by writing a Python program. Put the whole program in one ```python code "
              "block; it must print only the final answer.")


# --- answer extraction ---------------------------------------------------------------------------------------
def last_boxed(text: str) -> str | None:
    """The content of the last \\boxed{...} (or \\fbox{...}), braces balanced; `\\boxed 5` also works."""
    at = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if at < 0:
        return None
    rest = text[at:]
    rest = rest[len("\\boxed"):] if rest.startswith("\\boxed") else rest[len("\\fbox"):]
    if rest.startswith(" ") and not rest.lstrip().startswith("{"):
        match = re.match(r"\s*([^\s$]+)", rest)
        return match.group(1) if match else None
    start = rest.find("{")
    if start < 0:
        return None
    depth = 0
    for i in range(start, len(rest)):
        if rest[i] == "{":
            depth += 1
        elif rest[i] == "}":
            depth -= 1
            if depth == 0:
                return rest[start + 1: i]
    return None


_NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?(?:/\d+)?")


def extract_answer(text: str) -> tuple[str | None, str]:
    """(answer, how): "boxed", "answer-is", "last-number" or "none"."""
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed.strip(), "boxed"
    match = re.search(r"[Tt]he (?:final )?answer is[:\s]*(.+)", text)
    if match:
        return match.group(1).strip().rstrip("."), "answer-is"
    numbers = _NUMBER.findall(text)
    if numbers:
        return numbers[-1], "last-number"
    return None, "none"


# --- normalisation and matching ------------------------------------------------------------------------------
def _replace_command_arg(s: str, command: str, fmt: str) -> str:
    """Rewrite `\\command{arg}` as fmt.format(arg) (balanced braces), innermost first."""
    token = "\\" + command
    while True:
        at = s.find(token + "{")
        if at < 0:
            return s
        start = at + len(token)
        depth, end = 0, -1
        for i in range(start, len(s)):
            depth += s[i] == "{"
            depth -= s[i] == "}"
            if depth == 0:
                end = i
                break
        if end < 0:
            return s
        s = s[:at] + fmt.format(s[start + 1: end]) + s[end + 1:]


def _replace_frac(s: str) -> str:
    s = re.sub(r"\\[dt]?frac(\d)(\d)", r"(\1)/(\2)", s)
    while True:
        match = re.search(r"\\[dt]?frac\{", s)
        if not match:
            return s
        args, pos = [], match.end() - 1
        for _ in range(2):
            if pos >= len(s) or s[pos] != "{":
                return s
            depth = 0
            for i in range(pos, len(s)):
                depth += s[i] == "{"
                depth -= s[i] == "}"
                if depth == 0:
                    args.append(s[pos + 1: i])
                    pos = i + 1
                    break
            else:
                return s
        s = s[: match.start()] + f"({args[0]})/({args[1]})" + s[pos:]


def normalize_answer(text: str) -> str:
    s = text.strip()
    for wrapper in ("\\(", "\\)", "\\[", "\\]", "$"):
        s = s.replace(wrapper, "")
    for command in ("text", "textbf", "mathrm", "mathbf", "mbox", "operatorname", "boxed"):
        s = _replace_command_arg(s, command, "{}")
    s = _replace_frac(s)
    s = _replace_command_arg(s, "sqrt", "sqrt({})")
    s = re.sub(r"\\sqrt(\d+|[a-zA-Z])", r"sqrt(\1)", s)
    for old, new in (("\\left", ""), ("\\right", ""), ("\\!", ""), ("\\,", ""), ("\\;", ""), ("\\:", ""),
                     ("\\ ", ""), ("\\cdot", "*"), ("\\times", "*"), ("\\pm", "±"), ("\\mp", "∓"),
                     ("\\leq", "<="), ("\\geq", ">="), ("\\le", "<="), ("\\ge", ">="), ("\\neq", "!="),
                     ("≤", "<="), ("≥", ">="), ("≠", "!="), ("\\infty", "inf"), ("∞", "inf"), ("\\pi", "pi"),
                     ("π", "pi"), ("−", "-"), ("–", "-"), ("·", "*"), ("×", "*"), ("\\%", ""), ("%", ""),
                     ("^\\circ", ""), ("°", "")):
        s = s.replace(old, new)
    s = s.replace("{", "(").replace("}", ")")
    s = re.sub(r"\s+", "", s).lower().rstrip(".")
    if re.fullmatch(r"-?\d{1,3}(,\d{3})+", s):  # thousands separators
        s = s.replace(",", "")
    return s


def _as_number(s: str) -> Fraction | None:
    s = s.strip("()")
    try:
        if re.fullmatch(r"-?\d+(\.\d+)?", s):
            return Fraction(s)
        match = re.fullmatch(r"\(?(-?\d+)\)?/\(?(\d+)\)?", s)
        if match and int(match.group(2)) != 0:
            return Fraction(int(match.group(1)), int(match.group(2)))
    except (ValueError, ZeroDivisionError):
        pass
    return None


_FUNCS = {"sqrt", "log", "ln", "exp", "pi", "sin", "cos", "tan"}
_SAFE_EXPR = re.compile(r"[0-9a-z+\-*/^().! ]+")


def _safe_expression(s: str) -> bool:
    return bool(_SAFE_EXPR.fullmatch(s)) and all(len(w) == 1 or w in _FUNCS for w in re.findall(r"[a-z]+", s))


def _explicit_products(s: str) -> str:
    s = re.sub(r"(?<=[0-9a-z)])(?<!sqrt)(?<!log)(?<!ln)(?<!exp)(?<!sin)(?<!cos)(?<!tan)\(", "*(", s)
    s = re.sub(r"\)(?=[0-9a-z])", ")*", s)
    s = re.sub(r"(?<=\d)(?=[a-z])", "*", s)
    return s


class _Timeout(Exception):
    pass


def _sympy_equal(a: str, b: str, seconds: int = 2) -> bool:
    if not (_safe_expression(a) and _safe_expression(b)):
        return False
    try:
        import sympy
        from sympy.parsing.sympy_parser import convert_xor, parse_expr, standard_transformations
    except ImportError:
        return False
    use_alarm = threading.current_thread() is threading.main_thread() and hasattr(signal, "SIGALRM")

    def on_alarm(signum: int, frame: Any) -> None:
        raise _Timeout

    old = signal.signal(signal.SIGALRM, on_alarm) if use_alarm else None
    if use_alarm:
        signal.alarm(seconds)
    try:
        transformations = standard_transformations + (convert_xor,)
        names = {"ln": sympy.log, "e": sympy.E}
        x = parse_expr(_explicit_products(a), local_dict=dict(names), transformations=transformations)
        y = parse_expr(_explicit_products(b), local_dict=dict(names), transformations=transformations)
        return bool(sympy.simplify(x - y) == 0)
    except (_Timeout, Exception):  # noqa: BLE001 - any parse/simplify failure means "not shown equal"
        return False
    finally:
        if use_alarm:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, old)


def _strip_variable(s: str) -> str:
    match = re.fullmatch(r"[a-z](?:\([a-z]\))?=(.+)", s)
    return match.group(1) if match else s


def answers_match(prediction: str | None, gold: str) -> tuple[bool, str]:
    """(match, which rule matched: exact/yes-no/numeric/core/variable/sympy, or "" when none did)."""
    if prediction is None:
        return False, ""
    pred = normalize_answer(prediction)
    alternatives = [g for g in re.split(r",?\s*or equivalently\s*", gold) if g.strip()] or [gold]
    for alt in alternatives:
        g = normalize_answer(alt)
        if pred == g:
            return True, "exact"
        if g in ("yes", "no"):
            word = re.match(r"[a-z]+", pred)
            if word and word.group(0) == g:
                return True, "yes-no"
            continue
        pn, gn = _as_number(pred), _as_number(g)
        if pn is not None and gn is not None:
            if abs(pn - gn) <= 1e-6 * max(1, abs(gn)):
                return True, "numeric"
            continue
        core = re.fullmatch(r"(\S+)\s+[A-Za-z][A-Za-z ]*", alt.strip())
        if core:
            c = normalize_answer(core.group(1))
            if pred == c or (_as_number(pred) is not None and _as_number(pred) == _as_number(c)):
                return True, "core"
        if _strip_variable(pred) == _strip_variable(g):
            return True, "variable"
        if _sympy_equal(_strip_variable(pred), _strip_variable(g)):
            return True, "sympy"
    return False, ""


# --- program of thought ---------------------------------------------------------------------------------------
def extract_program(text: str) -> str | None:
    """The last ```python block; else the last unlabelled block that parses as Python (not an output block)."""
    import ast

    from qwen25.eval.sanitize import PYTHON_LANGS, code_blocks

    blocks = code_blocks(text)
    python = [body for lang, body in blocks if lang in PYTHON_LANGS]
    if python:
        return python[-1]
    for lang, body in reversed(blocks):
        if lang == "":
            try:
                tree = ast.parse(body)
            except SyntaxError:
                continue
            if any(not isinstance(node, ast.Expr) for node in tree.body):  # more than a bare value
                return body
    return None


def last_output_line(stdout: str) -> str | None:
    lines = [ln.strip() for ln in stdout.splitlines() if ln.strip()]
    return lines[-1] if lines else None


# --- task --------------------------------------------------------------------------------------------------
class MathTask(Task):
    batchable = True

    def __init__(self, mode: str = "cot", limit: int | None = None, max_tokens: int | None = None,
                 timeout: float = 10.0) -> None:
        if mode not in ("cot", "pot"):
            raise ValueError(f"--mode must be cot or pot, got {mode!r}")
        self.mode = mode
        self.name = f"math-champ-{mode}"
        self.limit = limit
        self.max_tokens = max_tokens or (2048 if mode == "cot" else 1024)
        self.limits = SandboxLimits(timeout=timeout, site_packages=True)

    def settings(self) -> dict[str, Any]:
        return {"mode": self.mode, "max_tokens": self.max_tokens, "dataset": "champ-1.0.0"}

    def samples(self) -> list[dict[str, Any]]:
        from qwen25.eval.data import load_champ

        return [dict(id=p["id"], problem=p) for p in load_champ()[: self.limit]]

    def messages(self, problem: dict[str, Any]) -> list[dict[str, str]]:
        return [{"role": "system", "content": COT_SYSTEM if self.mode == "cot" else POT_SYSTEM},
                {"role": "user", "content": problem["problem"]}]

    def evaluate(self, backend: Any, batch: list[dict[str, Any]]) -> list[Record]:
        from qwen25.chat import render_chat

        tok = backend.tokenizer
        prompts = [render_chat(backend.chat_template, self.messages(s["problem"])) for s in batch]
        ids = [tok.encode(p) for p in prompts]
        stop_ids = [i for i in (tok.token_to_id("<|im_end|>"), tok.token_to_id("<|endoftext|>")) if i is not None]
        gens = backend.generate(ids, self.max_tokens, [], stop_ids)
        records = []
        for s, prompt, prompt_ids, gen in zip(batch, prompts, ids, gens):
            gold = s["problem"]["answer"]
            record: Record = dict(id=s["id"], category=s["problem"]["category"], prompt=prompt,
                                  prompt_tokens=len(prompt_ids), completion=gen.text, gold=gold)
            if self.mode == "cot":
                answer, how = extract_answer(gen.text)
            else:
                program = extract_program(gen.text)
                result = run_python(program, self.limits) if program else None
                answer = last_output_line(result.stdout) if result is not None and result.ok else None
                how = "program-output" if answer is not None else ("no-program" if program is None else
                                                                   f"program-{result.status}")  # type: ignore[union-attr]
                record.update(program=program, program_stdout=result.stdout[-2000:] if result else None,
                              exec_seconds=round(result.seconds, 3) if result else None)
            correct, rule = answers_match(answer, gold)
            record.update(answer=answer, extracted_by=how, correct=correct, match_rule=rule,
                          finish_reason=gen.finish_reason, gen_tokens=len(gen.token_ids),
                          gen_seconds=round(gen.seconds, 3), batch_size=gen.batch_size)
            records.append(record)
        return records

    def summarize(self, records: list[Record]) -> dict[str, Any]:
        n = len(records)
        correct = sum(1 for r in records if r["correct"])
        extracted = sum(1 for r in records if r["answer"] is not None)
        tokens = sum(r["gen_tokens"] for r in records)
        seconds = sum(r["gen_seconds"] / max(r.get("batch_size", 1), 1) for r in records)
        cut = sum(1 for r in records if r["finish_reason"] == "length")
        rows = [("accuracy", percent(correct, n)), ("answer extracted", percent(extracted, n)),
                ("generated", f"{tokens:,} tokens in {seconds:.1f} s"
                 + (f" ({tokens / seconds:.1f} tok/s)" if seconds else "") + f"; {cut} hit max tokens")]
        return {"accuracy": correct / n if n else None, "n": n, "rows": rows}

    def progress_postfix(self, records: list[Record]) -> str:
        return f"acc={sum(r['correct'] for r in records) / max(len(records), 1):.3f}"
