"""Auth and exposure at start-up: an empty API key is an error unless --no-api-key says so, a non-loopback bind
without a key warns loudly, the limit flags reach the app, /docs and /openapi.json sit behind the key (or are
off), and create_app refuses an empty key itself. `qwen25 serve` runs with the app factory and uvicorn stubbed."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from fastapi.testclient import TestClient  # noqa: E402

from qwen25 import cli  # noqa: E402
from qwen25.sampling_params import SamplingParams  # noqa: E402
from qwen25.server.app import ServerConfig, create_app  # noqa: E402
from qwen25.server.serve_args import is_loopback, serve_api_key  # noqa: E402
from server_fakes import ScriptedEngine, byte_tokenizer  # noqa: E402


@pytest.fixture
def served(monkeypatch) -> dict[str, Any]:  # noqa: ANN001
    """Run `qwen25 serve` without a model or a socket: what reached create_app_from_checkpoint and uvicorn.run."""
    import uvicorn

    import qwen25.server.app as app_module

    seen: dict[str, Any] = {}
    monkeypatch.delenv("QWEN25_API_KEY", raising=False)
    monkeypatch.setattr(cli.ServeConfig, "load", lambda self: SimpleNamespace(checkpoint="ckpt", path="m.gguf"))
    monkeypatch.setattr(app_module, "create_app_from_checkpoint", lambda checkpoint, **kw: seen.update(kw) or "app")
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: seen.update(run=kw))
    return seen


def test_an_empty_key_is_an_error_at_start_up(served, monkeypatch, capsys) -> None:  # noqa: ANN001
    assert cli.main(["serve", "--api-key", ""]) == 1
    assert "--no-api-key" in capsys.readouterr().err and not served
    monkeypatch.setenv("QWEN25_API_KEY", "  ")
    assert cli.main(["serve"]) == 1
    assert "API key is empty" in capsys.readouterr().err and not served


def test_no_api_key_is_explicit(served, monkeypatch, capsys) -> None:  # noqa: ANN001
    monkeypatch.setenv("QWEN25_API_KEY", "")
    assert cli.main(["serve", "--no-api-key"]) == 0 and served["api_key"] is None
    monkeypatch.setenv("QWEN25_API_KEY", "real")
    assert cli.main(["serve", "--no-api-key"]) == 1
    assert "contradicts" in capsys.readouterr().err


def test_the_key_from_the_environment(served, monkeypatch) -> None:  # noqa: ANN001
    monkeypatch.setenv("QWEN25_API_KEY", "from-env")
    assert cli.main(["serve"]) == 0 and served["api_key"] == "from-env"


@pytest.mark.parametrize("host,key,warned", [("0.0.0.0", None, True), ("192.168.1.5", None, True),
                                             ("::", None, True), ("0.0.0.0", "k", False), ("127.0.0.1", None, False),
                                             ("localhost", None, False), ("::1", None, False),
                                             ("127.0.0.2", None, False)])
def test_binding_beyond_loopback_without_a_key_warns(served, capsys, host: str, key: str | None,  # noqa: ANN001
                                                     warned: bool) -> None:
    argv = ["serve", "--host", host] + (["--api-key", key] if key else [])
    assert cli.main(argv) == 0 and served["run"]["host"] == host
    assert ("WARNING" in capsys.readouterr().err) == warned


def test_limit_flags_reach_the_app(served, capsys) -> None:  # noqa: ANN001
    assert cli.main(["serve", "--max-n", "4", "--max-body-size", "1000", "--max-stop-length", "9", "--no-docs"]) == 0
    limits = served["limits"]
    assert (limits.max_n, limits.max_body_bytes, limits.max_stop_chars, limits.max_tools) == (4, 1000, 9, 128)
    assert served["docs"] is False
    assert cli.main(["serve", "--max-tools", "0"]) == 1 and "max_tools" in capsys.readouterr().err


def test_helpers() -> None:
    assert serve_api_key(None, False) is None and serve_api_key("k", False) == "k" and serve_api_key("", True) is None
    with pytest.raises(ValueError, match="empty"):
        serve_api_key("", False)
    assert is_loopback("127.0.0.1") and is_loopback("[::1]") and not is_loopback("example.com")


def make_app(**config: Any) -> TestClient:
    tokenizer = byte_tokenizer()
    cfg = ServerConfig("m", 4096, tokenizer.vocab_size, SamplingParams(temperature=0), sorted(tokenizer.stop_token_ids),
                       **config)
    return TestClient(create_app(ScriptedEngine(tokenizer), tokenizer, cfg))


def test_create_app_refuses_an_empty_key() -> None:
    with pytest.raises(ValueError, match="empty"):
        make_app(api_key="")


def test_docs_behind_the_key_or_off() -> None:
    with make_app(api_key="k") as client:
        assert client.get("/docs").status_code == 401 and client.get("/openapi.json").status_code == 401
        assert client.get("/redoc").status_code == 401
        headers = {"authorization": "Bearer k"}
        assert client.get("/docs", headers=headers).status_code == 200
        document = client.get("/openapi.json", headers=headers).json()
        body = document["paths"]["/v1/chat/completions"]["post"]["requestBody"]
        assert body["content"]["application/json"]["schema"]["$ref"].endswith("/ChatCompletionRequest")
        assert "ChatMessage" in document["components"]["schemas"]
        assert client.get("/health").status_code == 200  # health, metrics and the chat page stay open
        assert client.get("/metrics").status_code == 200
    with make_app(docs=False) as client:
        for path in ("/docs", "/openapi.json", "/redoc"):
            r = client.get(path)
            assert r.status_code == 404 and set(r.json()) == {"error"}
