"""Verifiable arithmetic tasks: short integer expressions with exact answers, as fixed-seed train / held-out jsonl.

A task is one expression of 1..`max_ops` binary operations (`+`, `-`, `*`) on integers in [2, `max_operand`],
with at most `max_mul` multiplications, evaluated with the usual precedence (products first, then sums left to
right). The prompt asks for the value with the final answer in \\boxed{}; `answer` is the exact integer, checked by
`qwen25.train.rewards.MathAnswerReward`. The answers are short (a line of working and a number), so a GRPO step
on them costs a fraction of a GSM8K step, and Qwen2.5-Coder-0.5B-Instruct's direct answers to them are often
wrong (14 + 64 -> 108) while one written line of working gets them right: room for RL to move the policy.

`build_arith_splits(n_train, n_heldout, seed)`: the held-out split is drawn first from `Random(f"{seed}:heldout")`,
then the train split from `Random(f"{seed}:train")`, skipping any expression already drawn (counted), so the files
are the same on every machine and no held-out expression is trained on.

Each record: {"id", "task": "arithmetic", "prompt", "messages": [{"role": "user", "content": prompt}], "answer",
"ops"}.
"""

from __future__ import annotations

import random
from collections import Counter
from typing import Any

__all__ = ["ARITH_INSTRUCTION", "arith_record", "build_arith_splits", "evaluate", "random_expression"]

ARITH_INSTRUCTION = "Put your final answer within \\boxed{}."


def evaluate(operands: list[int], ops: list[str]) -> int:
    """The value of operands[0] ops[0] operands[1] ... with * before + and -, sums left to right."""
    if len(operands) != len(ops) + 1:
        raise ValueError(f"{len(operands)} operands need {len(operands) - 1} operators, got {len(ops)}")
    terms, signs = [operands[0]], ["+"]
    for op, x in zip(ops, operands[1:]):
        if op == "*":
            terms[-1] *= x
        elif op in "+-":
            terms.append(x)
            signs.append(op)
        else:
            raise ValueError(f"unknown operator {op!r}")
    return sum(t if s == "+" else -t for t, s in zip(terms, signs))


def random_expression(rng: random.Random, max_ops: int, max_operand: int, max_mul: int) -> tuple[str, int, int]:
    """(expression text, its value, number of operations) drawn from rng."""
    if max_ops < 1 or max_operand < 2 or max_mul < 0:
        raise ValueError(f"need max_ops >= 1, max_operand >= 2, max_mul >= 0; got {max_ops}, {max_operand}, {max_mul}")
    n_ops = rng.randint(1, max_ops)
    while True:
        ops = [rng.choice("+-*") for _ in range(n_ops)]
        if ops.count("*") <= max_mul:
            break
    operands = [rng.randint(2, max_operand) for _ in range(n_ops + 1)]
    text = str(operands[0]) + "".join(f" {op} {x}" for op, x in zip(ops, operands[1:]))
    return text, evaluate(operands, ops), n_ops


def arith_record(expression: str, value: int, n_ops: int, split: str, index: int) -> dict[str, Any]:
    """One jsonl record (see the module docstring)."""
    prompt = f"Calculate {expression}. {ARITH_INSTRUCTION}"
    return {"id": f"arith-{split}-{index}", "task": "arithmetic", "prompt": prompt,
            "messages": [{"role": "user", "content": prompt}], "answer": str(value), "ops": n_ops}


def build_arith_splits(n_train: int, n_heldout: int, seed: int = 0, max_ops: int = 2, max_operand: int = 99,
                       max_mul: int = 1) -> tuple[list[dict], list[dict], Counter]:
    """(train records, held-out records, counters: generated, duplicates_dropped)."""
    if n_train < 0 or n_heldout < 0 or n_train + n_heldout == 0:
        raise ValueError(f"need n_train, n_heldout >= 0 and at least one example, got {n_train}, {n_heldout}")
    stats: Counter = Counter()
    seen: set[str] = set()
    splits: dict[str, list[dict]] = {}
    for split, n in (("heldout", n_heldout), ("train", n_train)):
        rng = random.Random(f"{seed}:{split}")
        records: list[dict] = []
        attempts = 0
        while len(records) < n:
            if attempts > 20 * n + 100:
                raise ValueError(f"could draw only {len(records)} of {n} distinct {split} expressions; ask for "
                                 "fewer or allow larger operands")
            attempts += 1
            text, value, n_ops = random_expression(rng, max_ops, max_operand, max_mul)
            if text in seen:
                stats["duplicates_dropped"] += 1
                continue
            seen.add(text)
            records.append(arith_record(text, value, n_ops, split, len(records)))
            stats["generated"] += 1
        splits[split] = records
    return splits["train"], splits["heldout"], stats
