"""Reward functions: score_rewards never fails (raising, hanging, wrong-length and NaN rewards score 0 and are
counted), the math verifier against gold solutions, code against unit tests in the sandbox, the JSON Schema
validator against the jsonschema package, format presets, and reward specs."""

from __future__ import annotations

import math
import time

import pytest

from qwen25.train.rewards import (CodeTestReward, FormatReward, JsonSchemaReward, MathAnswerReward, build_rewards,
                                  final_answer, score_rewards, validate)


class Constant:
    def __init__(self, name: str, value: float) -> None:
        self.name, self.value = name, value

    def __call__(self, prompts, completions, examples):
        return [self.value] * len(completions)


class Raises:
    name = "raises"

    def __call__(self, prompts, completions, examples):
        if any("boom" in c for c in completions):
            raise RuntimeError("boom")
        return [1.0] * len(completions)


class Sleeps:
    name = "sleeps"

    def __call__(self, prompts, completions, examples):
        time.sleep(3)
        return [1.0] * len(completions)


class Bad:
    def __init__(self, name: str, values: list[float]) -> None:
        self.name, self.values = name, values

    def __call__(self, prompts, completions, examples):
        return self.values


def test_weighted_totals_and_columns():
    s = score_rewards([Constant("a", 1.0), Constant("b", 0.5)], [2.0, -1.0], ["p", "q"], ["x", "y"])
    assert s.totals == [1.5, 1.5]
    assert s.columns == {"a": [1.0, 1.0], "b": [0.5, 0.5]}
    assert s.num_failures == 0 and s.errors == {}
    assert s.metrics()["reward/a"] == 1.0


def test_a_raising_reward_scores_zero_only_where_it_fails_and_is_counted():
    s = score_rewards([Raises(), Constant("c", 1.0)], None, ["p"] * 3, ["ok", "boom", "fine"])
    assert s.columns["raises"] == [1.0, 0.0, 1.0]
    assert s.failures == {"raises": 1, "c": 0}
    assert "RuntimeError: boom" in s.errors["raises"]
    assert s.totals == [2.0, 1.0, 2.0]


def test_a_hanging_reward_times_out_without_stopping_the_others():
    start = time.perf_counter()
    s = score_rewards([Sleeps(), Constant("c", 1.0)], None, ["p"] * 2, ["a", "b"], timeout_s=0.3)
    assert time.perf_counter() - start < 2.0
    assert s.columns["sleeps"] == [0.0, 0.0] and s.failures["sleeps"] == 2
    assert s.errors["sleeps"].startswith("timeout")
    assert s.totals == [1.0, 1.0]


@pytest.mark.parametrize("values", [[1.0], [1.0, 2.0, 3.0]])
def test_a_wrong_number_of_scores_fails_the_call(values):
    s = score_rewards([Bad("bad", values)], None, ["p", "q"], ["a", "b"])
    assert s.failures["bad"] == 2 and s.totals == [0.0, 0.0]


def test_non_finite_scores_are_failures_of_their_samples():
    s = score_rewards([Bad("bad", [1.0, float("nan"), math.inf])], None, ["p"] * 3, ["a", "b", "c"])
    assert s.columns["bad"] == [1.0, 0.0, 0.0] and s.failures["bad"] == 2 and "non-finite" in s.errors["bad"]


def test_inconsistent_arguments_are_errors():
    with pytest.raises(ValueError, match="parallel"):
        score_rewards([Constant("a", 1.0)], None, ["p"], ["a", "b"])
    with pytest.raises(ValueError, match="weights"):
        score_rewards([Constant("a", 1.0)], [1.0, 2.0], ["p"], ["a"])
    with pytest.raises(ValueError, match="unique"):
        score_rewards([Constant("a", 1.0), Constant("a", 2.0)], None, ["p"], ["a"])


# --- math ----------------------------------------------------------------------------------------------------
GSM_SOLUTION = ("First find the warm time: 5 + 2 * 18 = 41 minutes\nThen the difference per km: 41 - 18 = 23\n"
                "Then multiply by 3: 23 * 3 = 69\n#### 69")


@pytest.mark.parametrize("completion, expected", [
    (GSM_SOLUTION, 1.0),  # the generator's own gold solution format
    ("... so the total is \\boxed{69}.", 1.0),
    ("The answer is 69 minutes.", 1.0),
    ("We get 12, then 69", 1.0),  # last number
    ("\\boxed{69.0}", 1.0),
    ("\\boxed{68}", 0.0),
    ("\\boxed{69} ... wait, \\boxed{70}", 0.0),  # the last box counts
    ("I don't know", 0.0),
])
def test_math_answer(completion, expected):
    assert MathAnswerReward()(["p"], [completion], [{"answer": "69"}]) == [expected]


def test_math_answer_normalises_numbers():
    r = MathAnswerReward()
    assert r(["p"] * 3, ["\\boxed{1,234}", "\\boxed{\\frac{1}{2}}", "#### 2.50"],
             [{"answer": "1234"}, {"answer": "0.5"}, {"answer": "2.5"}]) == [1.0, 1.0, 1.0]
    assert MathAnswerReward(last_number=False)(["p"], ["We get 69"], [{"answer": "69"}]) == [0.0]
    assert final_answer("x\n#### 1,000\n") == ("1,000", "gsm")


