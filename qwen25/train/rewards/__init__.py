"""Reward functions for RL and for judging samples into preference pairs (GRPO, DPO data, evaluation).

    base.py          the `Reward` protocol, `score_rewards` (weighted totals, per-reward columns, failures
                     counted: a reward that raises or times out scores 0 and never stops the run)
    answer.py        MathAnswerReward: final number / `#### N` / \\boxed{} equal to the example's answer
    code.py          CodeTestReward: the completion's program against the example's unit tests in the sandbox
    schema.py        JsonSchemaReward: JSON in the completion satisfies a JSON Schema (own small validator)
    regex.py         FormatReward: a regular expression (presets: boxed, gsm, think, code-block)
    reward_model.py  RewardModelReward: a trained scalar reward model (`qwen25 train rm`) scores the text

`build_rewards(["math", "format:boxed=0.2"])` turns command-line specs into rewards and weights.
"""

from __future__ import annotations

from typing import Any

from qwen25.train.rewards.answer import MathAnswerReward, final_answer
from qwen25.train.rewards.base import Reward, RewardScores, score_rewards
from qwen25.train.rewards.code import CodeTestReward
from qwen25.train.rewards.regex import FORMAT_PRESETS, FormatReward
from qwen25.train.rewards.schema import JsonSchemaReward, validate

__all__ = ["FORMAT_PRESETS", "REWARD_SPECS", "CodeTestReward", "FormatReward", "JsonSchemaReward",
           "MathAnswerReward", "Reward", "RewardScores", "build_reward", "build_rewards", "final_answer",
           "score_rewards", "validate"]

REWARD_SPECS = """reward specs (NAME[:ARG][=WEIGHT], weight 1.0 by default):
  math            the final answer (\\boxed{}, '#### N', 'the answer is', last number) equals the example's answer
  code            the completion's ```python block passes the example's 'tests' in the sandbox
  json            JSON in the completion satisfies the example's 'schema'
  format:PRESET   a format check: boxed, gsm, think, code-block (or format:/REGEX/)
  rm:DIR          a reward model trained with `qwen25 train rm` scores prompt + completion"""


def build_reward(spec: str, *, policy_tokenizer: Any = None) -> tuple[Reward, float]:
    """One reward and its weight from a spec (see REWARD_SPECS); ValueError naming the spec when it is bad.
    policy_tokenizer: the policy's, so that a reward model of another tokenizer is refused."""
    body, weight = spec, 1.0
    head, sep, tail = spec.rpartition("=")
    if sep:
        try:
            weight, body = float(tail), head
        except ValueError:
            pass
    name, _, arg = body.partition(":")
    if name == "math" and not arg:
        return MathAnswerReward(), weight
    if name == "code" and not arg:
        return CodeTestReward(), weight
    if name == "json" and not arg:
        return JsonSchemaReward(), weight
    if name == "format" and arg:
        if len(arg) >= 2 and arg.startswith("/") and arg.endswith("/"):
            return FormatReward(arg[1:-1]), weight
        return FormatReward.preset(arg), weight
    if name == "rm" and arg:
        from qwen25.train.rewards.reward_model import RewardModelReward

        return RewardModelReward.load(arg, policy_tokenizer=policy_tokenizer), weight
    raise ValueError(f"reward spec {spec!r} is not one of:\n{REWARD_SPECS}")


def build_rewards(specs: list[str], *, policy_tokenizer: Any = None) -> tuple[list[Reward], list[float]]:
    """Rewards and weights from several specs; ValueError for an empty list or a duplicate name."""
    if not specs:
        raise ValueError(f"no reward given; {REWARD_SPECS}")
    built = [build_reward(s, policy_tokenizer=policy_tokenizer) for s in specs]
    rewards, weights = [r for r, _ in built], [w for _, w in built]
    names = [r.name for r in rewards]
    if len(set(names)) != len(names):
        raise ValueError(f"two rewards share a name ({names}); give each format check once")
    return rewards, weights
