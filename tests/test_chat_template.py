"""Chat-template rendering: our `render_chat` against transformers' `apply_chat_template` on the real
checkpoint's template, the ChatML fallback against that template, and message validation errors."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qwen25.chat import (
    DEFAULT_SYSTEM_PROMPT,
    FALLBACK_CHAT_TEMPLATE,
    ROLES,
    ChatTemplateError,
    normalize_messages,
    render_chat,
)

# ---
# Fixtures: the real template, and a transformers tokenizer that only renders it.


@pytest.fixture(scope="module")
def real_template(real_gguf) -> str:
    """`tokenizer.chat_template` from the real GGUF's metadata."""
    try:
        from qwen25.weights.gguf import GGUFFile
    except ImportError:  # our reader not written yet: use the gguf package (slower, ~9 s, parses everything)
        from gguf import GGUFReader

        field = GGUFReader(real_gguf).fields["tokenizer.chat_template"]
        return bytes(field.parts[field.data[0]]).decode("utf-8")
    with GGUFFile(real_gguf) as gguf_file:
        return gguf_file.metadata["tokenizer.chat_template"]


def make_hf_tokenizer(template: str):
    """A one-token fast tokenizer carrying `template`. With tokenize=False, apply_chat_template only
    renders, so the vocabulary is irrelevant and building the real 151k-token one (20-40 s) is not needed."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.BPE(vocab={"a": 0}, merges=[])))
    tok.chat_template = template
    return tok


@pytest.fixture(scope="module")
def hf_tokenizer(real_template):
    return make_hf_tokenizer(real_template)


def hf_render(tok, messages: list[dict], tools: list[dict] | None = None, add_generation_prompt: bool = True) -> str:
    return tok.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=add_generation_prompt)


# ---
# Conversations. Tool-call arguments are dicts here (what transformers expects).

TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "Current weather for a city (météo, 天气).",
        "parameters": {"type": "object", "properties": {
            "city": {"type": "string", "description": "City name, e.g. Zürich"},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
            "required": ["city"]}}},
    {"type": "function", "function": {
        "name": "search", "description": "Search the web for <query> & return snippets.",
        "parameters": {"type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]}}},
]


def _call(name: str, arguments: Any, call_id: str) -> dict:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


TOOL_TURN = [
    {"role": "user", "content": "Weather in Paris and 北京?"},
    {"role": "assistant", "content": None, "tool_calls": [
        _call("get_weather", {"city": "Paris", "unit": "celsius"}, "call_1"),
        _call("get_weather", {"city": "北京"}, "call_2")]},
    {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 18, "sky": "clear"}'},
    {"role": "tool", "tool_call_id": "call_2", "content": '{"temp": 25, "sky": "晴"}'},
]

CASES: dict[str, tuple[list[dict], list[dict] | None]] = {
    "no_system": ([{"role": "user", "content": "Hello!"}], None),
    "system": ([{"role": "system", "content": "You are a terse assistant."},
                {"role": "user", "content": "Hi"}], None),
    "multi_turn": ([{"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "2+2?"},
                    {"role": "assistant", "content": "4"},
                    {"role": "user", "content": "And 3+3?"}], None),
    "non_ascii": ([{"role": "user", "content": "Привет! 你好 👋🏽 café\n\ttabs & <tags>"},
                   {"role": "assistant", "content": "こんにちは — ça va? ✓"},
                   {"role": "user", "content": "مرحبا"}], None),
    "tools_no_system": ([{"role": "user", "content": "What's the weather in Zürich?"}], TOOLS),
    "tools_with_system": ([{"role": "system", "content": "You route requests to tools."},
                           {"role": "user", "content": "Search for qwen2.5"}], TOOLS),
    "single_tool_call": ([{"role": "user", "content": "Search for jinja"},
                          {"role": "assistant", "content": "Let me search.",
                           "tool_calls": [_call("search", {"query": "jinja sandbox"}, "c1")]},
                          {"role": "tool", "tool_call_id": "c1", "content": "Jinja is a template engine."},
                          {"role": "assistant", "content": "Jinja is a template engine."}], TOOLS),
    "parallel_calls_and_merged_tool_results": (TOOL_TURN, TOOLS),
    "tool_results_then_answer": (TOOL_TURN + [{"role": "assistant", "content": "Paris 18°C, 北京 25°C."},
                                              {"role": "user", "content": "Thanks"}], TOOLS),
    "flat_tool_call_no_tools_given": ([{"role": "user", "content": "x"},
                                       {"role": "assistant", "content": "",
                                        "tool_calls": [{"name": "search", "arguments": {"query": "x", "n": 3}}]},
                                       {"role": "tool", "content": "none"}], None),
}


def _stringify_arguments(messages: list[dict]) -> list[dict]:
    """The same conversation with OpenAI-style JSON-string arguments (as clients send them)."""
    out = copy.deepcopy(messages)
    for message in out:
        for call in message.get("tool_calls") or []:
            fn = call.get("function", call)
            fn["arguments"] = json.dumps(fn["arguments"], ensure_ascii=False)
    return out


# ---
# Parity with transformers on the real template.


@pytest.mark.real_model
@pytest.mark.parametrize("add_generation_prompt", [True, False], ids=["gen", "nogen"])
@pytest.mark.parametrize("case", list(CASES))
def test_matches_transformers(real_template, hf_tokenizer, case, add_generation_prompt):
    messages, tools = CASES[case]
    expected = hf_render(hf_tokenizer, messages, tools, add_generation_prompt)
    assert render_chat(real_template, messages, tools, add_generation_prompt=add_generation_prompt) == expected
    assert expected.endswith("<|im_start|>assistant\n") == add_generation_prompt


@pytest.mark.real_model
@pytest.mark.parametrize("case", [c for c, (m, _) in CASES.items() if any("tool_calls" in x for x in m)])
def test_string_arguments_render_like_dict_arguments(real_template, hf_tokenizer, case):
    messages, tools = CASES[case]
    string_args = _stringify_arguments(messages)
    expected = hf_render(hf_tokenizer, messages, tools)  # transformers given dict arguments
    assert render_chat(real_template, string_args, tools) == expected
    # transformers given the string double-encodes it: the SPEC §3.2 bug this normalisation fixes
    assert hf_render(hf_tokenizer, string_args, tools) != expected
    assert '"arguments": "{\\"' in hf_render(hf_tokenizer, string_args, tools)


@pytest.mark.real_model
def test_real_template_facts(real_template):
    """What the real template does that callers must know about (SPEC §3)."""
    out = render_chat(real_template, *CASES["parallel_calls_and_merged_tool_results"])
    assert out.startswith(f"<|im_start|>system\n{DEFAULT_SYSTEM_PROMPT}\n\n# Tools\n")
    assert out.count("<|im_start|>user\n<tool_response>") == 1  # two tool results, one user turn
    assert out.count("<tool_call>\n{\"name\": \"get_weather\"") == 2  # parallel calls in one assistant turn
    assert '{"city": "北京"}' in out  # tojson keeps non-ASCII
    assert '"description": "Search the web for <query> & return snippets."' in out  # no HTML escaping
    assert not out.endswith("\n\n")  # the template's trailing newline is dropped (no keep_trailing_newline)


@pytest.mark.real_model
def test_content_parts_are_joined(real_template, hf_tokenizer):
    parts = [{"role": "user", "content": [{"type": "text", "text": "line one"}, {"type": "text", "text": "line two"}]}]
    joined = [{"role": "user", "content": "line one\nline two"}]
    assert render_chat(real_template, parts) == hf_render(hf_tokenizer, joined)


def test_environment_matches_transformers():
    """The environment's extras (tojson options, namespace, loop controls, trim/lstrip) render like transformers'."""
    template = (
        "{% set ns = namespace(n=0) %}\n"
        "{% for m in messages %}\n"
        "  {% if loop.index > 2 %}{% break %}{% endif %}\n"
        "  {% set ns.n = ns.n + 1 %}\n"
        "  {{ m.role }}: {{ m.content }}\n"
        "{% endfor %}\n"
        "n={{ ns.n }} {{ extra | tojson }} {{ extra | tojson(indent=2, sort_keys=True) }}"
        " {{ extra | tojson(separators=(',', ':'), ensure_ascii=True) }} {{ dict(a=1) | tojson }}"
        " {{ strftime_now('%Y') }}\n"
    )
    messages = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]
    extra = {"z": "<é>", "a": [1, 2.5, None, True]}
    expected = make_hf_tokenizer(template).apply_chat_template(messages, tokenize=False, extra=extra)
    assert render_chat(template, messages, add_generation_prompt=False, extra=extra) == expected


# ---
# The ChatML fallback.


@pytest.mark.real_model
@pytest.mark.parametrize("case", list(CASES))
def test_fallback_renders_like_real_template(real_template, case):
    messages, tools = CASES[case]
    for gen in (True, False):
        assert render_chat(None, messages, tools, gen) == render_chat(real_template, messages, tools, gen)


_text = st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=12)
_call_st = st.builds(lambda name, args, flat: {"name": name, "arguments": args} if flat
                     else {"type": "function", "function": {"name": name, "arguments": args}},
                     st.sampled_from(["get_weather", "search"]),
                     st.dictionaries(st.text(max_size=4), st.one_of(_text, st.integers(), st.none()), max_size=3),
                     st.booleans())
_message = st.one_of(
    st.builds(lambda role, text: {"role": role, "content": text}, st.sampled_from(ROLES), _text),
    st.builds(lambda text, calls: {"role": "assistant", "content": text, "tool_calls": calls},
              st.one_of(st.none(), _text), st.lists(_call_st, min_size=1, max_size=3)),
)


@pytest.mark.real_model
@settings(max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(messages=st.lists(_message, min_size=1, max_size=6), with_tools=st.booleans(), gen=st.booleans())
def test_random_conversations(real_template, hf_tokenizer, messages, with_tools, gen):
    """Any valid conversation: ours == transformers (dict arguments) == the fallback; string arguments too."""
    tools = TOOLS if with_tools else None
    expected = hf_render(hf_tokenizer, messages, tools, gen)
    assert render_chat(real_template, messages, tools, gen) == expected
    assert render_chat(real_template, _stringify_arguments(messages), tools, gen) == expected
    assert render_chat(None, messages, tools, gen) == expected


def test_fallback_plain_chatml():
    assert render_chat("", [{"role": "user", "content": "hi"}]) == (
        f"<|im_start|>system\n{DEFAULT_SYSTEM_PROMPT}<|im_end|>\n"
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    assert DEFAULT_SYSTEM_PROMPT in FALLBACK_CHAT_TEMPLATE


# ---
# Normalisation and errors (no real model needed).


def test_does_not_mutate_input():
    messages = _stringify_arguments(TOOL_TURN) + [
        {"role": "user", "content": [{"type": "text", "text": "more"}]}]
    before = copy.deepcopy(messages)
    render_chat(None, messages, TOOLS)
    assert messages == before


def test_normalize_messages_shapes():
    out = normalize_messages([
        {"role": "assistant", "content": None, "tool_calls": [
            _call("f", '{"x": [1, 2]}', "a"), _call("g", "", "b"), _call("h", None, "c")]},
        {"role": "tool", "tool_call_id": "a", "content": {"ok": True, "msg": "é"}},
    ])
    calls = out[0]["tool_calls"]
    assert [c["function"]["arguments"] for c in calls] == [{"x": [1, 2]}, {}, {}]
    assert calls[0]["id"] == "a" and calls[0]["type"] == "function"  # extra keys pass through
    assert out[1] == {"role": "tool", "tool_call_id": "a", "content": '{"ok": true, "msg": "é"}'}


@pytest.mark.parametrize(("messages", "match"), [
    ([{"role": "developer", "content": "x"}], r"messages\[0\] has unsupported role 'developer'"),
    ([{"role": "user", "content": "x"}, {"content": "y"}], r"messages\[1\] has unsupported role None"),
    ([{"role": "user", "content": "x"},
      {"role": "assistant", "content": None, "tool_calls": [_call("f", '{"a": 1,}', "c")]}],
     r"messages\[1\]\.tool_calls\[0\]\.function\.arguments is not valid JSON"),
    ([{"role": "assistant", "tool_calls": [_call("f", "[1, 2]", "c")]}], r"arguments must be a JSON object"),
    ([{"role": "assistant", "tool_calls": [_call("", "{}", "c")]}], r"needs a non-empty string 'name'"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
     r"messages\[0\] \(user\)\.content\[0\] has type 'image_url'"),
    ([{"role": "user", "content": [{"type": "text"}]}], r"without a string 'text'"),
    ([{"role": "user", "content": None}], r"messages\[0\] \(user\) has no content"),
    ([{"role": "user", "content": 42}], r"must be a string or a list of text parts"),
    ([{"role": "user", "content": "x", "tool_calls": []}], r"only assistant messages may carry them"),
    (["hello"], r"messages\[0\] must be a dict"),
    ([], r"messages is empty"),
])
def test_invalid_messages(messages, match):
    with pytest.raises(ValueError, match=match):
        render_chat(None, messages)


def test_template_errors_are_value_errors():
    with pytest.raises(ChatTemplateError, match="roles must alternate") as info:
        render_chat("{{ raise_exception('roles must alternate') }}", [{"role": "user", "content": "x"}])
    assert isinstance(info.value, ValueError)
    with pytest.raises(ValueError, match="does not compile"):
        render_chat("{% if %}", [{"role": "user", "content": "x"}])
    with pytest.raises(ValueError, match="tools must be a list"):
        render_chat(None, [{"role": "user", "content": "x"}], tools={"type": "function"})


def test_sandbox_blocks_internals():
    import jinja2

    with pytest.raises(jinja2.exceptions.SecurityError):
        render_chat("{{ messages.__class__.__mro__ }}", [{"role": "user", "content": "x"}])
    with pytest.raises(jinja2.exceptions.SecurityError):
        render_chat("{% set ns = namespace(_x=1) %}", [{"role": "user", "content": "x"}])
