"""The generation pipeline when each engine output carries several tokens (as speculative decoding's do):
streamed chat and text completions reassemble to the blocking responses, logprobs stay one per token, text offsets
stay continuous, tool calls still stream, usage counts every token. Runs on the scripted engine of
`server_fakes`, and once on the real `LLMEngine` with speculative decoding on a tiny model."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("llguidance")

from fastapi.testclient import TestClient  # noqa: E402
from server_fakes import ScriptedEngine, byte_tokenizer  # noqa: E402

from qwen25.sampling_params import SamplingParams  # noqa: E402
from qwen25.server.app import ServerConfig, create_app  # noqa: E402

MODEL = "test-model"
REPLY = "Hello there, multi-token world!"
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


@pytest.fixture(scope="module", params=[1, 3, 7], ids=lambda k: f"{k}-per-step")
def served(request) -> Iterator[tuple[TestClient, int]]:  # noqa: ANN001
    tokenizer = byte_tokenizer()

    def script(prompt: str) -> str:
        return "Let me check.\n" + CALL if "weather" in prompt else REPLY

    engine = ScriptedEngine(tokenizer, script, tokens_per_step=request.param)
    config = ServerConfig(MODEL, 4096, tokenizer.vocab_size, SamplingParams(temperature=0),
                          sorted(tokenizer.stop_token_ids))
    with TestClient(create_app(engine, tokenizer, config)) as c:
        yield c, request.param


@pytest.fixture
def client(served: tuple[TestClient, int]) -> TestClient:
    return served[0]


def events(response) -> list[dict[str, Any]]:  # noqa: ANN001
    assert response.status_code == 200, response.text
    data = [line[6:] for line in response.text.split("\n") if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    return [json.loads(d) for d in data[:-1]]


def chat(client: TestClient, content: str = "hi", **body: Any):  # noqa: ANN201
    return client.post("/v1/chat/completions",
                       json={"model": MODEL, "messages": [{"role": "user", "content": content}], **body})


def test_chat_stream_equals_blocking_with_logprobs(client: TestClient) -> None:
    body = {"n": 2, "logprobs": True, "top_logprobs": 2, "stream_options": {"include_usage": True}}
    plain = chat(client, **{k: v for k, v in body.items() if k != "stream_options"}).json()
    streamed = events(chat(client, stream=True, **body))
    for i, choice in enumerate(plain["choices"]):
        mine = [e["choices"][0] for e in streamed if e["choices"] and e["choices"][0]["index"] == i]
        assert "".join(c["delta"].get("content", "") for c in mine) == choice["message"]["content"] == REPLY
        tokens = [t for c in mine if c["logprobs"] for t in c["logprobs"]["content"]]
        assert tokens == choice["logprobs"]["content"]
        assert "".join(t["token"] for t in tokens) == REPLY
        assert [c["finish_reason"] for c in mine if c["finish_reason"]] == ["stop"]
    assert streamed[-1]["usage"] == plain["usage"]
    assert plain["usage"]["completion_tokens"] == 2 * len(REPLY)


def test_completion_stream_equals_blocking_with_offsets(served: tuple[TestClient, int]) -> None:
    client, per_step = served
    body = {"model": MODEL, "prompt": "say", "logprobs": 1, "max_tokens": 20}
    plain = client.post("/v1/completions", json=body).json()["choices"][0]
    streamed = [e["choices"][0] for e in events(client.post("/v1/completions", json={**body, "stream": True}))]
    assert "".join(c["text"] for c in streamed) == plain["text"] == REPLY[:20]
    assert len(streamed) == -(-20 // per_step)  # one chunk per engine output, however many tokens it carries
    assert plain["finish_reason"] == "length" and streamed[-1]["finish_reason"] == "length"
    merged = {k: [v for c in streamed for v in c["logprobs"][k]] for k in plain["logprobs"]}
    assert merged == plain["logprobs"]
    assert plain["logprobs"]["text_offset"] == list(range(20))


def test_tool_calls_stream_with_multi_token_steps(client: TestClient) -> None:
    plain = chat(client, "weather in Paris?", tools=[WEATHER]).json()["choices"][0]
    assert plain["finish_reason"] == "tool_calls" and plain["message"]["content"] == "Let me check."
    (call,) = plain["message"]["tool_calls"]
    streamed = [e["choices"][0] for e in events(chat(client, "weather in Paris?", tools=[WEATHER], stream=True))]
    assert "".join(c["delta"].get("content") or "" for c in streamed) == "Let me check."
    deltas = [d for c in streamed for d in c["delta"].get("tool_calls", [])]
    assert [d["function"]["name"] for d in deltas if "id" in d] == ["get_weather"]
    assert "".join(d["function"]["arguments"] for d in deltas) == call["function"]["arguments"]
    assert streamed[-1]["finish_reason"] == "tool_calls"


def test_speculative_engine_through_the_server(tiny_hf_dir) -> None:  # noqa: ANN001
    """The real engine with a draft model identical to the target (every draft accepted: 3 tokens a step):
    the same greedy text as without speculation, streamed in fewer chunks than tokens, stream == blocking."""
    from qwen25.checkpoint import load
    from qwen25.server.app import create_app_from_checkpoint

    checkpoint = load(tiny_hf_dir)
    body = {"model": "tiny", "prompt": "one two one two one", "max_tokens": 24, "temperature": 0,
            "repetition_penalty": 1.0, "ignore_eos": True}
    spec = {"speculative_config": {"model": str(tiny_hf_dir), "num_speculative_tokens": 2}}
    texts = {}
    for name, settings in {"plain": {}, "speculative": spec}.items():
        app = create_app_from_checkpoint(checkpoint, served_model_name="tiny", max_concurrency=2, **settings)
        with TestClient(app) as c:
            plain = c.post("/v1/completions", json=body).json()
            streamed = events(c.post("/v1/completions", json={**body, "stream": True,
                                                              "stream_options": {"include_usage": True}}))
        chunks = [e["choices"][0] for e in streamed if e["choices"]]
        assert "".join(ch["text"] for ch in chunks) == plain["choices"][0]["text"]
        assert streamed[-1]["usage"] == plain["usage"] and plain["usage"]["completion_tokens"] == 24
        if name == "speculative":
            assert len(chunks) <= 24 // 3 + 1
        texts[name] = plain["choices"][0]["text"]
    assert texts["speculative"] == texts["plain"]
