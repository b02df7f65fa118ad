"""n choices through the server: one engine request per prompt carries the n samples (one prefill), its outputs
are routed to choices by `StepOutput.index` (choice = prompt * n + index), streaming and blocking agree, usage
counts each prompt once, aborting the request ends every sample; requests with logits processors (grammars,
logit_bias) and n > 1 are split into n single-sample requests with fresh processors. On the scripted engine of
`server_fakes`, and on the real `LLMEngine` with a tiny model (the prompt is computed once)."""

from __future__ import annotations

import asyncio
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
from qwen25.server.async_engine import AsyncEngine, Overloaded  # noqa: E402

MODEL = "test-model"


@pytest.fixture
def served() -> Iterator[tuple[TestClient, ScriptedEngine]]:
    tokenizer = byte_tokenizer()
    engine = ScriptedEngine(tokenizer, lambda prompt: "abcdefgh", confidence=1.0)
    config = ServerConfig(MODEL, 4096, tokenizer.vocab_size, SamplingParams(temperature=0),
                          sorted(tokenizer.stop_token_ids))
    with TestClient(create_app(engine, tokenizer, config)) as c:
        yield c, engine


def events(response) -> list[dict[str, Any]]:  # noqa: ANN001
    assert response.status_code == 200, response.text
    data = [line[6:] for line in response.text.split("\n") if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    return [json.loads(d) for d in data[:-1]]


def streamed_choices(chunks: list[dict[str, Any]]) -> dict[int, tuple[str, list[str]]]:
    """index -> (text, finish reasons seen) from completion or chat chunks."""
    out: dict[int, tuple[str, list[str]]] = {}
    for chunk in chunks:
        for c in chunk["choices"]:
            text, reasons = out.get(c["index"], ("", []))
            piece = c.get("text") or (c.get("delta") or {}).get("content") or ""
            out[c["index"]] = (text + piece, reasons + ([c["finish_reason"]] if c["finish_reason"] else []))
    return out


def metric(text: str, line_start: str) -> float:
    values = [float(line.split()[-1]) for line in text.splitlines() if line.startswith(line_start)]
    assert values, f"{line_start} is not in /metrics"
    return values[0]


# --- scripted engine -------------------------------------------------------------------------------
def test_one_engine_request_per_prompt_routed_by_index(served) -> None:  # noqa: ANN001
    client, engine = served
    body = {"model": MODEL, "prompt": ["ab", "xyz"], "n": 3, "seed": 5, "temperature": 1.5, "max_tokens": 6}
    plain = client.post("/v1/completions", json=body).json()
    added = engine.added[-2:]
    assert [(ids, p.n, p.seed) for _, ids, p in added] == [([97, 98], 3, 5), ([120, 121, 122], 3, 5)]
    assert [c["index"] for c in plain["choices"]] == list(range(6))
    assert plain["usage"]["prompt_tokens"] == 5  # each prompt once, not once per choice
    assert plain["usage"]["completion_tokens"] == 6 * 6
    streamed = streamed_choices(events(client.post("/v1/completions", json={
        **body, "stream": True, "stream_options": {"include_usage": True}})))
    assert {i: text for i, (text, _) in streamed.items()} == {c["index"]: c["text"] for c in plain["choices"]}
    assert all(reasons == ["length"] for _, reasons in streamed.values())
    # each choice equals its own request: prompt p, seed 5 + k
    for i, choice in enumerate(plain["choices"]):
        single = client.post("/v1/completions", json={**body, "prompt": body["prompt"][i // 3], "n": 1,
                                                      "seed": 5 + i % 3}).json()
        assert single["choices"][0]["text"] == choice["text"], i


def test_per_choice_finish_reasons_and_metrics(served) -> None:  # noqa: ANN001
    client, _ = served
    before = client.get("/metrics").text
    body = chat_body(n=4, seed=1, temperature=1.5, max_tokens=5, stop=["c"])
    plain = client.post("/v1/chat/completions", json=body).json()
    reasons = [c["finish_reason"] for c in plain["choices"]]
    assert set(reasons) <= {"stop", "length"} and len(reasons) == 4
    streamed = streamed_choices(events(client.post("/v1/chat/completions", json={**body, "stream": True})))
    assert [streamed[i][1] for i in range(4)] == [[r] for r in reasons]
    after = client.get("/metrics").text
    finished = sum(metric(after, f'qwen25_request_finished_total{{reason="{r}"}}')
                   - (metric(before, f'qwen25_request_finished_total{{reason="{r}"}}')
                      if f'reason="{r}"' in before else 0) for r in set(reasons))
    assert finished == 8  # per choice, as before
    prompt = plain["usage"]["prompt_tokens"]
    assert (metric(after, "qwen25_prompt_tokens_total") - metric(before, "qwen25_prompt_tokens_total")
            == 2 * prompt)  # once per request, not per choice


def chat_body(**body: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], **body}


def test_logits_processors_with_n_are_split_into_single_sample_requests(served) -> None:  # noqa: ANN001
    client, engine = served
    before = len(engine.added)
    body = {"model": MODEL, "prompt": "q", "n": 3, "seed": 7, "temperature": 1.5, "max_tokens": 5,
            "guided_choice": ["up", "down", "left"]}
    plain = client.post("/v1/completions", json=body).json()
    added = engine.added[before:]
    assert [(p.n, p.seed) for _, _, p in added] == [(1, 7), (1, 8), (1, 9)]
    grammars = [p.logits_processors[-1] for _, _, p in added]
    assert len({id(g) for g in grammars}) == 3  # a fresh (stateful) matcher per sample
    assert all(c["text"] in ("up", "down", "left") for c in plain["choices"])
    assert [c["index"] for c in plain["choices"]] == [0, 1, 2]
    # logit_bias alone splits too; n == 1 with processors stays one request
    client.post("/v1/completions", json={**body, "guided_choice": None, "logit_bias": {"120": 5.0}, "n": 2})
    assert [(p.n, p.seed, len(p.logits_processors)) for _, _, p in engine.added[-2:]] == [(1, 7, 1), (1, 8, 1)]
    count = len(engine.added)
    client.post("/v1/completions", json={**body, "n": 1})
    assert len(engine.added) == count + 1 and engine.added[-1][2].n == 1


def test_a_stream_carries_every_sample_and_aborting_it_ends_them_all() -> None:
    tokenizer = byte_tokenizer()
    engine = ScriptedEngine(tokenizer, lambda prompt: "x" * 50, step_delay=0.005)
    async_engine = AsyncEngine(engine, max_pending=4)
    params = SamplingParams(n=3, temperature=0, max_tokens=4)

    async def run() -> None:
        stream = await async_engine.add_request("whole", [97], params)
        assert async_engine.num_in_flight == 3  # admission counts samples
        outs = [out async for out in stream]
        assert sorted(o.index for o in outs if o.finish_reason) == [0, 1, 2]
        assert sum(len(o.new_token_ids) for o in outs) == 12
        with pytest.raises(Overloaded, match="capacity"):
            await async_engine.add_request("too-many", [97], SamplingParams(n=5))
        stream = await async_engine.add_request("cut", [97], SamplingParams(n=3, temperature=0, max_tokens=40))
        seen = set()
        async for out in stream:
            seen.add(out.index)
            if len(seen) == 3:
                break  # leaving early aborts the request: all three samples
        for _ in range(100):
            if not engine.has_unfinished_requests():
                break
            await asyncio.sleep(0.01)
        assert engine.aborted == ["cut"] and not engine.has_unfinished_requests()
        assert async_engine.num_in_flight == 0

    async_engine.start()
    try:
        asyncio.run(run())
    finally:
        async_engine.shutdown()


# --- the real engine -------------------------------------------------------------------------------
def test_n_computes_the_prompt_once_on_a_real_model(tiny_hf_dir) -> None:  # noqa: ANN001
    """n=4 through the app is one engine request: the engine computes the prompt once plus every sample's
    decode steps, and choice k equals the same request with n=1 and seed + k (the server's old fan-out)."""
    from qwen25.checkpoint import load
    from qwen25.server.app import create_app_from_checkpoint

    checkpoint = load(tiny_hf_dir)
    body = {"model": "tiny", "prompt": "one two three four five six seven eight nine ten", "max_tokens": 8,
            "temperature": 0.9, "seed": 11, "ignore_eos": True}
    app = create_app_from_checkpoint(checkpoint, served_model_name="tiny", max_concurrency=4)
    with TestClient(app) as client:
        engine = app.state.async_engine.engine
        before = engine.num_computed_tokens
        plain = client.post("/v1/completions", json={**body, "n": 4}).json()
        computed = engine.num_computed_tokens - before
        streamed = streamed_choices(events(client.post("/v1/completions", json={**body, "n": 4, "stream": True})))
    usage = plain["usage"]
    decode = sum(8 - 1 for _ in plain["choices"])  # the first token of each sample comes from the prefill
    assert usage["completion_tokens"] == 4 * 8
    assert computed == usage["prompt_tokens"] + decode
    texts = [c["text"] for c in plain["choices"]]
    assert {i: t for i, (t, _) in streamed.items()} == dict(enumerate(texts))
    assert len(set(texts)) > 1
    # the old fan-out: n separate single-sample requests seeded seed + k (own engine, no prefix-cache reuse)
    app = create_app_from_checkpoint(checkpoint, served_model_name="tiny", max_concurrency=4,
                                     enable_prefix_caching=False)
    with TestClient(app) as client:
        singles = [client.post("/v1/completions", json={**body, "seed": 11 + k}).json()["choices"][0]["text"]
                   for k in range(4)]
    assert singles == texts
