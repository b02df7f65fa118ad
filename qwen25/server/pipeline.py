"""The generation pipeline: a `Plan` submitted to the engine, its outputs accumulated and rendered, blocking or
as Server-Sent Events.

Owns submission (one engine request per prompt carrying n samples that share its prefill, routed to choices by
`StepOutput.index`; 429/503/400 on refusal, with whatever was started aborted), the single output accumulator
(`Choice`), interleaving several streams, client-disconnect aborts, the SSE framing (chunks, usage, in-band errors,
`[DONE]`) and the request metrics. What goes on the wire is the `Renderer`'s job (`server.renderers`): the same
loop serves chat and text completions. Engine outputs may carry any number of new tokens and logprobs per step.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from fastapi import Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from qwen25.sampling_params import SamplingParams
from qwen25.server import structured as so
from qwen25.server.async_engine import AsyncEngine, EngineDead, Overloaded, RequestStream
from qwen25.server.errors import APIError, bad_request
from qwen25.server.metrics import ServerMetrics
from qwen25.server.planner import Plan
from qwen25.server.protocol import Usage, error_body

log = logging.getLogger("qwen25.server")


@dataclass
class Choice:
    """The accumulated output of one sample (one OpenAI choice)."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[tuple[float, list[tuple[int, float]]]] = field(default_factory=list)
    finish_reason: str | None = None
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    first_token_at: float | None = None

    def add(self, out: Any) -> None:
        """Fold in one `StepOutput` (any number of new tokens)."""
        if self.first_token_at is None and out.new_token_ids:
            self.first_token_at = time.monotonic()
        self.text += out.new_text
        self.token_ids += out.new_token_ids
        if out.logprobs:
            self.logprobs += out.logprobs
        self.finish_reason = out.finish_reason or self.finish_reason
        self.num_prompt_tokens = out.num_prompt_tokens
        self.num_output_tokens = out.num_output_tokens


class Renderer(Protocol):
    """Turns one request's engine outputs into wire data (see `server.renderers`)."""

    kind: str  # for logs
    object: str  # the SSE chunks' "object"
    id_prefix: str  # of the response id

    def opening(self, index: int) -> list[dict[str, Any]]:
        """SSE `choices` entries for choice `index` before any output."""

    def chunks(self, index: int, out: Any) -> list[dict[str, Any]]:
        """SSE `choices` entries for one engine output of choice `index` (possibly none)."""

    def response(self, request_id: str, model: str, choices: Sequence[Choice], usage: Usage) -> BaseModel:
        """The whole non-streamed response body."""


@dataclass
class Submission:
    """The engine requests of one plan: their streams, the choice index of each stream's sample 0 (a stream's
    output with `index` k belongs to choice `first_choice[i] + k`), and the logits processors each got."""

    streams: list[RequestStream]
    first_choice: list[int]
    processors: list[list[Any]] | None


def engine_requests(plan: Plan) -> list[tuple[int, int, SamplingParams]]:
    """(prompt number, first choice index, params) per engine request. Normally one request per prompt with n
    samples sharing one prefill. Logits processors (grammar matchers, logit_bias) are stateful and belong to one
    sequence, but the engine's n samples share one SamplingParams; so a plan with processors and n > 1 is
    submitted as n requests of one sample each, seeded seed + k exactly as the engine seeds its samples."""
    n, params = plan.n, plan.params
    if n == 1 or (plan.grammar is None and not plan.logit_bias):
        return [(p, p * n, params) for p in range(len(plan.prompt_ids))]
    single = [dataclasses.replace(params, n=1, seed=None if params.seed is None else params.seed + k)
              for k in range(n)]
    return [(p, p * n + k, single[k]) for p in range(len(plan.prompt_ids)) for k in range(n)]


async def submit(engine: AsyncEngine, structured: so.StructuredOutputs, plan: Plan, prefix: str) -> Submission:
    """Submit the plan's engine requests (`engine_requests`); on any failure abort what was started and raise an
    APIError."""
    requests = engine_requests(plan)
    procs = _processors(structured, plan, len(requests)) if (plan.grammar is not None or plan.logit_bias) else None
    batch = []
    for r, (p, first, params) in enumerate(requests):
        if procs is not None:
            params = _with_logits_processors(params, procs[r])
        rid = f"{prefix}-{p}" if params.n == plan.n else f"{prefix}-{p}-{first - p * plan.n}"
        batch.append((rid, plan.prompt_ids[p], params))
    try:
        streams = await engine.add_requests(batch)  # together: one engine step admits (or aborts) them all
    except Exception as e:
        if isinstance(e, Overloaded):
            raise APIError(429, str(e), "rate_limit_error", code="overloaded") from None
        if isinstance(e, EngineDead):
            raise APIError(503, str(e), "server_error") from None
        if isinstance(e, ValueError):
            raise bad_request(str(e)) from None
        raise
    return Submission(streams, [first for _, first, _ in requests], procs)


