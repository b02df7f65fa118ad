"""Structured output that fails loudly and never smuggles control tokens: schemas no finite value satisfies are
found before llguidance runs (`unsatisfiable`), endless forced grammars fail validation, and text a constraint
forces ("<tool_call>", "<|im_start|>") comes out as plain bytes, never as the control token, on the scripted
server and token by token with the real Qwen2.5 tokenizer; the tool-call grammar still emits its own tokens."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("llguidance")

from fastapi.testclient import TestClient  # noqa: E402

from qwen25.sampling_params import SamplingParams  # noqa: E402
from qwen25.server import structured as so  # noqa: E402
from qwen25.server.app import ServerConfig, create_app  # noqa: E402
from server_fakes import ScriptedEngine, byte_tokenizer  # noqa: E402

MODEL = "m"


@pytest.mark.parametrize("schema", [
    {"type": "object", "properties": {"a": {"$ref": "#"}}, "required": ["a"]},
    {"$defs": {"n": {"type": "object", "properties": {"x": {"$ref": "#/$defs/n"}}, "required": ["x"]}},
     "$ref": "#/$defs/n"},
    {"definitions": {"a": {"$ref": "#/definitions/b"}, "b": {"type": "object", "required": ["c"],
                                                             "properties": {"c": {"$ref": "#/definitions/a"}}}},
     "$ref": "#/definitions/a"},
    {"type": "array", "minItems": 2, "items": {"$ref": "#"}},
    {"anyOf": [{"$ref": "#"}, {"allOf": [{"$ref": "#"}]}]},
    {"type": "object", "properties": {"a": False}, "required": ["a"]},
])
def test_unsatisfiable_schemas_are_found(schema: dict) -> None:
    assert so.unsatisfiable(schema)
    with pytest.raises(so.StructuredOutputError, match="cannot be satisfied"):
        so.json_schema_grammar(schema)


@pytest.mark.parametrize("schema", [
    {"type": "object", "properties": {"a": {"$ref": "#"}}},  # optional: {} ends it
    {"type": ["object", "null"], "properties": {"a": {"$ref": "#"}}, "required": ["a"]},  # null ends it
    {"type": "array", "items": {"$ref": "#"}},  # [] ends it
    {"anyOf": [{"type": "string"}, {"type": "object", "properties": {"a": {"$ref": "#"}}, "required": ["a"]}]},
    {"type": "object", "properties": {"a": {"$ref": "https://example.com/x"}}, "required": ["a"]},
    {"type": "object", "required": ["undeclared"]},
    True, {},
])
def test_satisfiable_schemas_pass(schema) -> None:  # noqa: ANN001
    assert so.unsatisfiable(schema) is None


@pytest.fixture(scope="module")
def client():  # noqa: ANN201
    tokenizer = byte_tokenizer()
    engine = ScriptedEngine(tokenizer, lambda prompt: prompt.rsplit("user\n", 1)[-1].split("<|im_end|>")[0])
    config = ServerConfig(MODEL, 4096, tokenizer.vocab_size, SamplingParams(temperature=0),
                          sorted(tokenizer.stop_token_ids))
    with TestClient(create_app(engine, tokenizer, config)) as c:
        yield c


@pytest.mark.parametrize("text,constraint", [
    ("<tool_call>ok", {"guided_regex": "<tool_call>ok"}),
    ("x<|im_end|>y", {"guided_regex": r"x<\|im_end\|>y"}),
    ("<|im_start|>system", {"guided_choice": ["<|im_start|>system", "<|im_start|>user"]}),
    ('{"role": "<|im_start|>"}', {"guided_json": {"type": "object", "properties": {"role": {"const": "<|im_start|>"}},
                                                   "required": ["role"]}}),
])
def test_forced_control_token_text_comes_out_as_plain_bytes(client, text: str, constraint: dict) -> None:  # noqa: ANN001
    # The scripted "model" wants to write `text` as the byte tokenizer would: with the control token.
    r = client.post("/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": text}],
                                                  "max_tokens": 64, "skip_special_tokens": False, **constraint})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["choices"][0]["message"]["content"] == text
    assert body["usage"]["completion_tokens"] == len(text.encode())  # one plain byte token each, no control token


def test_the_tool_call_grammar_still_emits_its_control_tokens(client) -> None:  # noqa: ANN001
    tool = {"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"]}}}
    call = '<tool_call>\n{"name": "f", "arguments": {"x": 1}}\n</tool_call>'
    r = client.post("/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": call}],
                                                  "tools": [tool], "tool_choice": "required", "max_tokens": 80})
    assert r.status_code == 200, r.text
    (c,) = r.json()["choices"][0]["message"]["tool_calls"]
    assert c["function"] == {"name": "f", "arguments": '{"x": 1}'}
    assert r.json()["usage"]["completion_tokens"] == len(call.encode()) - 2 * len("<tool_call>") + 1  # 2 tokens


@pytest.mark.parametrize("pattern,text", [(r"<\|im_start\|>system", "<|im_start|>system"),
                                          ("ab<tool_call>c", "ab<tool_call>c"),
                                          ("(<tool_call>|</tool_call>)!", None)])
def test_real_tokenizer_never_samples_a_control_token(real_tokenizer, pattern: str, text: str | None) -> None:  # noqa: ANN001
    """Token by token with the real vocabulary: logits that favour every control token, masked by the processor."""
    structured = so.StructuredOutputs(real_tokenizer, 151936, sorted(real_tokenizer.stop_token_ids))
    grammar = so.regex_grammar(pattern)
    structured.validate(grammar)
    proc = structured.processor(grammar)
    control = sorted(structured.control_ids)
    out: list[int] = []
    for _ in range(40):
        logits = torch.zeros(151936)
        logits[control] = 50.0  # the "model" wants a control token at every step
        token = int(torch.argmax(proc(out, logits)))
        if token in real_tokenizer.stop_token_ids:
            break
        assert token not in structured.control_ids, real_tokenizer.decode([token])
        out.append(token)
    assert proc.matcher.is_accepting() and not proc.error
    decoded = real_tokenizer.decode(out)
    assert decoded == text if text is not None else decoded in ("<tool_call>!", "</tool_call>!")


@pytest.mark.parametrize("grammar", ['start: "a" start', "start: x\nx: \"(\" x \")\""])
def test_endless_grammars_fail_validation(grammar: str) -> None:
    structured = so.StructuredOutputs(byte_tokenizer(), 264, [258])
    with pytest.raises(so.StructuredOutputError, match="cannot be satisfied"):
        structured.validate(so.lark_grammar(grammar))
