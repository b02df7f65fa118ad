"""The reward-function interface and `score_rewards`, which runs several of them over a batch without ever failing.

A reward is any object with a `name: str` and `__call__(prompts, completions, examples) -> list[float]`: one
score per completion, where `prompts[i]` is the text the policy saw, `completions[i]` its generated text and
`examples[i]` the task record the prompt came from (a dict: the verifiable answer, unit tests, a schema...).

`score_rewards` calls each reward once on the whole batch and combines the columns: total[i] = sum over rewards
of weight * score[i]. A reward that raises is retried one sample at a time, so only the samples it fails on
score 0; a call that runs past `timeout_s` (in a daemon thread: Python cannot kill a thread, so it is left to
finish in the background) scores 0 for every sample of that call, as does a call returning the wrong number
of scores; a non-finite score is a failure of that sample. Each failed sample is counted per reward in `RewardScores.failures`; nothing is raised.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

__all__ = ["Reward", "RewardScores", "score_rewards"]


@runtime_checkable
class Reward(Protocol):
    name: str

    def __call__(self, prompts: list[str], completions: list[str], examples: list[dict]) -> list[float]: ...


@dataclass
class RewardScores:
    """Scores of one batch: `totals[i]` (weighted sum), `columns[name][i]` (each reward's raw score, 0 where it
    failed), `failures[name]` (samples that reward failed on), `errors[name]` (its last error message) and
    `seconds[name]` (wall time of its calls)."""

    totals: list[float]
    columns: dict[str, list[float]]
    failures: dict[str, int] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def num_failures(self) -> int:
        return sum(self.failures.values())

    def metrics(self) -> dict[str, float]:
        """Flat numbers for a metrics record: mean of each column, failures per reward, scoring seconds."""
        out: dict[str, float] = {}
        for name, column in self.columns.items():
            out[f"reward/{name}"] = sum(column) / len(column) if column else 0.0
            out[f"reward_failures/{name}"] = float(self.failures.get(name, 0))
        out["reward_seconds"] = sum(self.seconds.values())
        return out


class _Outcome:
    def __init__(self) -> None:
        self.value: Any = None
        self.error: BaseException | None = None
        self.done = threading.Event()


class _WrongLength(ValueError):
    pass


def _call_with_timeout(reward: Reward, prompts: list[str], completions: list[str], examples: list[dict],
                       timeout_s: float | None) -> list[float]:
    """reward(...) checked for length and finiteness; TimeoutError when it runs past timeout_s."""
    if timeout_s is None:
        values = reward(prompts, completions, examples)
    else:
        outcome = _Outcome()

        def run() -> None:
            try:
                outcome.value = reward(prompts, completions, examples)
            except BaseException as e:  # noqa: BLE001 - reported to the caller, never raised in the thread
                outcome.error = e
            finally:
                outcome.done.set()

        threading.Thread(target=run, name=f"reward-{getattr(reward, 'name', '?')}", daemon=True).start()
        if not outcome.done.wait(timeout_s):
            raise TimeoutError(f"took longer than {timeout_s:g} s")
        if outcome.error is not None:
            raise outcome.error
        values = outcome.value
    values = [float(v) for v in values]
    if len(values) != len(completions):
        raise _WrongLength(f"returned {len(values)} scores for {len(completions)} completions")
    return values


def _score_one_reward(reward: Reward, prompts: list[str], completions: list[str], examples: list[dict],
                      timeout_s: float | None) -> tuple[list[float], int, str]:
    """(scores, failed samples, last error) for one reward over the batch."""
    try:
        values = _call_with_timeout(reward, prompts, completions, examples, timeout_s)
        bad = [i for i, v in enumerate(values) if not math.isfinite(v)]
        error = f"non-finite score ({values[bad[0]]}) for sample {bad[0]}" if bad else ""
        return [v if math.isfinite(v) else 0.0 for v in values], len(bad), error
    except TimeoutError as e:
        return [0.0] * len(completions), len(completions), f"timeout: {e}"
    except _WrongLength as e:  # the call as a whole is broken: retrying one sample at a time proves nothing
        return [0.0] * len(completions), len(completions), f"{e}"
    except Exception as e:  # noqa: BLE001 - a reward must never stop training
        first_error = f"{type(e).__name__}: {e}"
    if len(completions) == 1:
        return [0.0], 1, first_error
    scores, failed, error = [], 0, first_error
    for i in range(len(completions)):  # find the samples it fails on; the others keep their scores
        try:
            value = _call_with_timeout(reward, prompts[i:i + 1], completions[i:i + 1], examples[i:i + 1],
                                       timeout_s)[0]
            if not math.isfinite(value):
                raise ValueError(f"non-finite score ({value})")
            scores.append(value)
        except TimeoutError as e:  # one hung retry: the rest of the batch scores 0 rather than wait in turn
            rest = len(completions) - i
            return scores + [0.0] * rest, failed + rest, f"timeout: {e}"
        except Exception as e:  # noqa: BLE001
            scores.append(0.0)
            failed += 1
            error = f"{type(e).__name__}: {e}"
    return scores, failed, error


def score_rewards(rewards: Sequence[Reward], weights: Sequence[float] | None, prompts: Sequence[str],
                  completions: Sequence[str], examples: Sequence[dict] | None = None,
                  timeout_s: float | None = 60.0) -> RewardScores:
    """Score a batch with every reward and combine them (see the module docstring). weights: one per reward
    (default all 1.0); examples default to empty dicts. ValueError only for inconsistent arguments."""
    prompts, completions = list(prompts), list(completions)
    examples = [{} for _ in completions] if examples is None else list(examples)
    if not (len(prompts) == len(completions) == len(examples)):
        raise ValueError(f"score_rewards: {len(prompts)} prompts, {len(completions)} completions and "
                         f"{len(examples)} examples; they must be parallel lists")
    weights = [1.0] * len(rewards) if weights is None else [float(w) for w in weights]
    if len(weights) != len(rewards):
        raise ValueError(f"score_rewards: {len(weights)} weights for {len(rewards)} rewards")
    names = [r.name for r in rewards]
    if len(set(names)) != len(names):
        raise ValueError(f"score_rewards: reward names must be unique, got {names}")
    if timeout_s is not None and timeout_s <= 0:
        raise ValueError(f"score_rewards: timeout_s must be > 0, got {timeout_s}")
    result = RewardScores([0.0] * len(completions), {})
    for reward, weight in zip(rewards, weights, strict=True):
        start = time.perf_counter()
        scores, failed, error = _score_one_reward(reward, prompts, completions, examples, timeout_s)
        result.seconds[reward.name] = time.perf_counter() - start
        result.columns[reward.name] = scores
        result.failures[reward.name] = failed
        if error:
            result.errors[reward.name] = error[:500]
        result.totals = [t + weight * s for t, s in zip(result.totals, scores, strict=True)]
    return result
