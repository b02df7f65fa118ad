"""Tool-call parsing (chat.tool_parser): Hermes `<tool_call>` blocks, tolerated malformations, the Coder
bare-JSON fallback, and streaming == non-streaming for every way of splitting the text into deltas."""

from __future__ import annotations

import json
import random

import pytest

from qwen25.chat.tool_parser import ToolCallDelta, ToolCallParser, collect, parse_tool_calls

TOOLS = {"get_weather", "get_time"}
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call>'

CASES = [
    # text, expected content, expected [(name, arguments)]
    ("Hello there.", "Hello there.", []),
    (CALL, None, [("get_weather", '{"city": "Paris", "unit": "celsius"}')]),
    ("Let me check.\n" + CALL, "Let me check.", [("get_weather", '{"city": "Paris", "unit": "celsius"}')]),
    (CALL + "\n" + CALL.replace("Paris", "Rome"), None,
     [("get_weather", '{"city": "Paris", "unit": "celsius"}'), ("get_weather", '{"city": "Rome", "unit": "celsius"}')]),
    # nested values, braces inside strings
    ('<tool_call>\n{"name": "get_time", "arguments": {"zones": ["UTC", {"x": "}{"}], "n": 1}}\n</tool_call>', None,
     [("get_time", '{"zones": ["UTC", {"x": "}{"}], "n": 1}')]),
    # unterminated final call (model stopped without the closing tag)
    ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n', None,
     [("get_weather", '{"city": "Oslo"}')]),
    # double- and triple-encoded arguments
    ('<tool_call>\n{"name": "get_weather", "arguments": "{\\"city\\": \\"Paris\\"}"}\n</tool_call>', None,
     [("get_weather", '{"city": "Paris"}')]),
    ('<tool_call>\n{"name": "get_weather", "arguments": ' + json.dumps(json.dumps(json.dumps({"city": "Lima"})))
     + "}\n</tool_call>", None, [("get_weather", '{"city": "Lima"}')]),
    # "parameters" instead of "arguments", and no arguments at all
    ('<tool_call>\n{"name": "get_time", "parameters": {"tz": "UTC"}}\n</tool_call>', None,
     [("get_time", '{"tz": "UTC"}')]),
    ('<tool_call>\n{"name": "get_time"}\n</tool_call>', None, [("get_time", "{}")]),
    # not JSON: the block stays content
    ("<tool_call>\nnot json\n</tool_call> done", "<tool_call>\nnot json\n</tool_call> done", []),
    # Qwen2.5-Coder style: bare JSON, a fenced block, a list, JSON Lines
    ('{"name": "get_weather", "arguments": {"city": "Paris"}}', None, [("get_weather", '{"city": "Paris"}')]),
    ('```json\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n```', None,
     [("get_weather", '{"city": "Paris"}')]),
    ('[{"name": "get_weather", "arguments": {"city": "A"}}, {"name": "get_time", "arguments": {}}]', None,
     [("get_weather", '{"city": "A"}'), ("get_time", "{}")]),
    ('{"name": "get_weather", "arguments": {"city": "A"}}\n{"name": "get_time", "arguments": {}}', None,
     [("get_weather", '{"city": "A"}'), ("get_time", "{}")]),
    # JSON that is not a call of an offered tool, other code fences, near-miss tags: content, untouched
    ('{"name": "delete_everything", "arguments": {}}', '{"name": "delete_everything", "arguments": {}}', []),
    ('{"answer": 42}', '{"answer": 42}', []),
    ("```python\nprint('hi')\n```", "```python\nprint('hi')\n```", []),
    ("a < b and <tool_ is not a tag", "a < b and <tool_ is not a tag", []),
    ("   \n", None, []),
]


@pytest.mark.parametrize("text,content,calls", CASES)
def test_parse(text: str, content: str | None, calls: list[tuple[str, str]]) -> None:
    got_content, got_calls = parse_tool_calls(text, TOOLS)
    assert got_content == content
    assert [(c.name, c.arguments) for c in got_calls] == calls
    for c in got_calls:
        assert c.id.startswith("call_")
        assert isinstance(json.loads(c.arguments), dict)


@pytest.mark.parametrize("text,content,calls", CASES)
def test_streaming_matches_whole(text: str, content: str | None, calls: list[tuple[str, str]]) -> None:
    rng = random.Random(hash(text) & 0xFFFF)
    for _ in range(25):
        parser = ToolCallParser(TOOLS)
        events: list[str | ToolCallDelta] = []
        i = 0
        while i < len(text):
            k = rng.randint(1, 6)
            events += parser.feed(text[i:i + k])
            i += k
        events += parser.finish()
        got_content, got_calls = collect(events)
        assert got_content == content
        assert [(c.name, c.arguments) for c in got_calls] == calls


def test_streaming_sends_name_first_then_argument_fragments() -> None:
    parser = ToolCallParser(TOOLS)
    events: list[str | ToolCallDelta] = []
    for ch in CALL:
        events += parser.feed(ch)
    events += parser.finish()
    deltas = [e for e in events if isinstance(e, ToolCallDelta)]
    assert not [e for e in events if isinstance(e, str)]  # no markup leaks into content
    assert deltas[0].id and deltas[0].name == "get_weather" and deltas[0].arguments == ""
    assert all(d.id is None and d.name is None for d in deltas[1:])
    assert len(deltas) > 5  # arguments arrive in pieces, not in one block at the end
    assert "".join(d.arguments for d in deltas) == '{"city": "Paris", "unit": "celsius"}'


def test_no_tools_means_no_bare_json_fallback() -> None:
    content, calls = parse_tool_calls('{"name": "get_weather", "arguments": {}}', ())
    assert calls == [] and content == '{"name": "get_weather", "arguments": {}}'
