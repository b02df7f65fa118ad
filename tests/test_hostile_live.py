"""The hostile cases against a live `qwen25 serve` (the real Qwen2.5-Coder-0.5B GGUF, a key, a 1 MiB body limit) in
the slow suite: a subset of tests/test_hostile.py's CASES over real HTTP, each followed by a normal request, plus a
client leaving a list of prompts (every one aborted, the queue empty again) and forced control-token text."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("llguidance")

from test_hostile import CASES, KEY, LIMITS, MODEL, Case, assert_envelope  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.real_model]
LIVE = ["json-truncated", "json-empty-body", "json-top-level-list", "json-nan", "number-overflows-float",
        "number-5000-digits", "utf8-invalid-byte", "utf8-overlong", "utf16-body", "surrogate-in-content",
        "surrogate-in-model", "surrogate-in-tokenize", "nesting-10000-body", "nesting-in-tool-call-arguments",
        "temperature-too-high", "top-k-huge", "n-negative-huge", "max-tokens-huge", "logit-bias-key-5000-digits",
        "logit-bias-unicode-digit-key", "template-kwargs-messages", "template-kwargs-add-generation-prompt",
        "body-over-limit", "body-over-limit-chunked", "stop-17-strings", "stop-string-too-long", "n-17",
        "prompts-257", "schema-required-recursive-ref", "lark-never-ends", "tool-name-markup",
        "tool-parameters-a-string-schema", "tool-required-recursive-parameters", "unknown-route", "unknown-model",
        "get-on-post-route", "no-key", "wrong-key", "made-up-path-unauthenticated", "docs-without-key"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serving(model: Path, log: Path) -> Iterator[str]:
    port = free_port()
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "QWEN25_API_KEY": KEY}
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "qwen25.cli", "serve", "--model", str(model), "--port",
                                 str(port), "--served-model-name", MODEL, "--threads", "2", "--log-level", "warning",
                                 "--max-body-size", str(LIMITS.max_body_bytes)], stdout=out,
                                stderr=subprocess.STDOUT, env=env)
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


@pytest.fixture(scope="module")
def live(real_gguf: Path, tmp_path_factory) -> Iterator[str]:  # noqa: ANN001
    with serving(real_gguf, tmp_path_factory.mktemp("hostile") / "serve.log") as url:
        yield url


AUTH = {"authorization": f"Bearer {KEY}"}


def send(url: str, c: Case):  # noqa: ANN201
    headers = {"content-type": "application/json", **({} if c.keyed else AUTH), **c.headers}
    if c.id == "body-over-limit-chunked":
        return httpx.post(url + c.path, content=iter([b" " * 65536] * 40), headers=headers, timeout=60)
    content = c.content if c.content is not None else json.dumps(c.json).encode() if c.json is not None else None
    return httpx.request(c.method, url + c.path, content=content, headers=headers, timeout=120)


def normal(url: str) -> None:
    r = httpx.post(url + "/v1/chat/completions", headers=AUTH, timeout=120, json={
        "model": MODEL, "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 2, "temperature": 0})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1, r.text


@pytest.mark.parametrize("c", [c for c in CASES if c.id in LIVE], ids=lambda c: c.id)
def test_hostile_request_live(live: str, c: Case) -> None:
    assert_envelope(send(live, c), c.status, c.needle, c.code)
    normal(live)


def test_live_subset_is_complete() -> None:
    assert len(LIVE) == len({c.id for c in CASES} & set(LIVE)) >= 40


def test_a_prompt_list_is_aborted_when_its_client_leaves(live: str) -> None:
    body = {"model": MODEL, "prompt": [f"Count to a thousand, take {i}:" for i in range(40)], "max_tokens": 2000,
            "temperature": 0, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(live + "/v1/completions", json=body, headers=AUTH, timeout=3)
    deadline = time.monotonic() + 30
    while (q := httpx.get(live + "/health").json()["queue"])["running"] + q["waiting"] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert q["running"] == 0 and q["waiting"] == 0, q
    assert "qwen25_requests_aborted_total 40" in httpx.get(live + "/metrics").text
    normal(live)


def test_forced_control_token_text_is_plain(live: str) -> None:
    r = httpx.post(live + "/v1/chat/completions", headers=AUTH, timeout=120, json={
        "model": MODEL, "messages": [{"role": "user", "content": "Write anything."}], "max_tokens": 30,
        "guided_regex": r"<tool_call>ok", "logprobs": True, "skip_special_tokens": False})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["message"]["content"] == "<tool_call>ok" and choice["message"]["tool_calls"] is None
    assert len(choice["logprobs"]["content"]) > 2  # spelled with plain tokens, not the one control token
