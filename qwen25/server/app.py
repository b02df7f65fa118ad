"""The OpenAI-compatible HTTP server: `create_app(engine, tokenizer, config)` returns a FastAPI app.

Owns the routes (/v1/models, /v1/chat/completions, /v1/completions, /tokenize, /detokenize, /health, /metrics and
the chat page at /), turning requests into engine work (chat template, tokenization, context checks, sampling
parameters, constraints), n>1 fan-out, SSE streaming, tool-call and logprob formatting, API-key checks and
OpenAI-shaped errors. The engine is anything with the `LLMEngine` step API; `AsyncEngine` drives it.
Errors: a bad request is a 400 naming the field, an unknown model 404, a missing/wrong key 401, a full server
429, an engine failure 500 for the requests it hit; no request can take the server down.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import secrets
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse

from qwen25.chat import render_chat
from qwen25.sampling_params import SamplingParams
from qwen25.server import structured as so
from qwen25.server.async_engine import AsyncEngine, EngineDead, Overloaded, RequestStream
from qwen25.server.metrics import ServerMetrics
from qwen25.server.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    DetokenizeRequest,
    FunctionCall,
    ModelCard,
    ModelList,
    SamplingFields,
    TokenizeRequest,
    ToolCall,
    Usage,
    error_body,
    random_id,
)
from qwen25.chat.tool_parser import ToolCallDelta, ToolCallParser, collect

log = logging.getLogger("qwen25.server")
STATIC_DIR = Path(__file__).parent / "static"
LONG_TEXT = 20_000  # characters; longer prompts are tokenized off the event loop


@dataclass
class ServerConfig:
    model_name: str
    max_model_len: int
    vocab_size: int
    default_params: SamplingParams = field(default_factory=SamplingParams)
    stop_token_ids: Sequence[int] = ()
    api_key: str | None = None
    max_pending: int = 64
    aliases: Sequence[str] = ()


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code


def _bad(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


@dataclass
class _Choice:
    """The accumulated output of one engine request."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[tuple[float, list[tuple[int, float]]]] = field(default_factory=list)
    finish_reason: str | None = None
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    first_token_at: float | None = None

    def add(self, out: Any) -> None:
        if self.first_token_at is None and out.new_token_ids:
            self.first_token_at = time.monotonic()
        self.text += out.new_text
        self.token_ids += out.new_token_ids
        if out.logprobs:
            self.logprobs += out.logprobs
        self.finish_reason = out.finish_reason or self.finish_reason
        self.num_prompt_tokens = out.num_prompt_tokens
        self.num_output_tokens = out.num_output_tokens


@dataclass
class _Plan:
    """Everything decided about a generation request before it reaches the engine."""

    prompt_ids: list[list[int]]      # one entry per prompt (chat: exactly one)
    params: list[SamplingParams]     # one per choice of one prompt (n entries)
    grammar: str | None
    logit_bias: dict[int, float] | None
    tool_names: list[str] | None     # parse tool calls when set
    echo_texts: list[str] | None = None