def test_math_answer_without_gold_is_a_counted_failure():
    s = score_rewards([MathAnswerReward()], None, ["p"], ["\\boxed{1}"], [{"question": "?"}])
    assert s.failures["math"] == 1 and "answer" in s.errors["math"]


# --- code ----------------------------------------------------------------------------------------------------
TESTS = "assert add(2, 3) == 5\nassert add(-1, 1) == 0\n"


@pytest.mark.parametrize("completion, expected", [
    ("Here:\n```python\ndef add(a, b):\n    return a + b\n\nprint(add(1, 2))\n```", 1.0),
    ("```python\ndef add(a, b):\n    return a - b\n```", 0.0),
    ("```python\ndef add(a, b):\n    while True:\n        pass\n```", 0.0),
    ("```python\ndef add(a, b) return\n```", 0.0),
    ("def add(a, b):\n    return b + a\n", 1.0),  # no fence: the whole text
])
def test_code_reward_runs_the_tests_in_the_sandbox(completion, expected):
    reward = CodeTestReward(timeout=3.0)
    assert reward(["p"], [completion], [{"tests": TESTS, "entry_point": "add"}]) == [expected]


# --- JSON Schema: the validator agrees with the jsonschema package ----------------------------------------------
SCHEMAS = [
    {"type": "object", "properties": {"name": {"type": "string", "minLength": 2}, "age": {"type": "integer",
     "minimum": 0}}, "required": ["name"], "additionalProperties": False},
    {"type": "array", "items": {"type": "number", "exclusiveMaximum": 10}, "minItems": 1, "uniqueItems": True},
    {"enum": ["a", 1, None, True]},
    {"anyOf": [{"type": "string", "pattern": "^x"}, {"type": "integer", "multipleOf": 3}]},
    {"oneOf": [{"type": "integer"}, {"type": "number", "maximum": 5}]},
    {"$defs": {"pt": {"type": "object", "properties": {"x": {"type": "number"}}, "required": ["x"]}},
     "type": "array", "prefixItems": [{"$ref": "#/$defs/pt"}, {"const": "end"}], "maxItems": 2},
    {"type": ["string", "null"], "not": {"const": ""}},
    {"type": "object", "patternProperties": {"^n_": {"type": "integer"}}, "minProperties": 1,
     "additionalProperties": {"type": "boolean"}},
]
INSTANCES = [{"name": "Al", "age": 3}, {"name": "A"}, {"name": "Bo", "x": 1}, {"age": 2}, [1, 2.5], [], [1, 1],
             [11], "a", 1, 1.0, True, None, "xy", 9, 4, 4.5, 7, [{"x": 1}, "end"], [{"y": 1}, "end"],
             [{"x": 1}, "end", 3], "", {"n_a": 1, "ok": True}, {"n_a": 1.5}, {}, {"ok": 1}, False]


@pytest.mark.parametrize("schema", SCHEMAS, ids=range(len(SCHEMAS)))
def test_schema_validator_agrees_with_jsonschema(schema):
    jsonschema = pytest.importorskip("jsonschema")
    reference = jsonschema.Draft202012Validator(schema)
    for instance in INSTANCES:
        assert validate(instance, schema) == reference.is_valid(instance), instance


def test_json_reward_and_unsupported_keywords():
    schema = SCHEMAS[0]
    reward = JsonSchemaReward(schema=schema)
    completions = ['```json\n{"name": "Ann"}\n```', 'Sure: {"name": "Ann", "age": -1} done', "no json", '{"name": 5}']
    assert reward(["p"] * 4, completions, [{}] * 4) == [1.0, 0.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="dependentSchemas"):
        JsonSchemaReward(schema={"dependentSchemas": {}})


# --- format and specs -------------------------------------------------------------------------------------------
def test_format_presets():
    texts = ["so \\boxed{\\frac{1}{2}}", "#### 42", "<think>hm</think> 42", "```python\nx = 1\n```", "42"]
    assert FormatReward.preset("boxed")([""] * 5, texts, [{}] * 5) == [1.0, 0.0, 0.0, 0.0, 0.0]
    assert FormatReward.preset("gsm")([""] * 5, texts, [{}] * 5) == [0.0, 1.0, 0.0, 0.0, 0.0]
    assert FormatReward.preset("think")([""] * 5, texts, [{}] * 5) == [0.0, 0.0, 1.0, 0.0, 0.0]
    assert FormatReward.preset("code-block")([""] * 5, texts, [{}] * 5) == [0.0, 0.0, 0.0, 1.0, 0.0]
    with pytest.raises(ValueError, match="regular expression"):
        FormatReward("(")


def test_build_rewards_from_specs():
    rewards, weights = build_rewards(["math", "format:boxed=0.2", "format:/^ok$/=-1"])
    assert [r.name for r in rewards] == ["math", "format_boxed", "format"] and weights == [1.0, 0.2, -1.0]
    for bad in (["nope"], [], ["math", "math"], ["format:nope"]):
        with pytest.raises(ValueError):
            build_rewards(bad)
