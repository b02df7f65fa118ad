"""Speculative decoding served: an app built with a speculative_config answers greedy requests through the HTTP
API exactly as the plain app does (blocking and streaming, chat and completions), and its engine drafted."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from qwen25.checkpoint import load  # noqa: E402
from qwen25.server.app import create_app_from_checkpoint  # noqa: E402

REQUESTS = [
    ("/v1/completions", {"prompt": "def add(a, b):\n    return a + b\n\ndef add(a, b):", "max_tokens": 24,
                         "temperature": 0, "ignore_eos": True}),
    ("/v1/completions", {"prompt": "hello hello hello hello", "max_tokens": 20, "temperature": 0, "n": 2,
                         "stop": ["e"]}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "repeat: a b c a b c a b c"}],
                              "max_tokens": 16, "temperature": 0}),
]


def answers(client: TestClient, path: str, body: dict, stream: bool) -> list:  # noqa: ANN001
    r = client.post(path, json={"model": "tiny", **body, "stream": stream})
    assert r.status_code == 200, r.text
    if not stream:
        return [(c.get("text") or c["message"]["content"], c["finish_reason"]) for c in r.json()["choices"]]
    chunks = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
    texts: dict[int, str] = {}
    finish: dict[int, str] = {}
    for chunk in chunks:
        for c in chunk["choices"]:
            texts[c["index"]] = texts.get(c["index"], "") + (c.get("text") or c.get("delta", {}).get("content") or "")
            if c.get("finish_reason"):
                finish[c["index"]] = c["finish_reason"]
    return [(texts[i], finish.get(i)) for i in sorted(texts)]


@pytest.mark.parametrize("config", [{"method": "ngram", "num_speculative_tokens": 3},
                                    {"method": "ngram", "num_speculative_tokens": 5, "prompt_lookup_min": 2}])
def test_speculative_server_equals_plain_greedy(tiny_hf_dir, config) -> None:  # noqa: ANN001
    checkpoint = load(tiny_hf_dir)
    plain_app = create_app_from_checkpoint(checkpoint, served_model_name="tiny", max_concurrency=4)
    spec_app = create_app_from_checkpoint(checkpoint, served_model_name="tiny", max_concurrency=4,
                                          speculative_config=config)
    with TestClient(plain_app) as plain, TestClient(spec_app) as spec:
        for path, body in REQUESTS:
            for stream in (False, True):
                assert answers(spec, path, body, stream) == answers(plain, path, body, stream), (path, stream)
        drafted = metric(spec.get("/metrics").text, "qwen25_engine_spec_drafted_tokens")
        assert metric(plain.get("/metrics").text, "qwen25_engine_spec_drafted_tokens") == 0
    assert drafted > 0  # the engine speculated (a random tiny model accepts few drafts; the real one: slow tests)


def metric(text: str, name: str) -> float:
    values = [float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " ")]
    assert values, f"{name} is not in /metrics"
    return values[0]