def create_app(engine: Any, tokenizer: Any, config: ServerConfig, prewarm: bool = False) -> FastAPI:
    """A FastAPI app serving `engine` (the LLMEngine step API) for the model `config.model_name`.

    prewarm: build the llguidance tokenizer (~1.5 s) in the background at startup instead of on the first
    structured-output request."""
    async_engine = AsyncEngine(engine, max_pending=config.max_pending)
    structured = so.StructuredOutputs(tokenizer, config.vocab_size, config.stop_token_ids)
    metrics = ServerMetrics(running=lambda: async_engine.num_in_flight - async_engine.num_waiting,
                            waiting=lambda: async_engine.num_waiting, engine_stats=engine.stats)
    server = _Server(async_engine, tokenizer, config, structured, metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async_engine.start()
        if prewarm:
            threading.Thread(target=lambda: structured.ll_tokenizer, name="qwen25-llg-init", daemon=True).start()
        yield
        async_engine.shutdown()

    app = FastAPI(title="qwen25", version="0.1.0", lifespan=lifespan)
    app.state.server = server
    app.state.async_engine = async_engine

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError) -> JSONResponse:
        return JSONResponse(error_body(e.message, e.type, e.param, e.code), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, e: RequestValidationError) -> JSONResponse:
        message, param = _describe_validation(e.errors())
        return JSONResponse(error_body(message, param=param), status_code=400)

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, e: Exception) -> JSONResponse:
        log.exception("unhandled error on %s", request.url.path)
        return JSONResponse(error_body(f"internal error: {type(e).__name__}: {e}", "server_error"), status_code=500)

    app.add_middleware(_AuthAndCount, api_key=config.api_key, metrics=metrics)

    @app.get("/health")
    async def health() -> Response:
        if not async_engine.is_alive:
            return JSONResponse(error_body("engine thread is not running", "server_error"), status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def get_metrics() -> Response:
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def list_models() -> ModelList:
        return ModelList(data=[server.model_card()])

    @app.get("/v1/models/{model:path}")
    async def get_model(model: str) -> ModelCard:
        server.check_model(model)
        return server.model_card()

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest, request: Request) -> Response:
        return await server.chat(req, request)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request) -> Response:
        return await server.complete(req, request)

    @app.post("/tokenize")
    async def tokenize(req: TokenizeRequest) -> dict[str, Any]:
        return await server.tokenize(req)

    @app.post("/detokenize")
    async def detokenize(req: DetokenizeRequest) -> dict[str, Any]:
        if req.model is not None:
            server.check_model(req.model)
        bad = [t for t in req.tokens if not 0 <= t < config.vocab_size]
        if bad:
            raise _bad(f"token ids out of range [0, {config.vocab_size}): {bad[:5]}", "tokens")
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
                               **engine_settings: Any) -> FastAPI:
    """The app for a loaded `qwen25.checkpoint.Checkpoint`: its model on `LLMEngine` (continuous batching;
    grammars and logit_bias ride along as per-request `SamplingParams.logits_processors`). engine_settings are
    `LLMEngine`'s keyword arguments (speculative_config among them)."""
    from qwen25.checkpoint import default_sampling_params, stop_token_ids
    from qwen25.engine.engine import LLMEngine

    engine = LLMEngine.from_checkpoint(checkpoint, max_num_seqs=max_concurrency, **engine_settings)
    config = ServerConfig(model_name=served_model_name, max_model_len=engine.max_model_len,
                          vocab_size=checkpoint.config.vocab_size,
                          default_params=default_sampling_params(checkpoint),
                          stop_token_ids=sorted(stop_token_ids(checkpoint)), api_key=api_key,
                          max_pending=max_concurrency + max_queue,
                          aliases=[a for a in aliases if a != served_model_name])
    return create_app(engine, checkpoint.tokenizer, config, prewarm=True)


def _is_api_path(path: str) -> bool:
    return path.startswith("/v1/") or path in ("/tokenize", "/detokenize")