class Generation:
    """One submitted request's outputs: `collect` them (blocking) or stream them as SSE `events`."""

    def __init__(self, submission: Submission, renderer: Renderer, plan: Plan, request_id: str, model: str,
                 metrics: ServerMetrics, started: float) -> None:
        self.streams, self.first_choice = submission.streams, submission.first_choice
        self.renderer, self.plan = renderer, plan
        self.request_id, self.model, self.metrics = request_id, model, metrics
        self.started, self.processors = started, submission.processors
        self.choices = [Choice() for _ in range(plan.num_choices)]

    async def outputs(self) -> AsyncIterator[tuple[int, Any]]:
        """(choice index, output) for every engine output of every stream, in arrival order."""
        async for s, out in merge(self.streams):
            yield self.first_choice[s] + out.index, out

    def num_unfinished(self) -> int:
        return sum(1 for c in self.choices if c.finish_reason is None)

    def usage(self) -> Usage:
        prompt = sum(len(ids) for ids in self.plan.prompt_ids)
        completion = sum(c.num_output_tokens for c in self.choices)
        return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)

    async def response(self, request: Request) -> BaseModel:
        """Run every stream to the end (a client that disconnects meanwhile aborts them all, at once: the body has
        been read, so the next ASGI message is the disconnect) and render it."""
        async def watch() -> None:
            while True:
                message = await request.receive()
                if message["type"] == "http.disconnect":
                    break
                if not message.get("more_body"):
                    await asyncio.sleep(0.05)  # a server that answers at once instead of waiting: poll
            self.metrics.aborted.inc(self.num_unfinished())
            for s in self.streams:
                s.abort()

        watcher = asyncio.create_task(watch())
        try:
            async for i, out in self.outputs():
                self.choices[i].add(out)
        except Exception as e:
            raise APIError(500, str(e), "server_error") from None
        finally:
            watcher.cancel()
            for s in self.streams:
                s.abort()
        self.record()
        return self.renderer.response(self.request_id, self.model, self.choices, self.usage())

    async def events(self, include_usage: bool) -> AsyncIterator[str]:
        """The SSE body: the renderer's chunks, then usage (if asked) and `[DONE]`; errors are reported in-band
        because the 200 header is already sent."""
        created = int(time.time())

        def chunk(entries: list[dict[str, Any]], usage: dict[str, Any] | None = None) -> str:
            body = {"id": self.request_id, "object": self.renderer.object, "created": created, "model": self.model,
                    "choices": entries}
            if include_usage:
                body["usage"] = usage
            return event(body)

        finished = False
        try:
            for i in range(len(self.choices)):
                for entry in self.renderer.opening(i):
                    yield chunk([entry])
            async for i, out in self.outputs():
                self.choices[i].add(out)
                for entry in self.renderer.chunks(i, out):
                    yield chunk([entry])
            finished = True
            if include_usage:
                yield chunk([], self.usage().model_dump())
        except Exception as e:  # noqa: BLE001 - report in-band
            log.exception("streaming %s failed", self.renderer.kind)
            yield event(error_body(f"{type(e).__name__}: {e}", "server_error"))
        finally:
            for s in self.streams:
                s.abort()
            if not finished:
                self.metrics.aborted.inc(self.num_unfinished())
            self.record()
        yield "data: [DONE]\n\n"

    def record(self) -> None:
        m = self.metrics
        now = time.monotonic()
        m.e2e.observe(now - self.started)
        n = self.plan.n  # each prompt counted once (as in usage), if any of its samples got that far
        m.prompt_tokens.inc(sum(max(c.num_prompt_tokens for c in self.choices[p * n:(p + 1) * n])
                                for p in range(len(self.plan.prompt_ids))))
        for c in self.choices:
            m.generation_tokens.inc(c.num_output_tokens)
            m.finished.inc(reason=c.finish_reason or "abort")
            if c.first_token_at is not None:
                m.ttft.observe(c.first_token_at - self.started)
                if c.num_output_tokens > 1:
                    m.tpot.observe((now - c.first_token_at) / (c.num_output_tokens - 1))
        for procs in self.processors or []:
            for proc in procs:
                if isinstance(proc, so.GrammarLogitsProcessor) and proc.steps:
                    m.mask.observe(proc.mask_seconds / proc.steps)


def event(body: dict[str, Any]) -> str:
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


def sse(gen: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(gen, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def merge(streams: Sequence[RequestStream]) -> AsyncIterator[tuple[int, Any]]:
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


def _processors(structured: so.StructuredOutputs, plan: Plan, num_requests: int) -> list[list[Any]]:
    """Fresh logits processors for each engine request of the plan (grammar state is per sequence)."""
    per_request = []
    for _ in range(num_requests):
        procs: list[Any] = []
        if plan.logit_bias:
            procs.append(so.LogitBiasProcessor(plan.logit_bias))
        if plan.grammar is not None:
            procs.append(structured.processor(plan.grammar, plan.grammar_tokens))
        per_request.append(procs)
    return per_request


def _with_logits_processors(params: SamplingParams, processors: list[Any]) -> SamplingParams:
    """`params` carrying `processors` (the engine hook for grammars and logit_bias)."""
    return dataclasses.replace(params, logits_processors=list(processors)) if processors else params


__all__ = ["Choice", "Generation", "Renderer", "Submission", "engine_requests", "event", "merge", "sse", "submit"]
