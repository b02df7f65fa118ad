"""Acceptance tests: a live `qwen25 serve` subprocess on 127.0.0.1 with the real Qwen2.5-Coder-0.5B GGUF, driven
by the official `openai` client (no special flags). Outputs are kept short: the model decodes ~5-10 tok/s here."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("fastapi")
pytest.importorskip("llguidance")

pytestmark = pytest.mark.real_model
NAME = "qwen-live"
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a given city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "description": "The city name, e.g. Paris"},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}, "required": ["city", "unit"]}}}
WEATHER_Q = [{"role": "user", "content": "What's the weather like in Paris today, in celsius?"}]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serving(model: Path, log: Path, name: str = NAME) -> Iterator[str]:
    """A `qwen25 serve` subprocess on a free loopback port; yields its base URL once /health answers."""
    port = _free_port()
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "qwen25.cli", "serve", "--model", str(model),
                                 "--port", str(port), "--served-model-name", name, "--max-concurrency", "8",
                                 "--threads", "2", "--log-level", "warning"], stdout=out, stderr=subprocess.STDOUT,
                                env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"qwen25 serve did not start:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        assert proc.returncode is not None


@pytest.fixture(scope="session")
def live_server(real_gguf: Path, tmp_path_factory) -> Iterator[str]:  # noqa: ANN001
    with serving(real_gguf, tmp_path_factory.mktemp("serve") / "serve.log") as url:
        yield url


@pytest.fixture(scope="session")
def client(live_server: str):  # noqa: ANN201
    return openai.OpenAI(base_url=live_server + "/v1", api_key="none", timeout=600, max_retries=0)


def _count(url: str, **body: object) -> int:
    return httpx.post(url + "/tokenize", json=body, timeout=60).json()["count"]


# --- plain generation ------------------------------------------------------------------------------
def test_chat_plain_and_streamed(client, live_server) -> None:  # noqa: ANN001
    messages = [{"role": "user", "content": "Name three primary colors."}]
    r = client.chat.completions.create(model=NAME, messages=messages, max_tokens=12, temperature=0, logprobs=True)
    choice = r.choices[0]
    assert choice.message.role == "assistant" and choice.message.content.strip()
    assert choice.finish_reason in ("stop", "length") and not choice.message.tool_calls
    assert r.usage.prompt_tokens == _count(live_server, messages=messages)
    assert r.usage.completion_tokens == len(choice.logprobs.content)
    if choice.finish_reason == "length":
        assert r.usage.completion_tokens == 12 == _count(live_server, prompt=choice.message.content)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    stream = client.chat.completions.create(model=NAME, messages=messages, max_tokens=12, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == choice.message.content
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens


def test_completions_plain_and_streamed(client) -> None:  # noqa: ANN001
    r = client.completions.create(model=NAME, prompt="def fibonacci(n):", max_tokens=10, temperature=0)
    assert r.choices[0].text and r.usage.completion_tokens == 10 and r.choices[0].finish_reason == "length"
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=NAME, prompt="def fibonacci(n):", max_tokens=10, temperature=0, stream=True) if c.choices)
    assert streamed == r.choices[0].text


def test_n_seed_and_stop(client) -> None:  # noqa: ANN001
    kw = dict(model=NAME, messages=[{"role": "user", "content": "Tell me a fun fact."}], max_tokens=8,
              temperature=1.0, top_p=1.0)
    a = client.chat.completions.create(n=2, seed=1234, **kw)
    assert [c.index for c in a.choices] == [0, 1]
    b = client.chat.completions.create(n=2, seed=1234, **kw)
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    c = client.chat.completions.create(n=1, seed=99, **kw)
    d = client.chat.completions.create(n=1, seed=99, **kw)
    assert c.choices[0].message.content == d.choices[0].message.content
    r = client.completions.create(model=NAME, prompt="1, 2, 3, 4, 5,", max_tokens=12, temperature=0, stop=[" 8"])
    assert r.choices[0].finish_reason == "stop" and " 8" not in r.choices[0].text and "7" in r.choices[0].text


def test_logprobs(client) -> None:  # noqa: ANN001
    r = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "Say hi."}], max_tokens=4,
                                       temperature=0, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert content and "".join(t.token for t in content) == r.choices[0].message.content
    for t in content:
        assert len(t.top_logprobs) == 3 and t.logprob <= 0
        assert t.top_logprobs[0].token == t.token  # greedy picks the most likely token
    r = client.completions.create(model=NAME, prompt="The capital of France is", max_tokens=3, temperature=0,
                                  logprobs=2)
    assert len(r.choices[0].logprobs.tokens) == 3 and len(r.choices[0].logprobs.top_logprobs[0]) == 2


# --- tools -----------------------------------------------------------------------------------------
def _weather_call(message) -> dict:  # noqa: ANN001
    assert message.tool_calls, f"no tool call; content={message.content!r}"
    call = message.tool_calls[0]
    assert call.id and call.type == "function" and call.function.name == "get_weather"
    args = json.loads(call.function.arguments)
    jsonschema.validate(args, WEATHER["function"]["parameters"])
    assert "paris" in args["city"].lower()
    return args


def test_tool_call_auto_and_streamed(client) -> None:  # noqa: ANN001
    r = client.chat.completions.create(model=NAME, messages=WEATHER_Q, tools=[WEATHER], max_tokens=60, temperature=0)
    args = _weather_call(r.choices[0].message)
    assert r.choices[0].finish_reason == "tool_calls"
    stream = client.chat.completions.create(model=NAME, messages=WEATHER_Q, tools=[WEATHER], max_tokens=60,
                                            temperature=0, stream=True)
    calls: dict[int, dict] = {}
    content = ""
    for chunk in stream:
        delta = chunk.choices[0].delta
        content += delta.content or ""
        for d in delta.tool_calls or []:
            entry = calls.setdefault(d.index, {"name": "", "arguments": ""})
            if d.function.name:
                assert not entry["name"] and not entry["arguments"]  # the name comes first, once
                entry["name"] = d.function.name
            entry["arguments"] += d.function.arguments or ""
    assert "<tool_call>" not in content
    assert calls[0]["name"] == "get_weather" and json.loads(calls[0]["arguments"]) == args
    assert calls[0]["arguments"] == r.choices[0].message.tool_calls[0].function.arguments


def test_tool_round_trip(client, live_server) -> None:  # noqa: ANN001
    r = client.chat.completions.create(model=NAME, messages=WEATHER_Q, tools=[WEATHER], max_tokens=60, temperature=0)
    msg = r.choices[0].message
    args = _weather_call(msg)
    result = json.dumps({"city": "Paris", "temperature": 21, "unit": "celsius", "sky": "sunny"})
    messages = [*WEATHER_Q, msg.model_dump(exclude_none=True),
                {"role": "tool", "tool_call_id": msg.tool_calls[0].id, "content": result}]
    # The follow-up renders through the template with the arguments as an object (not double-encoded) and the
    # result as a <tool_response> user turn (SPEC 3.2).
    ids = httpx.post(live_server + "/tokenize", json={"messages": messages, "tools": [WEATHER]}).json()["tokens"]
    prompt = httpx.post(live_server + "/detokenize", json={"tokens": ids}).json()["prompt"]
    call = json.dumps({"name": "get_weather", "arguments": args})
    assert prompt.endswith(f"<|im_start|>assistant\n<tool_call>\n{call}\n</tool_call><|im_end|>\n<|im_start|>user\n"
                           f"<tool_response>\n{result}\n</tool_response><|im_end|>\n<|im_start|>assistant\n")
    r2 = client.chat.completions.create(model=NAME, messages=messages, tools=[WEATHER], max_tokens=30, temperature=0)
    assert r2.usage.prompt_tokens == len(ids)
    # The 0.5B Coder model calls the tool again rather than answer (so does llama.cpp on the same tokens); either
    # is a well-formed reply. test_tool_round_trip_final_answer_1_5b shows the final answer with the 1.5B.
    reply = r2.choices[0].message
    assert reply.content or reply.tool_calls
    for c in reply.tool_calls or []:
        json.loads(c.function.arguments)


@pytest.mark.slow
@pytest.mark.xfail(strict=False, reason=(
    "since the native forward's int8 matmuls take byte activations (session 5), the reply to the tool result "
    "under the server's defaults (the GGUF's repetition_penalty 1.05) is a JSON code block calling the tool "
    "again; with repetition_penalty 1.0 the same tokens get the final answer, and llama.cpp's greedy reply on "
    "them calls the tool again (all measured): this model's choice here is on a knife edge"))
def test_tool_round_trip_final_answer_1_5b(tmp_path) -> None:  # noqa: ANN001
    """The whole round trip ends in an answer built from the tool result. The 0.5B Coder model cannot do this
    part: after a <tool_response> it calls the tool again (llama.cpp on the same GGUF and prompt tokens does the
    same), so this uses the 1.5B Coder GGUF through the same server and client code."""
    from qwen25.weights.registry import KNOWN_MODELS, fetch_known_model

    model = fetch_known_model(KNOWN_MODELS["qwen2.5-coder-1.5b-instruct"], progress=False)
    question = [{"role": "user", "content": "What's the weather like in Paris today, in celsius? Answer in one "
                                            "sentence."}]
    with serving(model, tmp_path / "serve.log") as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", timeout=600, max_retries=0)
        r = client.chat.completions.create(model=NAME, messages=question, tools=[WEATHER], max_tokens=60,
                                           temperature=0)
        msg = r.choices[0].message
        _weather_call(msg)
        assert r.choices[0].finish_reason == "tool_calls"
        result = json.dumps({"temperature": 21, "unit": "celsius", "condition": "sunny"})
        messages = [*question, msg.model_dump(exclude_none=True),
                    {"role": "tool", "tool_call_id": msg.tool_calls[0].id, "content": result}]
        r2 = client.chat.completions.create(model=NAME, messages=messages, tools=[WEATHER], max_tokens=60,
                                            temperature=0)
    answer = r2.choices[0].message
    assert not answer.tool_calls and r2.choices[0].finish_reason == "stop", answer
    assert "21" in answer.content and "<tool_call>" not in answer.content, answer.content


def test_tool_choice_none_and_named(client) -> None:  # noqa: ANN001
    r = client.chat.completions.create(model=NAME, messages=WEATHER_Q, tools=[WEATHER], tool_choice="none",
                                       max_tokens=20, temperature=0)
    assert not r.choices[0].message.tool_calls and r.choices[0].message.content
    other = {"type": "function", "function": {"name": "get_time", "parameters": {
        "type": "object", "properties": {"timezone": {"type": "string"}}, "required": ["timezone"]}}}
    for messages in (WEATHER_Q, [{"role": "user", "content": "Tell me a joke."}]):
        r = client.chat.completions.create(model=NAME, messages=messages, tools=[other, WEATHER], max_tokens=60,
                                           temperature=0,
                                           tool_choice={"type": "function", "function": {"name": "get_weather"}})
        (call,) = r.choices[0].message.tool_calls
        assert call.function.name == "get_weather"
        jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])


# --- structured output -----------------------------------------------------------------------------
def _obj(props: dict, required: list[str] | None = None) -> dict:
    return {"type": "object", "properties": props, "required": list(props) if required is None else required,
            "additionalProperties": False}


S = {"type": "string", "maxLength": 24}
SCHEMAS: list[tuple[str, dict]] = [
    ("a person", _obj({"name": S, "age": {"type": "integer", "minimum": 0, "maximum": 120}})),
    ("a person with first and last name", _obj({"person": _obj({"first": S, "last": S})})),
    ("three to five prime numbers", _obj({"primes": {"type": "array", "items": {"type": "integer", "minimum": 2,
                                                                                  "maximum": 100},
                                                     "minItems": 3, "maxItems": 5}})),
    ("a color", _obj({"color": {"enum": ["red", "green", "blue"]}})),
    ("a US zip code", _obj({"zip": {"type": "string", "pattern": "^[0-9]{5}$"}})),
    ("a test result", _obj({"passed": {"type": "boolean"}, "score": {"type": "integer", "minimum": 0,
                                                                       "maximum": 100}})),
    ("tags for a blog post about Python", _obj({"tags": {"type": "array", "items": S, "minItems": 1,
                                                         "maxItems": 3}})),
    ("an order", _obj({"items": {"type": "array", "minItems": 1, "maxItems": 3, "items": _obj({
        "sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{3}$"}, "qty": {"type": "integer", "minimum": 1,
                                                                              "maximum": 9}})}})),
    ("a movie rating", _obj({"title": S, "stars": {"type": "integer", "enum": [1, 2, 3, 4, 5]}})),
    ("a config", _obj({"version": {"const": "1.0"}, "debug": {"type": "boolean"}})),
    ("a user profile", _obj({"username": {"type": "string", "pattern": "^[a-z]{3,10}$"}, "bio": S},
                            required=["username"])),
    ("a 2x2 matrix of digits", _obj({"m": {"type": "array", "minItems": 2, "maxItems": 2, "items": {
        "type": "array", "minItems": 2, "maxItems": 2, "items": {"type": "integer", "minimum": 0, "maximum": 9}}}})),
    ("a value", _obj({"value": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 10},
                                          {"type": "string", "maxLength": 5}]}})),
    ("a date", _obj({"date": {"type": "string", "pattern": "^20[0-9]{2}-[01][0-9]-[0-3][0-9]$"}})),
    ("some letters", {"type": "array", "items": {"enum": ["a", "b", "c"]}, "minItems": 2, "maxItems": 4}),
    ("a name with an optional middle name", _obj({"first": S, "middle": {"type": ["string", "null"],
                                                                         "maxLength": 10}})),
    ("a company", _obj({"company": _obj({"name": S, "address": _obj({"city": S, "country": {
        "enum": ["FR", "DE", "US"]}})})})),
    ("a traffic light state", _obj({"light": {"enum": ["red light", "yellow light", "green light"]}})),
    ("a temperature reading", _obj({"celsius": {"type": "integer", "exclusiveMinimum": -50, "exclusiveMaximum": 60},
                                    "city": S})),
    ("a book", _obj({"title": S, "author": S, "year": {"type": "integer", "minimum": 1400, "maximum": 2030},
                     "genre": {"enum": ["fiction", "science", "history"]},
                     "available": {"type": "boolean"}})),
]


@pytest.mark.slow
def test_json_schemas_always_validate(client) -> None:  # noqa: ANN001
    def one(item: tuple[str, dict]) -> tuple[str, object]:
        what, schema = item
        r = client.chat.completions.create(
            model=NAME, messages=[{"role": "user", "content": f"Give me {what} as JSON."}], max_tokens=120,
            temperature=0, response_format={"type": "json_schema",
                                            "json_schema": {"name": "out", "schema": schema, "strict": True}})
        return r.choices[0].finish_reason, json.loads(r.choices[0].message.content)

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, SCHEMAS))
    for (what, schema), (reason, value) in zip(SCHEMAS, results):
        assert reason == "stop", what
        jsonschema.validate(value, schema)


def test_json_object_and_invalid_schema(client) -> None:  # noqa: ANN001
    r = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "A JSON object with a key "
                                                                                        "'ok' set to true."}],
                                       max_tokens=30, temperature=0, response_format={"type": "json_object"})
    assert isinstance(json.loads(r.choices[0].message.content), dict)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=NAME, messages=WEATHER_Q, max_tokens=5, response_format={
            "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "properties": {
                "a": {"type": "integr"}}}}})
    assert "integr" in str(e.value)


# --- load ------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_concurrent_streams_match_sequential(client) -> None:  # noqa: ANN001
    prompts = [f"Write one sentence about the number {i}." for i in range(8)]

    def run(prompt: str) -> str:
        stream = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": prompt}],
                                                max_tokens=10, temperature=0, stream=True)
        return "".join(c.choices[0].delta.content or "" for c in stream if c.choices)

    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(run, prompts))
    alone = [run(p) for p in prompts[:3]]
    assert all(together)
    assert together[:3] == alone


# --- bad input -------------------------------------------------------------------------------------
def test_bad_input_keeps_serving(client, live_server) -> None:  # noqa: ANN001
    url = live_server + "/v1/chat/completions"
    msg = [{"role": "user", "content": "hi"}]

    def err(response: httpx.Response, status: int, needle: str) -> None:
        assert response.status_code == status, response.text
        assert needle in response.json()["error"]["message"]

    err(httpx.post(url, content=b"{nope", headers={"content-type": "application/json"}), 400, "JSON")
    err(httpx.post(url, json={"model": NAME, "messages": "hi"}), 400, "messages")
    err(httpx.post(url, json={"model": NAME, "messages": []}), 400, "messages")
    err(httpx.post(url, json={"model": NAME, "messages": [{"role": "robot", "content": "x"}]}), 400, "role")
    err(httpx.post(url, json={"model": NAME, "messages": msg, "max_tokens": 10**9}), 400, "1000000000")
    err(httpx.post(url, json={"model": NAME, "messages": msg, "temperature": -0.5}), 400, "temperature")
    err(httpx.post(url, json={"model": "nope", "messages": msg}), 404, "nope")
    huge = [{"role": "user", "content": "word " * 200_000}]  # ~1 MB
    err(httpx.post(url, json={"model": NAME, "messages": huge}, timeout=120), 400, "maximum context length")
    # a client that disconnects mid-stream is aborted and the server carries on
    with httpx.stream("POST", url, json={"model": NAME, "messages": msg, "stream": True, "max_tokens": 200},
                      timeout=60) as r:
        for i, _ in enumerate(r.iter_lines()):
            if i >= 4:
                break
    time.sleep(1.0)
    metrics = httpx.get(live_server + "/metrics").text
    aborted = [line for line in metrics.splitlines() if line.startswith("qwen25_requests_aborted_total")]
    assert aborted and float(aborted[0].split()[-1]) >= 1
    r = client.chat.completions.create(model=NAME, messages=msg, max_tokens=3, temperature=0)
    assert r.choices[0].message.content
    assert httpx.get(live_server + "/health").status_code == 200


def test_concurrent_disconnects_do_not_leak(client, live_server) -> None:  # noqa: ANN001
    """Several clients drop mid-stream at once; afterwards nothing is left running in the engine."""
    def drop() -> None:
        with httpx.stream("POST", live_server + "/v1/chat/completions", timeout=60, json={
                "model": NAME, "messages": [{"role": "user", "content": "Count to fifty."}], "stream": True,
                "max_tokens": 100}) as r:
            for i, _ in enumerate(r.iter_lines()):
                if i >= 3:
                    break

    threads = [threading.Thread(target=drop) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        metrics = httpx.get(live_server + "/metrics").text
        running = [line for line in metrics.splitlines() if line.startswith("qwen25_engine_num_running ")]
        if running and float(running[0].split()[-1]) == 0:
            break
        time.sleep(0.5)
    else:
        pytest.fail("aborted requests are still running")
