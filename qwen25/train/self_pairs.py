"""DPO pairs from a model's own samples judged by a verifier (the Qwen2.5 report's execution-feedback recipe).

For each task record (`qwen25.data.rl_tasks` format: "messages" and the verifiable "answer"/"tests"), the model
samples `n` completions; a reward (`qwen25.train.rewards`, e.g. the math verifier) scores them. A prompt with at
least one completion scoring >= `threshold` and at least one below it gives up to `max_pairs` pairs, each with its
own chosen and its own rejected completion: the passing completions in the order `chosen` names ("shortest": a
terse correct answer first; "random": drawn with a fixed seed, so the pairs do not teach length along with
correctness) against failing ones drawn with the same seed, as assistant turns of the record's messages, ready
for `qwen25 train dpo`. Prompts whose samples all pass or all fail give no pair (nothing to prefer) and are
counted; so are completions cut by the length limit, which never serve as the chosen side (an unfinished answer
is no example to follow).

`judge_samples(...)` is the pure part (tested on fixed samples); `sample_pairs(llm, ...)` runs the model and
also returns the pass rate of its samples, which is the task accuracy under those sampling settings.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence
from typing import Any

from qwen25.train.rewards import Reward, score_rewards

__all__ = ["judge_samples", "sample_pairs", "task_accuracy"]


CHOSEN_ORDERS = ("shortest", "random")


def judge_samples(record: dict[str, Any], completions: Sequence[str], scores: Sequence[float],
                  truncated: Sequence[bool], rng: random.Random, threshold: float = 1.0, chosen: str = "shortest",
                  max_pairs: int = 1) -> list[dict[str, Any]]:
    """Pairs from one prompt's scored samples (see the module docstring); empty when there is nothing to prefer."""
    if not (len(completions) == len(scores) == len(truncated)):
        raise ValueError("completions, scores and truncated must be the same length")
    if chosen not in CHOSEN_ORDERS:
        raise ValueError(f"chosen must be one of {CHOSEN_ORDERS}, not {chosen!r}")
    if max_pairs < 1:
        raise ValueError(f"max_pairs must be >= 1, not {max_pairs}")
    passing = [i for i, s in enumerate(scores) if s >= threshold and not truncated[i] and completions[i].strip()]
    failing = [i for i, s in enumerate(scores) if s < threshold and completions[i].strip()]
    if not passing or not failing:
        return []
    if chosen == "shortest":
        passing.sort(key=lambda i: (len(completions[i]), i))
    else:
        rng.shuffle(passing)
    rejected = rng.sample(failing, min(len(failing), len(passing), max_pairs))
    return [{"id": record.get("id"), "prompt": record["messages"],
             "chosen": [{"role": "assistant", "content": completions[c]}],
             "rejected": [{"role": "assistant", "content": completions[r]}]}
            for c, r in zip(passing, rejected)]


def sample_pairs(llm: Any, records: Sequence[dict[str, Any]], reward: Reward, sampling: Any, seed: int = 0,
                 threshold: float = 1.0, batch: int = 8, chosen: str = "shortest",
                 max_pairs: int = 1) -> tuple[list[dict[str, Any]], Counter]:
    """(pairs, counters: prompts, samples, passed, truncated, all_pass, all_fail, pairs, prompts_paired,
    reward_failures) from
    `llm.chat` samples (sampling.n per prompt) of each record's messages."""
    from tqdm import tqdm

    rng = random.Random(seed)
    stats: Counter = Counter()
    pairs = []
    bar = tqdm(total=len(records), desc="sampling", unit="prompt", dynamic_ncols=True)
    for start in range(0, len(records), batch):
        chunk = list(records[start:start + batch])
        outputs = llm.chat([r["messages"] for r in chunk], sampling)
        for record, out in zip(chunk, outputs, strict=True):
            texts = [c.text for c in out.outputs]
            cut = [c.finish_reason == "length" for c in out.outputs]
            prompt = record["messages"][-1]["content"]
            scored = score_rewards([reward], [1.0], [prompt] * len(texts), texts, [record] * len(texts))
            stats["prompts"] += 1
            stats["samples"] += len(texts)
            stats["passed"] += sum(s >= threshold for s in scored.totals)
            stats["truncated"] += sum(cut)
            stats["reward_failures"] += scored.num_failures
            judged = judge_samples(record, texts, scored.totals, cut, rng, threshold, chosen, max_pairs)
            if judged:
                pairs.extend(judged)
                stats["pairs"] += len(judged)
                stats["prompts_paired"] += 1
            elif all(s >= threshold for s in scored.totals):
                stats["all_pass"] += 1
            else:
                stats["all_fail"] += 1
            bar.update(1)
    bar.close()
    return pairs, stats


def task_accuracy(llm: Any, records: Sequence[dict[str, Any]], reward: Reward, sampling: Any,
                  batch: int = 8) -> tuple[float, Counter]:
    """Mean reward of one completion per record (greedy when sampling.temperature is 0) and counters."""
    _, stats = sample_pairs(llm, records, reward, sampling, batch=batch)
    return stats["passed"] / max(stats["samples"], 1), stats