class _AuthAndCount:
    """Pure ASGI middleware (it must not wrap `receive`, or disconnect detection breaks): API-key check on the
    API routes and the per-endpoint request counter."""

    def __init__(self, app: Any, api_key: str | None, metrics: ServerMetrics) -> None:
        self.app, self.api_key, self.metrics = app, api_key, metrics

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http" or not _is_api_path(scope["path"]):
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        if self.api_key is not None:
            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
            given = headers.get("authorization", "")
            token = given[7:].strip() if given[:7].lower() == "bearer " else headers.get("x-api-key", "")
            if not secrets.compare_digest(token.encode(), self.api_key.encode()):
                self.metrics.requests.inc(endpoint=path, status="401")
                response = JSONResponse(error_body("invalid or missing API key (send 'Authorization: Bearer KEY')",
                                                   "authentication_error", code="invalid_api_key"), status_code=401)
                await response(scope, receive, send)
                return
        status = "500"

        async def send_counting(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = str(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_counting)
        finally:
            self.metrics.requests.inc(endpoint=path, status=status)


def _describe_validation(errors: Sequence[dict[str, Any]]) -> tuple[str, str | None]:
    """pydantic errors -> one message naming each offending field, and the first field as `param`."""
    parts, first = [], None
    for err in errors[:5]:
        loc = [str(x) for x in err.get("loc", ()) if x not in ("body",)]
        where = ".".join(loc) or "body"
        if err.get("type") == "json_invalid":
            parts.append(f"request body is not valid JSON: {err.get('ctx', {}).get('error', err.get('msg'))}")
            first = first or "body"
            continue
        first = first or where
        parts.append(f"{where}: {err.get('msg')}")
    return "; ".join(parts) or "invalid request", first


class _Server:
    def __init__(self, engine: AsyncEngine, tokenizer: Any, config: ServerConfig,
                 structured: so.StructuredOutputs, metrics: ServerMetrics) -> None:
        self.engine = engine
        self.tokenizer = tokenizer
        self.config = config
        self.structured = structured
        self.metrics = metrics
        self.names = {config.model_name, *config.aliases}

    # --- helpers -------------------------------------------------------------------------------------
    def model_card(self) -> ModelCard:
        return ModelCard(id=self.config.model_name, root=self.config.model_name,
                         max_model_len=self.config.max_model_len)

    def check_model(self, model: str) -> None:
        if model not in self.names:
            raise APIError(404, f"The model '{model}' does not exist; this server serves "
                                f"'{self.config.model_name}'", "not_found_error", "model", "model_not_found")

    async def encode(self, text: str) -> list[int]:
        if len(text) > LONG_TEXT:
            return await asyncio.to_thread(self.tokenizer.encode, text)
        return self.tokenizer.encode(text)

    def render(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None,
               add_generation_prompt: bool = True, continue_final: bool = False,
               extra: dict[str, Any] | None = None) -> str:
        for m in messages:
            if m.get("role") == "developer":  # OpenAI's newer name for the system role
                m["role"] = "system"
        try:
            text = render_chat(getattr(self.tokenizer, "chat_template", None), messages, tools=tools,
                               add_generation_prompt=add_generation_prompt and not continue_final, **(extra or {}))
        except ValueError as e:
            raise _bad(str(e), "messages") from None
        if continue_final:
            if not messages or messages[-1].get("role") != "assistant":
                raise _bad("continue_final_message needs the last message to be an assistant message", "messages")
            end = text.rstrip("\n")
            if end.endswith("<|im_end|>"):
                text = end[: -len("<|im_end|>")]
        return text

    def check_context(self, n_prompt: int, max_tokens: int | None, what: str = "messages") -> int:
        """The number of tokens to generate at most; 400 naming both counts when they do not fit."""
        limit = self.config.max_model_len
        if n_prompt >= limit:
            raise _bad(f"This model's maximum context length is {limit} tokens. However, your {what} resulted in "
                       f"{n_prompt} tokens (at least 1 must remain for the completion). Please reduce the length "
                       f"of the {what}.", what, "context_length_exceeded")
        if max_tokens is None:
            return limit - n_prompt
        if n_prompt + max_tokens > limit:
            raise _bad(f"This model's maximum context length is {limit} tokens. However, you requested "
                       f"{n_prompt + max_tokens} tokens ({n_prompt} in the {what}, {max_tokens} in the completion). "
                       f"Please reduce the length of the {what} or completion.", "max_tokens",
                       "context_length_exceeded")
        return max_tokens

    def sampling_params(self, req: SamplingFields, max_tokens: int, logprobs: int | None) -> list[SamplingParams]:
        fields = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty",
                  "frequency_penalty")
        overrides: dict[str, Any] = {k: getattr(req, k) for k in fields if getattr(req, k) is not None}
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        try:
            base = dataclasses.replace(
                self.config.default_params, **overrides, n=1, max_tokens=max_tokens, stop=stop,
                stop_token_ids=list(req.stop_token_ids or []), ignore_eos=req.ignore_eos,
                include_stop_str_in_output=req.include_stop_str_in_output,
                skip_special_tokens=req.skip_special_tokens, logprobs=logprobs, seed=req.seed)
        except ValueError as e:
            raise _bad(str(e)) from None
        return [base if k == 0 or req.seed is None else dataclasses.replace(base, seed=req.seed + k)
                for k in range(req.n)]

    def logit_bias(self, req: SamplingFields) -> dict[int, float] | None:
        if not req.logit_bias:
            return None
        bias = {int(k): float(v) for k, v in req.logit_bias.items()}
        bad = [k for k in bias if not 0 <= k < self.config.vocab_size]
        if bad:
            raise _bad(f"logit_bias has token ids outside [0, {self.config.vocab_size}): {bad[:5]}", "logit_bias")
        return bias

    async def constraint(self, req: SamplingFields, response_format: Any) -> tuple[str | None, str]:
        """The grammar a request asks for through response_format / guided_* / structured_outputs, if any."""
        so_req = req.structured_outputs
        specs: list[tuple[str, Callable[[], str]]] = []
        if response_format is not None and response_format.type == "json_object":
            specs.append(("response_format", so.json_object_grammar))
        elif response_format is not None and response_format.type == "json_schema":
            js = response_format.json_schema
            if js is None or js.json_schema is None:
                raise _bad("response_format json_schema needs json_schema.schema", "response_format")
            specs.append(("response_format", lambda: so.json_schema_grammar(js.json_schema)))
        if req.guided_json is not None:
            specs.append(("guided_json", lambda: so.json_schema_grammar(req.guided_json)))
        if req.guided_regex is not None:
            specs.append(("guided_regex", lambda: so.regex_grammar(req.guided_regex)))
        if req.guided_choice is not None:
            specs.append(("guided_choice", lambda: so.choice_grammar(req.guided_choice)))
        if req.guided_grammar is not None:
            specs.append(("guided_grammar", lambda: so.lark_grammar(req.guided_grammar)))
        if so_req is not None:
            if so_req.json_ is not None:
                specs.append(("structured_outputs.json", lambda: so.json_schema_grammar(so_req.json_)))
            if so_req.regex is not None:
                specs.append(("structured_outputs.regex", lambda: so.regex_grammar(so_req.regex)))
            if so_req.choice is not None:
                specs.append(("structured_outputs.choice", lambda: so.choice_grammar(so_req.choice)))
            if so_req.grammar is not None:
                specs.append(("structured_outputs.grammar", lambda: so.lark_grammar(so_req.grammar)))
        if not specs:
            return None, ""
        if len(specs) > 1:
            raise _bad(f"give at most one output constraint, got {', '.join(s[0] for s in specs)}", specs[1][0])
        name, build = specs[0]
        return await self.compile(name, build), name

    async def compile(self, name: str, build: Callable[[], str]) -> str:
        def run() -> str:
            grammar = build()
            self.structured.validate(grammar, name)
            return grammar

        try:
            return await asyncio.to_thread(run)
        except so.StructuredOutputError as e:
            raise _bad(str(e), name.split(".")[0], "invalid_grammar") from None

    def processors(self, plan: _Plan) -> list[list[Any]]:
        """Fresh logits processors for each engine request of the plan (grammar state is per sequence)."""
        per_request = []
        for _ in range(len(plan.prompt_ids) * len(plan.params)):
            procs: list[Any] = []
            if plan.logit_bias:
                procs.append(so.LogitBiasProcessor(plan.logit_bias))
            if plan.grammar is not None:
                procs.append(self.structured.processor(plan.grammar))
            per_request.append(procs)
        return per_request

    async def start(self, plan: _Plan, prefix: str) -> tuple[list[RequestStream], list[list[Any]] | None]:
        """Submit every (prompt, choice) pair; on any failure abort what was started and raise an APIError.

        Returns the streams and the logits processors given to each (for the mask-cost metric)."""
        streams: list[RequestStream] = []
        procs = self.processors(plan) if (plan.grammar is not None or plan.logit_bias) else None
        try:
            for p, ids in enumerate(plan.prompt_ids):
                for k, params in enumerate(plan.params):
                    if procs is not None:
                        params = _with_logits_processors(params, procs[p * len(plan.params) + k])
                    streams.append(await self.engine.add_request(f"{prefix}-{p}-{k}", ids, params))
        except BaseException as e:
            for s in streams:
                s.abort()
            if isinstance(e, Overloaded):
                raise APIError(429, str(e), "rate_limit_error", code="overloaded") from None
            if isinstance(e, EngineDead):
                raise APIError(503, str(e), "server_error") from None
            if isinstance(e, ValueError):
                raise _bad(str(e)) from None
            raise
        return streams, procs

    def record(self, choices: Sequence[_Choice], started: float, processors: list[list[Any]] | None) -> None:
        m = self.metrics
        now = time.monotonic()
        m.e2e.observe(now - started)
        prompts = {c.num_prompt_tokens for c in choices}
        m.prompt_tokens.inc(sum(prompts))
        for c in choices:
            m.generation_tokens.inc(c.num_output_tokens)
            m.finished.inc(reason=c.finish_reason or "abort")
            if c.first_token_at is not None:
                m.ttft.observe(c.first_token_at - started)
                if c.num_output_tokens > 1:
                    m.tpot.observe((now - c.first_token_at) / (c.num_output_tokens - 1))
        for procs in processors or []:
            for proc in procs:
                if isinstance(proc, so.GrammarLogitsProcessor) and proc.steps:
                    m.mask.observe(proc.mask_seconds / proc.steps)

    async def run_to_end(self, streams: list[RequestStream], request: Request) -> list[_Choice]:
        """Collect every stream; a client that disconnects meanwhile aborts them all."""
        choices = [_Choice() for _ in streams]

        async def pump(stream: RequestStream, choice: _Choice) -> None:
            async for out in stream:
                choice.add(out)

        async def watch() -> None:
            while True:
                await asyncio.sleep(0.5)
                if await request.is_disconnected():
                    self.metrics.aborted.inc(len(streams))
                    for s in streams:
                        s.abort()
                    return

        watcher = asyncio.create_task(watch())
        try:
            await asyncio.gather(*(pump(s, c) for s, c in zip(streams, choices)))
        except Exception as e:
            raise APIError(500, str(e), "server_error") from None
        finally:
            watcher.cancel()
            for s in streams:
                s.abort()
        return choices

    # --- chat ----------------------------------------------------------------------------------------
    async def chat(self, req: ChatCompletionRequest, request: Request) -> Response:
        started = time.monotonic()
        self.check_model(req.model)
        tools = [t.model_dump(exclude_none=True) for t in req.tools] if req.tools else None
        choice = req.tool_choice if req.tool_choice is not None else ("auto" if tools else "none")
        named = None if isinstance(choice, str) else choice.function.name
        if choice != "none" and not tools:
            raise _bad(f"tool_choice {choice if isinstance(choice, str) else named!r} needs tools", "tool_choice")
        if named is not None and named not in {t["function"]["name"] for t in tools or []}:
            raise _bad(f"tool_choice names function {named!r}, which is not in tools", "tool_choice")
        prompt_tools = tools if choice != "none" else None
        messages = [m.model_dump(exclude_none=True) for m in req.messages]
        text = self.render(messages, prompt_tools, req.add_generation_prompt, req.continue_final_message,
                           req.chat_template_kwargs)
        prompt_ids = await self.encode(text)
        max_tokens = self.check_context(len(prompt_ids), req.max_completion_tokens or req.max_tokens)
        top = (req.top_logprobs or 0) if req.logprobs else None
        if req.top_logprobs and not req.logprobs:
            raise _bad("top_logprobs needs logprobs: true", "top_logprobs")
        grammar, _ = await self.constraint(req, req.response_format)
        if choice == "required" or named is not None:
            if grammar is not None:
                raise _bad("tool_choice 'required' or a named function cannot be combined with another output "
                           "constraint", "tool_choice")
            grammar = await self.compile("tool_choice", lambda: so.tool_call_grammar(
                tools or [], named, req.parallel_tool_calls))
        plan = _Plan([prompt_ids], self.sampling_params(req, max_tokens, top), grammar, self.logit_bias(req),
                     [t["function"]["name"] for t in tools] if tools and choice != "none" else None)
        request_id = random_id("chatcmpl")
        streams, procs = await self.start(plan, request_id)
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return _sse(self.chat_stream(streams, plan, request_id, include_usage, started, procs))
        choices = await self.run_to_end(streams, request)
        self.record(choices, started, procs)
        out = []
        for i, c in enumerate(choices):
            content, calls = c.text, []
            if plan.tool_names is not None:
                parser = ToolCallParser(plan.tool_names)
                content, parsed = collect(parser.feed(c.text) + parser.finish())
                calls = [ToolCall(id=p.id, function=FunctionCall(name=p.name, arguments=p.arguments)) for p in parsed]
            reason = "tool_calls" if calls and c.finish_reason == "stop" else c.finish_reason
            out.append(ChatChoice(index=i, message=AssistantMessage(content=content, tool_calls=calls or None),
                                  logprobs=self.chat_logprobs(c.token_ids, c.logprobs) if top is not None else None,
                                  finish_reason=reason))
        return JSONResponse(ChatCompletionResponse(id=request_id, model=self.config.model_name, choices=out,
                                                   usage=_usage(choices, len(prompt_ids))).model_dump())

    async def chat_stream(self, streams: list[RequestStream], plan: _Plan, request_id: str, include_usage: bool,
                          started: float, procs: list[list[Any]] | None) -> AsyncIterator[str]:
        created = int(time.time())
        choices = [_Choice() for _ in streams]
        parsers = [ToolCallParser(plan.tool_names) if plan.tool_names is not None else None for _ in streams]
        has_calls = [False] * len(streams)
        want_logprobs = plan.params[0].logprobs is not None

        def chunk(index: int, delta: dict[str, Any], finish: str | None = None,
                  logprobs: dict[str, Any] | None = None) -> str:
            body = {"id": request_id, "object": "chat.completion.chunk", "created": created,
                    "model": self.config.model_name,
                    "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}]}
            if include_usage:
                body["usage"] = None
            return _event(body)

        finished = False
        try:
            for i in range(len(streams)):
                yield chunk(i, {"role": "assistant", "content": ""})
            async for i, out in _merge(streams):
                c = choices[i]
                c.add(out)
                events: list[str | ToolCallDelta] = []
                parser = parsers[i]
                if parser is not None:
                    events = parser.feed(out.new_text)
                    if out.finish_reason is not None:
                        events += parser.finish()
                elif out.new_text:
                    events = [out.new_text]
                delta = _chat_delta(events)
                if any(isinstance(e, ToolCallDelta) for e in events):
                    has_calls[i] = True
                lp = self.chat_logprobs(out.new_token_ids, out.logprobs or []) if want_logprobs else None
                if delta or (lp and lp["content"]):
                    yield chunk(i, delta, None, lp)
                if out.finish_reason is not None:
                    reason = "tool_calls" if has_calls[i] and out.finish_reason == "stop" else out.finish_reason
                    yield chunk(i, {}, reason)
            finished = True
            if include_usage:
                yield _event({"id": request_id, "object": "chat.completion.chunk", "created": created,
                              "model": self.config.model_name, "choices": [],
                              "usage": _usage(choices, len(plan.prompt_ids[0])).model_dump()})
        except Exception as e:  # noqa: BLE001 - report in-band: the 200 header is already sent
            log.exception("streaming chat failed")
            yield _event(error_body(f"{type(e).__name__}: {e}", "server_error"))
        finally:
            for s in streams:
                s.abort()
            if not finished:
                self.metrics.aborted.inc(sum(1 for c in choices if c.finish_reason is None))
            self.record(choices, started, procs)
        yield "data: [DONE]\n\n"

    def token_text(self, token_id: int) -> str:
        return self.tokenizer.token_bytes(token_id).decode("utf-8", errors="replace")

    def chat_logprobs(self, token_ids: Sequence[int],
                      logprobs: Sequence[tuple[float, list[tuple[int, float]]]]) -> dict[str, Any]:
        content = []
        for token_id, (lp, top) in zip(token_ids, logprobs):
            raw = self.tokenizer.token_bytes(token_id)
            content.append({"token": self.token_text(token_id), "logprob": lp, "bytes": list(raw),
                            "top_logprobs": [{"token": self.token_text(t), "logprob": v,
                                              "bytes": list(self.tokenizer.token_bytes(t))} for t, v in top]})
        return {"content": content}

    # --- completions ---------------------------------------------------------------------------------
    async def complete(self, req: CompletionRequest, request: Request) -> Response:
        started = time.monotonic()
        self.check_model(req.model)
        if req.best_of is not None and req.best_of != req.n:
            raise _bad("best_of other than n is not supported", "best_of")
        if req.echo and req.logprobs is not None:
            raise _bad("echo together with logprobs (prompt logprobs) is not supported", "echo")
        prompts = await self.completion_prompts(req)
        if req.suffix is not None and len(prompts) != 1:
            raise _bad("suffix works with a single text prompt", "suffix")
        max_new = min(self.check_context(len(ids), req.max_tokens, "prompt") for _, ids in prompts)
        grammar, _ = await self.constraint(req, req.response_format)
        plan = _Plan([ids for _, ids in prompts], self.sampling_params(req, max_new, req.logprobs), grammar,
                     self.logit_bias(req), None, [t or "" for t, _ in prompts] if req.echo else None)
        request_id = random_id("cmpl")
        streams, procs = await self.start(plan, request_id)
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return _sse(self.completion_stream(streams, plan, request_id, include_usage, started, procs))
        choices = await self.run_to_end(streams, request)
        self.record(choices, started, procs)
        n = len(plan.params)
        out = []
        for i, c in enumerate(choices):
            text = (plan.echo_texts[i // n] if plan.echo_texts else "") + c.text
            lp = self.completion_logprobs(c.token_ids, c.logprobs, 0) if req.logprobs is not None else None
            out.append(CompletionChoice(index=i, text=text, logprobs=lp, finish_reason=c.finish_reason))
        usage = _usage(choices, prompt_tokens=sum(len(ids) for ids in plan.prompt_ids))
        return JSONResponse(CompletionResponse(id=request_id, model=self.config.model_name, choices=out,
                                               usage=usage).model_dump())

    async def completion_prompts(self, req: CompletionRequest) -> list[tuple[str | None, list[int]]]:
        p = req.prompt
        if isinstance(p, str):
            texts: list[str] | None = [p]
        elif p and all(isinstance(x, str) for x in p):
            texts = list(p)  # type: ignore[arg-type]
        else:
            texts = None
        if texts is not None:
            if not texts:
                raise _bad("prompt is empty", "prompt")
            if req.suffix is not None:
                return [(texts[0], await self.encode(self.fim_prompt(texts[0], req.suffix)))]
            out = [(t, await self.encode(t)) for t in texts]
        else:
            lists = [p] if p and isinstance(p[0], int) else p
            out = [(None, list(ids)) for ids in lists]  # type: ignore[union-attr]
            for _, ids in out:
                bad = [t for t in ids if not 0 <= t < self.config.vocab_size]
                if bad:
                    raise _bad(f"prompt token ids out of range [0, {self.config.vocab_size}): {bad[:5]}", "prompt")
            if req.echo:
                out = [(self.tokenizer.decode(ids), ids) for _, ids in out]
        if not out or any(not ids for _, ids in out):
            raise _bad("prompt is empty: nothing to condition on", "prompt")
        return out

    def fim_prompt(self, prefix: str, suffix: str) -> str:
        """Qwen2.5-Coder's fill-in-the-middle format (SPEC §5)."""
        if self.tokenizer.token_to_id("<|fim_prefix|>") is None:
            raise _bad("suffix (fill-in-the-middle) needs a model with FIM tokens", "suffix")
        return f"<|fim_prefix|>{prefix}<|fim_suffix|>{suffix}<|fim_middle|>"

    async def completion_stream(self, streams: list[RequestStream], plan: _Plan, request_id: str,
                                include_usage: bool, started: float,
                                procs: list[list[Any]] | None) -> AsyncIterator[str]:
        created = int(time.time())
        choices = [_Choice() for _ in streams]
        n = len(plan.params)
        want_logprobs = plan.params[0].logprobs is not None
        offsets = [0] * len(streams)

        def chunk(index: int, text: str, finish: str | None, logprobs: dict[str, Any] | None) -> str:
            body = {"id": request_id, "object": "text_completion", "created": created,
                    "model": self.config.model_name,
                    "choices": [{"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}]}
            if include_usage:
                body["usage"] = None
            return _event(body)

        finished = False
        try:
            if plan.echo_texts:
                for i in range(len(streams)):
                    yield chunk(i, plan.echo_texts[i // n], None, None)
            async for i, out in _merge(streams):
                choices[i].add(out)
                lp = None
                if want_logprobs:
                    lp = self.completion_logprobs(out.new_token_ids, out.logprobs or [], offsets[i])
                    offsets[i] += sum(len(t) for t in lp["tokens"])
                if out.new_text or lp or out.finish_reason is not None:
                    yield chunk(i, out.new_text, out.finish_reason, lp)
            finished = True
            if include_usage:
                usage = _usage(choices, prompt_tokens=sum(len(ids) for ids in plan.prompt_ids))
                yield _event({"id": request_id, "object": "text_completion", "created": created,
                              "model": self.config.model_name, "choices": [], "usage": usage.model_dump()})
        except Exception as e:  # noqa: BLE001
            log.exception("streaming completion failed")
            yield _event(error_body(f"{type(e).__name__}: {e}", "server_error"))
        finally:
            for s in streams:
                s.abort()
            if not finished:
                self.metrics.aborted.inc(sum(1 for c in choices if c.finish_reason is None))
            self.record(choices, started, procs)
        yield "data: [DONE]\n\n"

    def completion_logprobs(self, token_ids: Sequence[int],
                            logprobs: Sequence[tuple[float, list[tuple[int, float]]]], offset: int) -> dict[str, Any]:
        tokens, values, tops, offsets = [], [], [], []
        for token_id, (lp, top) in zip(token_ids, logprobs):
            text = self.token_text(token_id)
            tokens.append(text)
            values.append(lp)
            tops.append({self.token_text(t): v for t, v in top})
            offsets.append(offset)
            offset += len(text)
        return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}

    # --- tokenizer -----------------------------------------------------------------------------------
    async def tokenize(self, req: TokenizeRequest) -> dict[str, Any]:
        if req.model is not None:
            self.check_model(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise _bad("give exactly one of prompt or messages", "prompt")
        if req.messages is not None:
            tools = [t.model_dump(exclude_none=True) for t in req.tools] if req.tools else None
            text = self.render([m.model_dump(exclude_none=True) for m in req.messages], tools,
                               req.add_generation_prompt)
        else:
            text = req.prompt or ""
        ids = await self.encode(text)
        return {"count": len(ids), "max_model_len": self.config.max_model_len, "tokens": ids}


# --- streaming helpers -----------------------------------------------------------------------------
def _event(body: dict[str, Any]) -> str:
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


def _sse(gen: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(gen, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _merge(streams: Sequence[RequestStream]) -> AsyncIterator[tuple[int, Any]]:
    """Interleave several request streams as (stream index, output), in arrival order."""
    if len(streams) == 1:
        async for out in streams[0]:
            yield 0, out
        return
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(i: int, stream: RequestStream) -> None:
        try:
            async for out in stream:
                await queue.put((i, out))
        except Exception as e:  # noqa: BLE001
            await queue.put((i, e))
        finally:
            await queue.put((i, done))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    remaining = len(streams)
    try:
        while remaining:
            i, item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()


def _chat_delta(events: Sequence[str | ToolCallDelta]) -> dict[str, Any]:
    content = "".join(e for e in events if isinstance(e, str))
    calls: list[dict[str, Any]] = []
    for e in events:
        if not isinstance(e, ToolCallDelta):
            continue
        if e.id is not None:
            calls.append({"index": e.index, "id": e.id, "type": "function",
                          "function": {"name": e.name, "arguments": e.arguments}})
        elif calls and calls[-1]["index"] == e.index:
            calls[-1]["function"]["arguments"] += e.arguments
        else:
            calls.append({"index": e.index, "function": {"arguments": e.arguments}})
    delta: dict[str, Any] = {}
    if content:
        delta["content"] = content
    if calls:
        delta["tool_calls"] = calls
    return delta


def _usage(choices: Sequence[_Choice], prompt_tokens: int) -> Usage:
    completion = sum(c.num_output_tokens for c in choices)
    return Usage(prompt_tokens=prompt_tokens, completion_tokens=completion, total_tokens=prompt_tokens + completion)


def _with_logits_processors(params: SamplingParams, processors: list[Any]) -> SamplingParams:
    """`params` carrying `logits_processors` (the engine hook for grammars and logit_bias)."""
    if not processors:
        return params
    if any(f.name == "logits_processors" for f in dataclasses.fields(params)):
        return dataclasses.replace(params, logits_processors=list(processors))
    return ServerSamplingParams(**{f.name: getattr(params, f.name) for f in dataclasses.fields(params)},
                                logits_processors=list(processors))


@dataclass
class ServerSamplingParams(SamplingParams):
    """SamplingParams plus the logits-processor hook, until SamplingParams itself has it.

    Each processor is `(output_token_ids: list[int], logits: Tensor (V,)) -> Tensor`, applied in order to the raw
    logits of the sequence before penalties, temperature and filters."""

    logits_processors: list[Any] = field(default_factory=list)


__all__ = ["APIError", "ServerConfig", "ServerSamplingParams", "create_app", "create_app_from_checkpoint"]
