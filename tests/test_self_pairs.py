"""DPO pairs from a model's own samples (qwen25.train.self_pairs): the shortest finished correct sample is chosen,
a wrong one rejected, all-right / all-wrong prompts and truncated samples counted, with the real math verifier
scoring fixed completions and a stand-in for LLM.chat."""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest

from qwen25.train.rewards import MathAnswerReward
from qwen25.train.self_pairs import judge_samples, sample_pairs, task_accuracy

RECORD = {"id": "t0", "messages": [{"role": "user", "content": "What is 6*7? Put the answer in \\boxed{}."}],
          "answer": "42"}


def test_judge_samples_prefers_the_shortest_finished_right_answer():
    texts = ["So it is \\boxed{42}.", "6*7 = 42, hence \\boxed{42}", "\\boxed{42}", "\\boxed{41}", "I think 40"]
    scores = [1.0, 1.0, 1.0, 0.0, 0.0]
    [pair] = judge_samples(RECORD, texts, scores, [False, False, True, False, False], random.Random(0))
    assert pair["chosen"] == [{"role": "assistant", "content": "So it is \\boxed{42}."}]  # "\\boxed{42}" was cut
    assert pair["rejected"][0]["content"] in ("\\boxed{41}", "I think 40") and pair["prompt"] == RECORD["messages"]
    assert judge_samples(RECORD, texts[:3], scores[:3], [False] * 3, random.Random(0)) == []  # all right
    assert judge_samples(RECORD, texts[3:], scores[3:], [False] * 2, random.Random(0)) == []  # all wrong
    assert judge_samples(RECORD, ["\\boxed{42}", "x"], [1.0, 0.0], [True, False], random.Random(0)) == []
    with pytest.raises(ValueError, match="same length"):
        judge_samples(RECORD, texts, scores[:2], [False] * 5, random.Random(0))
    with pytest.raises(ValueError, match="chosen must be one of"):
        judge_samples(RECORD, texts, scores, [False] * 5, random.Random(0), chosen="longest")
    with pytest.raises(ValueError, match="max_pairs"):
        judge_samples(RECORD, texts, scores, [False] * 5, random.Random(0), max_pairs=0)


def test_judge_samples_pairs_distinct_samples_up_to_max_pairs():
    texts = ["So it is \\boxed{42}.", "6*7 = 42, hence \\boxed{42}", "\\boxed{42}", "\\boxed{41}", "I think 40",
             "\\boxed{4}"]
    scores = [1.0, 1.0, 1.0, 0.0, 0.0, 0.0]
    cut = [False] * 6
    pairs = judge_samples(RECORD, texts, scores, cut, random.Random(0), max_pairs=5)
    # three right samples against three wrong ones: three pairs, no sample twice, shortest right one first
    assert [p["chosen"][0]["content"] for p in pairs] == ["\\boxed{42}", "So it is \\boxed{42}.",
                                                          "6*7 = 42, hence \\boxed{42}"]
    assert sorted(p["rejected"][0]["content"] for p in pairs) == sorted(texts[3:])
    assert len(judge_samples(RECORD, texts, scores, cut, random.Random(0), max_pairs=2)) == 2
    drawn = [judge_samples(RECORD, texts, scores, cut, random.Random(seed), chosen="random", max_pairs=3)
             for seed in range(20)]
    assert all(sorted(p["chosen"][0]["content"] for p in d) == sorted(texts[:3]) for d in drawn)
    firsts = {d[0]["chosen"][0]["content"] for d in drawn}
    assert len(firsts) > 1  # random order, not always the shortest
    assert drawn[3] == judge_samples(RECORD, texts, scores, cut, random.Random(3), chosen="random", max_pairs=3)


@dataclass
class _Out:
    text: str
    finish_reason: str


@dataclass
class _Request:
    outputs: list


class _FakeLLM:
    """LLM.chat's shape: per conversation, `n` completions cycling through fixed texts."""

    def __init__(self, texts: dict[str, list[str]]) -> None:
        self.texts = texts

    def chat(self, conversations, sampling):
        return [_Request([_Out(t, "stop") for t in self.texts[c[-1]["content"]][:sampling.n]]) for c in conversations]


@dataclass
class _Sampling:
    n: int


def test_sample_pairs_with_the_math_verifier():
    records = [dict(RECORD, id=f"t{i}", messages=[{"role": "user", "content": f"q{i}"}], answer=str(i))
               for i in range(3)]
    llm = _FakeLLM({"q0": ["\\boxed{0}", "\\boxed{5}"], "q1": ["\\boxed{1}", "the answer is 1"],
                    "q2": ["\\boxed{7}", "no idea"]})
    pairs, stats = sample_pairs(llm, records, MathAnswerReward(), _Sampling(2), batch=2)
    assert [p["id"] for p in pairs] == ["t0"] and pairs[0]["chosen"][0]["content"] == "\\boxed{0}"
    assert stats["pairs"] == 1 and stats["prompts_paired"] == 1 and stats["all_pass"] == 1 and stats["all_fail"] == 1 and stats["passed"] == 3
    accuracy, _ = task_accuracy(llm, records, MathAnswerReward(), _Sampling(1))
    assert accuracy == pytest.approx(2 / 3)
