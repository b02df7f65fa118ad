"""Arithmetic RL tasks: values equal Python's own evaluation, splits are fixed, disjoint and verifiable."""

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from qwen25.data.arith_tasks import build_arith_splits, evaluate, random_expression
from qwen25.train.rewards.answer import MathAnswerReward

ROOT = Path(__file__).resolve().parents[1]


def test_values_equal_pythons_precedence():
    rng = random.Random(7)
    for _ in range(2000):
        text, value, n_ops = random_expression(rng, max_ops=4, max_operand=99, max_mul=3)
        assert value == eval(text)  # noqa: S307 - the reference: Python's own operator precedence
        assert text.count(" ") == 2 * n_ops


def test_evaluate_rejects_bad_input():
    with pytest.raises(ValueError, match="operators"):
        evaluate([1, 2], [])
    with pytest.raises(ValueError, match="unknown operator"):
        evaluate([1, 2], ["/"])
    with pytest.raises(ValueError, match="max_ops"):
        random_expression(random.Random(0), 0, 99, 1)


def test_splits_are_fixed_disjoint_and_verifiable():
    train, heldout, stats = build_arith_splits(300, 50, seed=3)
    again, heldout_again, _ = build_arith_splits(300, 50, seed=3)
    assert train == again and heldout == heldout_again
    assert len(train) == 300 and len(heldout) == 50 and stats["generated"] == 350
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in heldout}
    assert all(1 <= r["ops"] <= 2 and r["prompt"].count("*") <= 1 for r in train + heldout)
    reward = MathAnswerReward()
    right = [f"... so \\boxed{{{r['answer']}}}" for r in heldout]
    wrong = [f"\\boxed{{{int(r['answer']) + 1}}}" for r in heldout]
    prompts = [r["prompt"] for r in heldout]
    assert reward(prompts, right, heldout) == [1.0] * 50
    assert reward(prompts, wrong, heldout) == [0.0] * 50
    with pytest.raises(ValueError, match="at least one"):
        build_arith_splits(0, 0)


def test_script_writes_arith_without_a_source(tmp_path):
    out = tmp_path / "rl"
    done = subprocess.run([sys.executable, str(ROOT / "scripts/make_rl_tasks.py"), "--output", str(out),
                           "--gsm-train", "0", "--gsm-heldout", "0", "--code-tasks", "0", "--arith-train", "40",
                           "--arith-heldout", "10"], capture_output=True, text=True, check=True)
    assert "arith: 40 train, 10 held-out" in done.stdout
    rows = [json.loads(line) for line in (out / "arith_heldout.jsonl").read_text().splitlines()]
    assert len(rows) == 10 and json.loads((out / "manifest.json").read_text())["arith"]["train"] == 40
    refused = subprocess.run([sys.executable, str(ROOT / "scripts/make_rl_tasks.py"), "--output", str(out)],
                             capture_output=True, text=True)
    assert refused.returncode == 1 and "reasoning-gym package file" in refused.stderr
