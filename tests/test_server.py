"""The OpenAI-compatible server on a scripted engine (no model): schemas, SSE, n, seeds, stops, logprobs,
tool calls, structured output, errors, auth, back-pressure and engine failures. See test_server_live.py for the
same API against the real model through the official `openai` client."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("llguidance")

from fastapi.testclient import TestClient  # noqa: E402

from qwen25.sampling_params import SamplingParams  # noqa: E402
from qwen25.server.app import ServerConfig, create_app  # noqa: E402
from server_fakes import ScriptedEngine, byte_tokenizer, echo_script  # noqa: E402

MODEL = "test-model"
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                   "required": ["city"]}}}
CALL_TEXT = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call>'


@pytest.fixture(scope="module")
def tokenizer():  # noqa: ANN201
    return byte_tokenizer()


@pytest.fixture
def serve(tokenizer) -> Iterator[Callable[..., tuple[TestClient, ScriptedEngine]]]:  # noqa: ANN001
    clients: list[TestClient] = []

    def make(script: Callable[[str], str] = echo_script, *, api_key: str | None = None, max_pending: int = 64,
             max_model_len: int = 4096, **engine_kwargs: Any) -> tuple[TestClient, ScriptedEngine]:
        engine = ScriptedEngine(tokenizer, script, max_model_len=max_model_len, **engine_kwargs)
        config = ServerConfig(MODEL, max_model_len, tokenizer.vocab_size, SamplingParams(temperature=0),
                              sorted(tokenizer.stop_token_ids), api_key=api_key, max_pending=max_pending)
        client = TestClient(create_app(engine, tokenizer, config))
        client.__enter__()
        clients.append(client)
        return client, engine

    yield make
    for c in clients:
        c.__exit__(None, None, None)


def chat(client: TestClient, content: str = "hello", **body: Any):  # noqa: ANN201
    return client.post("/v1/chat/completions",
                       json={"model": MODEL, "messages": [{"role": "user", "content": content}], **body})


def sse(response) -> list[dict]:  # noqa: ANN001
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/event-stream")
    events = [line[6:] for line in response.text.split("\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def assert_error(response, status: int, *needles: str) -> dict:  # noqa: ANN001
    assert response.status_code == status, response.text
    err = response.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    for needle in needles:
        assert needle in err["message"], err
    return err


# --- basics ----------------------------------------------------------------------------------------
def test_models_health_metrics(serve) -> None:  # noqa: ANN001
    client, _ = serve()
    models = client.get("/v1/models").json()
    assert models["object"] == "list" and models["data"][0]["id"] == MODEL
    assert client.get(f"/v1/models/{MODEL}").json()["max_model_len"] == 4096
    assert_error(client.get("/v1/models/nope"), 404, "nope")
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["admitting"] and health["queue"]["waiting"] == 0
    chat(client)
    text = client.get("/metrics").text
    for name in ("qwen25_requests_total", "qwen25_prompt_tokens_total", "qwen25_generation_tokens_total",
                 "qwen25_requests_waiting", "qwen25_request_latency_seconds_bucket",
                 "qwen25_time_to_first_token_seconds_count", "qwen25_engine_steps"):
        assert name in text
    assert 'qwen25_requests_total{endpoint="/v1/chat/completions",status="200"} 1' in text


def test_chat_plain(serve, tokenizer) -> None:  # noqa: ANN001
    client, engine = serve()
    r = chat(client, "hi there")
    body = r.json()
    assert r.status_code == 200 and body["object"] == "chat.completion" and body["model"] == MODEL
    choice = body["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": "You said: hi there", "tool_calls": None}
    assert choice["finish_reason"] == "stop"
    prompt_ids = engine.added[0][1]
    tokenized = client.post("/tokenize", json={"messages": [{"role": "user", "content": "hi there"}]}).json()
    assert prompt_ids == tokenized["tokens"]
    assert tokenizer.decode(prompt_ids).endswith("<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\n")
    usage = body["usage"]
    assert usage["prompt_tokens"] == len(prompt_ids)
    assert usage["completion_tokens"] == len(tokenizer.encode("You said: hi there"))
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_chat_stream_matches_plain(serve) -> None:  # noqa: ANN001
    client, _ = serve()
    plain = chat(client, "stream me").json()
    events = sse(chat(client, "stream me", stream=True, stream_options={"include_usage": True}))
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(e["object"] == "chat.completion.chunk" for e in events)
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events if e["choices"])
    assert text == plain["choices"][0]["message"]["content"]
    finals = [e["choices"][0]["finish_reason"] for e in events if e["choices"] and e["choices"][0]["finish_reason"]]
    assert finals == ["stop"]
    assert events[-1]["choices"] == [] and events[-1]["usage"] == plain["usage"]
    assert all(e["usage"] is None for e in events[:-1])


def test_completions(serve, tokenizer) -> None:  # noqa: ANN001
    client, _ = serve(lambda prompt: " world, again and again")
    body = client.post("/v1/completions", json={"model": MODEL, "prompt": "hello", "max_tokens": 6}).json()
    assert body["object"] == "text_completion"
    assert body["choices"][0]["text"] == " world" and body["choices"][0]["finish_reason"] == "length"
    assert body["usage"] == {"prompt_tokens": 5, "completion_tokens": 6, "total_tokens": 11}
    events = sse(client.post("/v1/completions", json={"model": MODEL, "prompt": "hello", "max_tokens": 6,
                                                     "stream": True, "echo": True}))
    assert "".join(e["choices"][0]["text"] for e in events) == "hello world"
    # several prompts (text and token ids) x n: choice index = prompt * n + k
    body = client.post("/v1/completions", json={"model": MODEL, "prompt": ["a", "b"], "n": 2, "max_tokens": 3}).json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    body = client.post("/v1/completions", json={"model": MODEL, "prompt": tokenizer.encode("hey"),
                                                "max_tokens": 2}).json()
    assert body["choices"][0]["text"] == " w"


def test_fill_in_the_middle_suffix(serve) -> None:  # noqa: ANN001
    client, engine = serve(lambda prompt: "middle")
    client.post("/v1/completions", json={"model": MODEL, "prompt": "def f(", "suffix": "):", "max_tokens": 3})
    assert engine.tokenizer.decode(engine.added[-1][1]) == "<|fim_prefix|>def f(<|fim_suffix|>):<|fim_middle|>"


def test_n_and_seeds(serve) -> None:  # noqa: ANN001
    client, engine = serve(lambda prompt: "abcdefgh", confidence=1.0)
    body = chat(client, n=3, seed=7, temperature=1.5, max_tokens=8).json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    assert [(p.n, p.seed) for _, _, p in engine.added] == [(3, 7)]  # one engine request; it seeds 7, 8, 9
    texts = [c["message"]["content"] for c in body["choices"]]
    again = chat(client, n=3, seed=7, temperature=1.5, max_tokens=8).json()["choices"]
    again = [c["message"]["content"] for c in again]
    assert texts == again  # same seeds, same samples
    assert len(set(texts)) > 1  # different seeds per choice
    singles = [chat(client, seed=s, temperature=1.5, max_tokens=8).json()["choices"][0]["message"]["content"]
               for s in (7, 8, 9)]
    assert singles == texts  # choice k == its own request seeded seed + k
    events = sse(chat(client, n=2, seed=1, max_tokens=4, stream=True))
    assert {e["choices"][0]["index"] for e in events} == {0, 1}


def test_stop_strings(serve) -> None:  # noqa: ANN001
    client, _ = serve(lambda prompt: "one, two, three, four")
    body = chat(client, stop=["three"]).json()
    assert body["choices"][0]["message"]["content"] == "one, two, " and body["choices"][0]["finish_reason"] == "stop"
    events = sse(chat(client, stop="two", stream=True))
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events) == "one, "


def test_sampling_fields_reach_the_engine(serve) -> None:  # noqa: ANN001
    client, engine = serve()
    chat(client, temperature=0.3, top_p=0.9, top_k=5, min_p=0.1, repetition_penalty=1.1, presence_penalty=0.5,
         frequency_penalty=-0.5, max_completion_tokens=7, stop_token_ids=[5], ignore_eos=True)
    p = engine.added[-1][2]
    assert (p.temperature, p.top_p, p.top_k, p.min_p, p.repetition_penalty, p.presence_penalty,
            p.frequency_penalty, p.max_tokens, p.stop_token_ids, p.ignore_eos) == (
        0.3, 0.9, 5, 0.1, 1.1, 0.5, -0.5, 7, [5], True)
    chat(client)  # unspecified fields keep the server's defaults; max_tokens defaults to the rest of the context
    p = engine.added[-1][2]
    assert p.temperature == 0 and p.max_tokens == 4096 - len(engine.added[-1][1])


def test_logprobs(serve, tokenizer) -> None:  # noqa: ANN001
    client, _ = serve(lambda prompt: "abc")
    body = chat(client, logprobs=True, top_logprobs=2).json()
    content = body["choices"][0]["logprobs"]["content"]
    assert [c["token"] for c in content] == ["a", "b", "c"]
    assert all(len(c["top_logprobs"]) == 2 and c["bytes"] == list(c["token"].encode()) for c in content)
    assert all(c["logprob"] <= 0 and c["top_logprobs"][0]["logprob"] >= c["top_logprobs"][1]["logprob"]
               for c in content)
    assert chat(client).json()["choices"][0]["logprobs"] is None
    events = sse(chat(client, logprobs=True, stream=True))
    assert [t["token"] for e in events if e["choices"] and e["choices"][0]["logprobs"]
            for t in e["choices"][0]["logprobs"]["content"]] == ["a", "b", "c"]
    body = client.post("/v1/completions", json={"model": MODEL, "prompt": "x", "logprobs": 1}).json()
    lp = body["choices"][0]["logprobs"]
    assert lp["tokens"] == ["a", "b", "c"] and lp["text_offset"] == [0, 1, 2] and len(lp["top_logprobs"][0]) == 1


def test_logit_bias_bans_tokens(serve) -> None:  # noqa: ANN001
    client, _ = serve(lambda prompt: "aaaa")
    banned = ord("a")
    body = chat(client, logit_bias={str(banned): -100}, max_tokens=4).json()
    assert "a" not in body["choices"][0]["message"]["content"]
    assert_error(chat(client, logit_bias={"999999": 5}), 400, "logit_bias")


# --- tools -----------------------------------------------------------------------------------------
def test_tool_call_parsed(serve) -> None:  # noqa: ANN001
    client, engine = serve(lambda prompt: CALL_TEXT)
    body = chat(client, "weather in Paris?", tools=[WEATHER]).json()
    choice = body["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] is None
    (call,) = choice["message"]["tool_calls"]
    assert call["type"] == "function" and call["id"].startswith("call_")
    assert call["function"] == {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'}
    assert "<tools>" in engine.tokenizer.decode(engine.added[-1][1])  # tools rendered into the system turn


def test_tool_call_streamed(serve) -> None:  # noqa: ANN001
    client, _ = serve(lambda prompt: "Checking.\n" + CALL_TEXT + "\n" + CALL_TEXT.replace("Paris", "Rome"))
    events = sse(chat(client, tools=[WEATHER], stream=True))
    content = "".join(e["choices"][0]["delta"].get("content") or "" for e in events)
    assert content == "Checking."
    assert "tool_call" not in json.dumps([e["choices"][0]["delta"].get("content") for e in events])
    calls: dict[int, dict] = {}
    for e in events:
        for d in e["choices"][0]["delta"].get("tool_calls", []):
            if "id" in d:
                assert d["index"] not in calls and d["function"]["name"]
                calls[d["index"]] = {"id": d["id"], "name": d["function"]["name"], "arguments": ""}
            calls[d["index"]]["arguments"] += d["function"]["arguments"]
    assert [(c["name"], json.loads(c["arguments"])["city"]) for c in calls.values()] == [
        ("get_weather", "Paris"), ("get_weather", "Rome")]
    assert events[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_tool_choice_none_and_round_trip(serve) -> None:  # noqa: ANN001
    client, engine = serve(lambda prompt: "It is sunny.")
    body = chat(client, tools=[WEATHER], tool_choice="none").json()
    assert body["choices"][0]["message"]["tool_calls"] is None
    assert "<tools>" not in engine.tokenizer.decode(engine.added[-1][1])
    messages = [{"role": "user", "content": "weather?"},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "call_1", "type": "function",
                     "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 21}'}]
    r = client.post("/v1/chat/completions", json={"model": MODEL, "messages": messages, "tools": [WEATHER]})
    assert r.status_code == 200, r.text
    prompt = engine.tokenizer.decode(engine.added[-1][1])
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in prompt
    assert "<tool_response>\n{\"temp\": 21}\n</tool_response>" in prompt


def test_named_tool_choice_is_forced(serve) -> None:  # noqa: ANN001
    tool = {"type": "function", "function": {"name": "set_unit", "parameters": {
        "type": "object", "properties": {"unit": {"enum": ["c", "f"]}, "loud": {"type": "boolean"}},
        "required": ["unit", "loud"], "additionalProperties": False}}}
    client, _ = serve(lambda prompt: "I would rather chat.")  # the "model" wants to answer in prose
    body = chat(client, tools=[WEATHER, tool], max_tokens=100,
                tool_choice={"type": "function", "function": {"name": "set_unit"}}).json()
    (call,) = body["choices"][0]["message"]["tool_calls"]
    args = json.loads(call["function"]["arguments"])
    assert call["function"]["name"] == "set_unit" and args["unit"] in ("c", "f") and isinstance(args["loud"], bool)
    assert body["choices"][0]["finish_reason"] == "tool_calls"
    assert_error(chat(client, tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "nope"}}),
                 400, "nope")
    assert_error(chat(client, tool_choice="required"), 400, "tools")


# --- structured output -----------------------------------------------------------------------------
def test_json_schema_forced(serve) -> None:  # noqa: ANN001
    schema = {"type": "object", "properties": {"unit": {"enum": ["c", "f"]}, "n": {"type": "integer", "minimum": 0,
                                                                                  "maximum": 9}},
              "required": ["unit", "n"], "additionalProperties": False}
    client, _ = serve(lambda prompt: "Sure! Here you go: ```json")
    for fmt in ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}},
                {"guided_json": schema}, {"structured_outputs": {"json": schema}}):
        body = chat(client, max_tokens=40, **fmt).json()
        value = json.loads(body["choices"][0]["message"]["content"])
        assert value["unit"] in ("c", "f") and 0 <= value["n"] <= 9 and set(value) == {"unit", "n"}
        assert body["choices"][0]["finish_reason"] == "stop"


def test_json_object_regex_choice(serve) -> None:  # noqa: ANN001
    client, _ = serve(lambda prompt: '{"ok": true}')
    body = chat(client, response_format={"type": "json_object"}).json()
    assert json.loads(body["choices"][0]["message"]["content"]) == {"ok": True}
    client, _ = serve(lambda prompt: "maybe")
    out = chat(client, guided_regex="[0-9]{3}-[a-c]", max_tokens=10).json()["choices"][0]["message"]["content"]
    assert len(out) == 5 and out[:3].isdigit() and out[3] == "-" and out[4] in "abc"
    out = chat(client, guided_choice=["yes", "no"], max_tokens=5).json()["choices"][0]["message"]["content"]
    assert out in ("yes", "no")
    out = client.post("/v1/completions", json={"model": MODEL, "prompt": "q", "max_tokens": 5,
                                               "structured_outputs": {"choice": ["up", "down"]}}).json()
    assert out["choices"][0]["text"] in ("up", "down")


def test_invalid_constraints_are_400(serve) -> None:  # noqa: ANN001
    client, _ = serve()
    bad_schema = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "frobnicate"}}}
    assert_error(chat(client, response_format=bad_schema), 400, "frobnicate")
    assert_error(chat(client, guided_regex="[a-"), 400, "regex")
    assert_error(chat(client, guided_json="{not json"), 400, "not valid JSON")
    assert_error(chat(client, guided_regex="a", guided_choice=["b"]), 400, "at most one")


# --- errors ----------------------------------------------------------------------------------------
def test_bad_requests_are_400_naming_the_field(serve) -> None:  # noqa: ANN001
    client, _ = serve()
    url = "/v1/chat/completions"
    r = client.post(url, content=b'{"model": "x", "messages": [', headers={"content-type": "application/json"})
    assert_error(r, 400, "not valid JSON")
    assert_error(client.post(url, json={"model": MODEL, "messages": "hello"}), 400, "messages")
    assert_error(client.post(url, json={"model": MODEL, "messages": []}), 400, "messages")
    assert_error(client.post(url, json={"model": MODEL}), 400, "messages")
    err = assert_error(client.post(url, json={"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}),
                       400, "role")
    assert err["param"] == "messages.0.role"
    assert_error(chat(client, temperature=-1), 400, "temperature")
    assert_error(chat(client, temperature="hot"), 400, "temperature")
    assert_error(chat(client, n=0), 400, "n")
    assert_error(chat(client, top_p=0), 400, "top_p")
    assert_error(chat(client, stop=[""]), 400, "stop")
    assert_error(client.post(url, json={"model": MODEL, "messages": [{"role": "user"}]}), 400, "content")
    assert_error(client.post(url, json={"model": MODEL, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "x"}}]}]}), 400, "text-only")
    assert_error(chat(client, model="gpt-4"), 404, "gpt-4")
    assert_error(client.post("/v1/completions", json={"model": MODEL, "prompt": ""}), 400, "empty")
    assert chat(client).status_code == 200  # still serving


def test_context_length(serve) -> None:  # noqa: ANN001
    client, _ = serve(max_model_len=256)
    err = assert_error(chat(client, max_tokens=10**9), 400, "256", "in the messages", "1000000000 in the completion")
    assert err["code"] == "context_length_exceeded" and err["param"] == "max_tokens"
    assert_error(chat(client, "x" * 5000), 400, "256", "5")
    assert_error(client.post("/v1/completions", json={"model": MODEL, "prompt": "x" * 300}), 400, "300")
    assert chat(client, max_tokens=5).status_code == 200


def test_api_key(serve) -> None:  # noqa: ANN001
    client, _ = serve(api_key="sekrit")
    assert_error(chat(client), 401, "API key")
    wrong = client.post("/v1/chat/completions", headers={"Authorization": "Bearer nope"},
                        json={"model": MODEL, "messages": [{"role": "user", "content": "x"}]})
    assert_error(wrong, 401)
    r = client.post("/v1/chat/completions", headers={"Authorization": "Bearer sekrit"},
                    json={"model": MODEL, "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 200
    assert client.get("/health").status_code == 200 and client.get("/").status_code == 200  # open


def test_over_capacity_is_429(serve) -> None:  # noqa: ANN001
    client, engine = serve(lambda prompt: "x" * 200, max_pending=1, step_delay=0.01)
    results: list[int] = []
    t = threading.Thread(target=lambda: results.append(chat(client, max_tokens=100).status_code))
    t.start()
    deadline = time.monotonic() + 5
    while not engine.running and time.monotonic() < deadline:
        time.sleep(0.01)
    err = assert_error(chat(client, max_tokens=5), 429, "capacity")
    assert err["type"] == "rate_limit_error"
    t.join()
    assert results == [200]
    assert chat(client, max_tokens=5).status_code == 200


def test_engine_failure_fails_requests_not_the_server(serve) -> None:  # noqa: ANN001
    client, engine = serve()
    engine.fail_next_step = RuntimeError("kaboom")
    assert_error(chat(client), 500, "kaboom")
    engine.fail_next_step = RuntimeError("kaboom again")
    events = [line for line in chat(client, stream=True).text.split("\n") if line.startswith("data: ")]
    assert "kaboom again" in events[-2] and events[-1] == "data: [DONE]"
    assert chat(client).status_code == 200
    assert client.get("/health").status_code == 200


def test_tokenize_detokenize(serve, tokenizer) -> None:  # noqa: ANN001
    client, _ = serve()
    body = client.post("/tokenize", json={"prompt": "héllo"}).json()
    assert body == {"count": 6, "max_model_len": 4096, "tokens": tokenizer.encode("héllo")}
    assert client.post("/detokenize", json={"tokens": body["tokens"]}).json() == {"prompt": "héllo"}
    assert_error(client.post("/detokenize", json={"tokens": [10**9]}), 400, "out of range")
    assert_error(client.post("/tokenize", json={}), 400, "exactly one")


def test_chat_page_is_served(serve) -> None:  # noqa: ANN001
    client, _ = serve()
    r = client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "/v1/chat/completions" in r.text and 'id="prompt"' in r.text


# --- wiring ----------------------------------------------------------------------------------------
def test_serve_cli_defaults() -> None:
    from qwen25.cli import build_parser

    args = build_parser().parse_args(["serve"])
    assert (args.host, args.port, args.api_key is None or isinstance(args.api_key, str), args.max_concurrency) == (
        "127.0.0.1", 8000, True, 8)
    args = build_parser().parse_args(["serve", "--model", "m.gguf", "--port", "9", "--api-key", "k",
                                      "--served-model-name", "qwen", "--max-concurrency", "2"])
    assert (args.model, args.port, args.api_key, args.served_model_name, args.max_concurrency) == (
        "m.gguf", 9, "k", "qwen", 2)


def test_app_from_checkpoint_on_a_tiny_model(tiny_hf_dir) -> None:  # noqa: ANN001
    """create_app_from_checkpoint wires a real checkpoint: the batching engine for plain requests, grammars on
    the side."""
    from qwen25.checkpoint import load
    from qwen25.server.app import create_app_from_checkpoint

    checkpoint = load(tiny_hf_dir)
    with TestClient(create_app_from_checkpoint(checkpoint, served_model_name="tiny", max_concurrency=2)) as client:
        r = client.post("/v1/chat/completions", json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}],
                                                      "max_tokens": 4, "temperature": 0})
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] <= 4
        r = client.post("/v1/completions", json={"model": "tiny", "prompt": "hello", "max_tokens": 8,
                                                 "guided_choice": ["yes", "no"], "n": 2, "seed": 3})
        assert r.status_code == 200, r.text
        assert all(c["text"] in ("yes", "no") for c in r.json()["choices"])
        assert_error(client.post("/v1/completions", json={"model": "tiny", "prompt": "hello", "max_tokens": 500}),
                     400, "maximum context length is 96")
