"""The server over real HTTP (uvicorn on 127.0.0.1, scripted engine): the official `openai` client end to end,
client disconnects aborting their requests, and the chat page in headless Chromium (skipped without it)."""

from __future__ import annotations

import json
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from qwen25.sampling_params import SamplingParams  # noqa: E402
from qwen25.server.app import ServerConfig, create_app  # noqa: E402
from server_fakes import ScriptedEngine, byte_tokenizer  # noqa: E402

MODEL = "scripted"
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
REPLY = ("Here is **quicksort** in Python:\n\n```python\ndef quicksort(xs):\n    if len(xs) <= 1:\n        return xs\n"
         "    p, *rest = xs\n    return quicksort([x for x in rest if x < p]) + [p] + "
         "quicksort([x for x in rest if x >= p])\n```\n\n- average `O(n log n)`\n- worst case `O(n^2)`")
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


def _script(prompt: str) -> str:
    if "<tools>" in prompt:
        return CALL
    if "quicksort" in prompt:
        return REPLY
    return "A long answer. " * 40


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[str, ScriptedEngine]]:
    tokenizer = byte_tokenizer()
    engine = ScriptedEngine(tokenizer, _script, step_delay=0.01)
    config = ServerConfig(MODEL, 4096, tokenizer.vocab_size, SamplingParams(temperature=0),
                          sorted(tokenizer.stop_token_ids))
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(create_app(engine, tokenizer, config), host="127.0.0.1", port=port,
                                        log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not srv.started and time.monotonic() < deadline:
        time.sleep(0.02)
    assert srv.started, "uvicorn did not start"
    yield f"http://127.0.0.1:{port}", engine
    srv.should_exit = True
    thread.join(10)


def test_openai_client(server) -> None:  # noqa: ANN001
    openai = pytest.importorskip("openai")
    url, _ = server
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused")
    assert [m.id for m in client.models.list()] == [MODEL]
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "quicksort please"}])
    assert r.choices[0].message.content == REPLY and r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens > 0
    stream = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "quicksort"}],
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == REPLY
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == r.usage.completion_tokens
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "weather?"}], tools=tools)
    (call,) = r.choices[0].message.tool_calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}
    c = client.completions.create(model=MODEL, prompt="Once", max_tokens=5)
    assert c.choices[0].text == "A lon" and c.choices[0].finish_reason == "length"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], temperature=-1)


def test_client_disconnect_aborts(server) -> None:  # noqa: ANN001
    url, engine = server
    body = {"model": MODEL, "messages": [{"role": "user", "content": "go on"}], "stream": True, "max_tokens": 500}
    with httpx.Client(timeout=10) as client, client.stream("POST", url + "/v1/chat/completions", json=body) as r:
        seen = 0
        for line in r.iter_lines():
            seen += line.startswith("data: ")
            if seen >= 5:
                break
    deadline = time.monotonic() + 5
    while not engine.aborted and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine.aborted, "the disconnected stream was not aborted"
    assert not engine.running and not engine.waiting
    # non-streaming requests are aborted too when their client goes away
    before = len(engine.aborted)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(url + "/v1/chat/completions", json={**body, "stream": False}, timeout=0.5)
    deadline = time.monotonic() + 5
    while len(engine.aborted) == before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(engine.aborted) > before
    assert httpx.get(url + "/health").status_code == 200


def _chromium() -> tuple[str, str] | None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


@pytest.mark.skipif(_chromium() is None, reason="headless Chromium + chromedriver not installed "
                                                  "(apt-get install chromium chromium-driver)")
def test_chat_page_in_headless_chromium(server) -> None:  # noqa: ANN001
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    url, _ = server
    browser, driver_path = _chromium()  # type: ignore[misc]
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run", "--disable-dev-shm-usage", "--window-size=1200,900"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=driver_path))
    try:
        driver.get(url + "/")
        wait = WebDriverWait(driver, 30)
        wait.until(lambda d: MODEL in d.find_element(By.ID, "model").text)
        driver.find_element(By.ID, "system").send_keys("You are terse.")
        driver.find_element(By.ID, "prompt").send_keys("Write quicksort in Python.")
        driver.find_element(By.ID, "send").click()
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".msg.assistant[data-done='true']"))
        reply = driver.find_element(By.CSS_SELECTOR, ".msg.assistant")
        code = reply.find_element(By.CSS_SELECTOR, "pre code").text
        assert code.startswith("def quicksort(xs):") and "return xs" in code
        assert reply.find_element(By.CSS_SELECTOR, "strong").text == "quicksort"
        assert len(reply.find_elements(By.CSS_SELECTOR, "li code")) == 2
        stats = reply.find_element(By.CSS_SELECTOR, ".stats").text
        assert "tokens" in stats and "tok/s" in stats and "stop" in stats
        assert "error" not in reply.get_attribute("class")
        ARTIFACTS.mkdir(exist_ok=True)
        driver.save_screenshot(str(ARTIFACTS / "chat_page.png"))
    finally:
        driver.quit()
