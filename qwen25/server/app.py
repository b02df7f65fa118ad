"""The OpenAI-compatible HTTP server: `create_app(engine, tokenizer, config)` returns a FastAPI app.

Owns the routes (/v1/models, /v1/chat/completions, /v1/completions, /tokenize, /detokenize, /health, /metrics and
the chat page at /) and the app's wiring: the engine is anything with the `LLMEngine` step API, driven by
`AsyncEngine`; `server.planner` turns a request into a plan, `server.pipeline` runs it and `server.renderers`
shape the output; errors (`server.errors`) and the API-key check (`server.middleware`) are installed here.
Errors: a bad request is a 400 naming the field, a body over the limit 413, an unknown model 404, a missing/wrong
key 401, a full server 429, an engine failure 500 for the requests it hit; no request can take the server down.
Request bodies are read and validated by `server.body` (size limit, off the event loop) and bounded by
`server.limits` before the planner sees them. /health reports the queue and whether new work can be admitted.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response

from qwen25.server import structured as so
from qwen25.server.async_engine import AsyncEngine
from qwen25.server.body import BodySchemas, parse_body
from qwen25.server.config import Limits, ServerConfig
from qwen25.server.errors import APIError, bad_request, install_error_handlers
from qwen25.server.metrics import ServerMetrics
from qwen25.server.middleware import AuthAndCount
from qwen25.server.pipeline import Generation, Renderer, sse, submit
from qwen25.server.planner import Plan, RequestPlanner
from qwen25.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    ModelCard,
    ModelList,
    TokenizeRequest,
    error_body,
    random_id,
)
from qwen25.server.renderers import ChatRenderer, CompletionRenderer

STATIC_DIR = Path(__file__).parent / "static"


def create_app(engine: Any, tokenizer: Any, config: ServerConfig, prewarm: bool = False) -> FastAPI:
    """A FastAPI app serving `engine` (the LLMEngine step API) for the model `config.model_name`.

    prewarm: build the llguidance tokenizer (~1.5 s) in the background at startup instead of on the first
    structured-output request. An empty `config.api_key` is refused (None means no key)."""
    if config.api_key is not None and not config.api_key.strip():
        raise ValueError("the API key is empty: set a real key, or serve without one explicitly (--no-api-key)")
    limits = config.limits
    async_engine = AsyncEngine(engine, max_pending=config.max_pending)
    structured = so.StructuredOutputs(tokenizer, config.vocab_size, config.stop_token_ids)
    metrics = ServerMetrics(running=lambda: async_engine.num_in_flight - async_engine.num_waiting,
                            waiting=lambda: async_engine.num_waiting, engine_stats=engine.stats)
    planner = RequestPlanner(tokenizer, config, structured)
    names = {config.model_name, *config.aliases}

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async_engine.start()
        if prewarm:
            threading.Thread(target=lambda: structured.ll_tokenizer, name="qwen25-llg-init", daemon=True).start()
        yield
        async_engine.shutdown()

    docs = {} if config.docs else {"docs_url": None, "redoc_url": None, "openapi_url": None}
    app = FastAPI(title="qwen25", version="0.1.0", lifespan=lifespan, **docs)
    body_schema = BodySchemas(app)
    app.state.async_engine = async_engine
    install_error_handlers(app)
    app.add_middleware(AuthAndCount, api_key=config.api_key, metrics=metrics)

    def model_card() -> ModelCard:
        return ModelCard(id=config.model_name, root=config.model_name, max_model_len=config.max_model_len)

    def check_model(model: str) -> None:
        if model not in names:
            raise APIError(404, f"The model '{model}' does not exist; this server serves '{config.model_name}'",
                           "not_found_error", "model", "model_not_found")

    async def generate(plan: Plan, renderer: Renderer, req: ChatCompletionRequest | CompletionRequest,
                       request: Request, started: float) -> Response:
        """Submit the plan; answer with the whole response, or stream it when the request asks to."""
        request_id = random_id(renderer.id_prefix)
        submission = await submit(async_engine, structured, plan, request_id)
        run = Generation(submission, renderer, plan, request_id, config.model_name, metrics, started)
        if req.stream:
            return sse(run.events(include_usage=bool(req.stream_options and req.stream_options.include_usage)))
        return JSONResponse((await run.response(request)).model_dump())

    @app.get("/health")
    async def health() -> Response:
        """200 while new work is admitted; 503 when the engine thread is dead or the server is at capacity (new
        requests would get a 429). The body shows the queue: what runs, what waits and why."""
        if not async_engine.is_alive:
            return JSONResponse(error_body("engine thread is not running", "server_error"), status_code=503)
        state = async_engine.state()
        return JSONResponse(state, status_code=200 if state["admitting"] else 503)

    @app.get("/metrics")
    async def get_metrics() -> Response:
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def list_models() -> ModelList:
        return ModelList(data=[model_card()])

    @app.get("/v1/models/{model:path}")
    async def get_model(model: str) -> ModelCard:
        check_model(model)
        return model_card()

    @app.post("/v1/chat/completions", openapi_extra=body_schema(ChatCompletionRequest))
    async def chat_completions(request: Request) -> Response:
        started = time.monotonic()
        req = await parse_body(request, ChatCompletionRequest, limits)
        check_model(req.model)
        plan = await planner.chat(req)
        return await generate(plan, ChatRenderer(tokenizer, plan), req, request, started)

    @app.post("/v1/completions", openapi_extra=body_schema(CompletionRequest))
    async def completions(request: Request) -> Response:
        started = time.monotonic()
        req = await parse_body(request, CompletionRequest, limits)
        check_model(req.model)
        plan = await planner.completion(req)
        return await generate(plan, CompletionRenderer(tokenizer, plan), req, request, started)

    @app.post("/tokenize", openapi_extra=body_schema(TokenizeRequest))
    async def tokenize(request: Request) -> dict[str, Any]:
        req = await parse_body(request, TokenizeRequest, limits)
        if req.model is not None:
            check_model(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise bad_request("give exactly one of prompt or messages", "prompt")
        if req.messages is not None:
            tools = [t.model_dump(exclude_none=True) for t in req.tools] if req.tools else None
            if tools and len(tools) > limits.max_tools:
                raise bad_request(f"at most {limits.max_tools} tools, got {len(tools)}", "tools")
            text = await asyncio.to_thread(planner.render, [m.model_dump(exclude_none=True) for m in req.messages],
                                           tools, req.add_generation_prompt)
        else:
            text = req.prompt or ""
        ids = await planner.encode(text)
        return {"count": len(ids), "max_model_len": config.max_model_len, "tokens": ids}

    @app.post("/detokenize", openapi_extra=body_schema(DetokenizeRequest))
    async def detokenize(request: Request) -> dict[str, Any]:
        req = await parse_body(request, DetokenizeRequest, limits)
        if req.model is not None:
            check_model(req.model)
        bad = [t for t in req.tokens if not 0 <= t < config.vocab_size]
        if bad:
            raise bad_request(f"token ids out of range [0, {config.vocab_size}): {bad[:5]}", "tokens")
        return {"prompt": tokenizer.decode(req.tokens)}

    @app.get("/", include_in_schema=False)
    async def index() -> Response:
        page = STATIC_DIR / "index.html"
        if not page.is_file():
            return PlainTextResponse("qwen25 server: the chat page is not installed", status_code=404)
        return FileResponse(page, media_type="text/html")

    return app


def create_app_from_checkpoint(checkpoint: Any, *, served_model_name: str, aliases: Sequence[str] = (),
                               api_key: str | None = None, max_concurrency: int = 8, max_queue: int = 64,
                               allow_special_tokens_in_content: bool = False,
                               limits: Limits | None = None, docs: bool = True, **engine_settings: Any) -> FastAPI:
    """The app for a loaded `qwen25.checkpoint.Checkpoint`: its model on `LLMEngine` (continuous batching;
    grammars and logit_bias ride along as per-request `SamplingParams.logits_processors`). engine_settings are
    `LLMEngine.from_checkpoint`'s keyword arguments (speculative_config among them), passed through unfiltered."""
    from qwen25.checkpoint import default_sampling_params, stop_token_ids
    from qwen25.engine.engine import LLMEngine

    engine = LLMEngine.from_checkpoint(checkpoint, max_num_seqs=max_concurrency, **engine_settings)
    config = ServerConfig(model_name=served_model_name, max_model_len=engine.max_model_len,
                          vocab_size=checkpoint.config.vocab_size,
                          default_params=default_sampling_params(checkpoint),
                          stop_token_ids=sorted(stop_token_ids(checkpoint)), api_key=api_key,
                          max_pending=max_concurrency + max_queue, limits=limits or Limits(), docs=docs,
                          aliases=[a for a in aliases if a != served_model_name],
                          allow_special_tokens_in_content=allow_special_tokens_in_content)
    return create_app(engine, checkpoint.tokenizer, config, prewarm=True)


__all__ = ["APIError", "Limits", "ServerConfig", "create_app", "create_app_from_checkpoint"]
