"""`AsyncEngine`: drives a synchronous `LLMEngine` from asyncio.

One background thread owns the engine: it applies queued adds and aborts between steps, calls `engine.step()`
while there is work, and routes each `StepOutput` to its request's asyncio queue with
`loop.call_soon_threadsafe`. A request with `params.n` > 1 has one stream carrying the outputs of all n samples
(tell them apart by `StepOutput.index`); it ends when every sample has finished. Nothing else touches the engine,
so it needs no locking of its own. A request whose consumer goes away (client disconnect, cancelled task) is
aborted (all its samples), which frees its KV cache. If `step()` raises, every in-flight request fails with that
error and the thread carries on: the server never dies from a request. Admission is bounded: at most
`max_pending` samples in flight (running plus waiting; a request counts n); more is `Overloaded` (429).
`add_requests` queues the engine requests of one HTTP request together (all reach the engine before its next
step, all or none admitted), so aborting them on a disconnect reaches every one within a step.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("qwen25.server")


class Overloaded(RuntimeError):
    """Too many requests in flight; the client should retry later (HTTP 429)."""


class EngineDead(RuntimeError):
    """The engine thread is not running (HTTP 503)."""


_ABORTED = object()
ADMISSION_POLICY = ("first come, first served up to max_pending sequences (then 429); every step runs the running "
                    "decodes first, and a running prefill leaves room for the next waiting prompt; a long prompt "
                    "(over 8 steps' token budget) pauses while others decode or wait, running one chunk per 64 "
                    "paused steps, in small chunks that shrink with depth; the KV pool holds two full-context sequences by default; preemption by "
                    "recompute when it runs out")


@dataclass
class _Stream:
    request_id: str
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    accepted: asyncio.Future | None = None
    finished: bool = False
    first_output_at: float | None = None
    num_samples: int = 1  # params.n
    samples_left: int = 1  # not yet finished, as the engine thread sees it
    submitted_at: float = field(default_factory=time.monotonic)


class RequestStream:
    """Outputs of one engine request (all its samples, each output tagged with its `index`); iterate with
    `async for`, which ends after every sample's final output. Leaving the loop early aborts the request."""

    def __init__(self, engine: AsyncEngine, stream: _Stream) -> None:
        self._engine = engine
        self._stream = stream
        self.request_id = stream.request_id

    async def __aiter__(self) -> AsyncIterator[Any]:
        s = self._stream
        left = s.num_samples
        try:
            while True:
                item = await s.queue.get()
                if item is _ABORTED:
                    return
                if isinstance(item, BaseException):
                    s.finished = True
                    raise item
                if item.finish_reason is not None:
                    left -= 1
                    s.finished = s.finished or left == 0
                yield item
                if s.finished:
                    return
        finally:
            if not s.finished:
                self._engine.abort(self.request_id)

    def abort(self) -> None:
        """Stop generating (e.g. the client went away); a consumer waiting in `async for` returns."""
        if not self._stream.finished:
            self._stream.finished = True
            self._engine.abort(self.request_id)
            self._stream.queue.put_nowait(_ABORTED)


class AsyncEngine:
    def __init__(self, engine: Any, max_pending: int = 64) -> None:
        self.engine = engine
        self.max_pending = max_pending
        self._cond = threading.Condition()
        self._adds: list[tuple[_Stream, list[int], Any]] = []
        self._aborts: list[str] = []
        self._streams: dict[str, _Stream] = {}
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.steps = 0
        self.step_errors = 0
        self.last_step_seconds = 0.0
        self.step_started_at: float | None = None  # while a step runs

    # --- lifecycle -----------------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._stopping = False
            self._thread = threading.Thread(target=self._run, name="qwen25-engine", daemon=True)
            self._thread.start()

    def shutdown(self, timeout: float = 5.0) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def num_in_flight(self) -> int:
        """Unfinished samples of the admitted requests (a request with n samples counts n)."""
        with self._cond:
            return sum(s.samples_left for s in self._streams.values())

    @property
    def num_waiting(self) -> int:
        """Samples of requests admitted but without their first output yet (queued, or in prefill)."""
        with self._cond:
            return sum(s.samples_left for s in self._streams.values() if s.first_output_at is None)

    @property
    def oldest_waiting_seconds(self) -> float:
        """How long the longest-waiting admitted request has had no output (0 when none waits)."""
        now = time.monotonic()
        with self._cond:
            return max((now - s.submitted_at for s in self._streams.values() if s.first_output_at is None),
                       default=0.0)

    def state(self) -> dict[str, Any]:
        """The queue as /health shows it. status: "ok"; "busy" when the queue's head cannot start (the KV cache or
        the running batch is full: new requests wait); "saturated" when new requests are refused (429)."""
        in_flight, waiting = self.num_in_flight, self.num_waiting
        try:
            stats = dict(self.engine.stats())
        except Exception:  # noqa: BLE001 - health must answer
            stats = {}
        blocked = next((r for r in ("kv_cache", "max_num_seqs") if stats.get(f"queue_blocked_on_{r}")), None)
        admitting = in_flight < self.max_pending
        started = self.step_started_at
        return {"status": "saturated" if not admitting else "busy" if blocked else "ok", "admitting": admitting,
                "queue": {"running": in_flight - waiting, "waiting": waiting, "max_pending": self.max_pending,
                          "oldest_waiting_seconds": round(self.oldest_waiting_seconds, 3),
                          "head_blocked_on": blocked},
                "kv_cache_usage": stats.get("kv_cache_usage"),
                "current_step_seconds": 0.0 if started is None else round(time.monotonic() - started, 3),
                "policy": ADMISSION_POLICY}

    # --- requests (event-loop side) ------------------------------------------------------------------
    async def add_request(self, request_id: str, prompt_token_ids: list[int], params: Any) -> RequestStream:
        """Queue a request (params.n samples, one stream); returns once the engine accepted it (its errors, e.g.
        ValueError, raise here)."""
        return (await self.add_requests([(request_id, prompt_token_ids, params)]))[0]

    async def add_requests(self, requests: list[tuple[str, list[int], Any]]) -> list[RequestStream]:
        """Queue several requests at once (all admitted or none: Overloaded if their samples do not fit);
        returns their streams once the engine accepted them all. If any is refused (e.g. ValueError), the others
        are aborted and that error raises here."""
        if not self.is_alive:
            raise EngineDead("the engine thread is not running")
        loop = asyncio.get_running_loop()
        streams = [_Stream(rid, loop, accepted=loop.create_future(), num_samples=int(getattr(p, "n", 1)),
                           samples_left=int(getattr(p, "n", 1))) for rid, _, p in requests]
        wanted = sum(s.num_samples for s in streams)
        with self._cond:
            if sum(s.samples_left for s in self._streams.values()) + wanted > self.max_pending:
                raise Overloaded(f"server is at capacity ({self.max_pending} sequences in flight); retry later")
            ids = [rid for rid, _, _ in requests]
            if len(set(ids)) != len(ids) or any(rid in self._streams for rid in ids):
                raise ValueError(f"duplicate request id among {ids[:3]}")
            for stream, (_, prompt_ids, params) in zip(streams, requests):
                self._streams[stream.request_id] = stream
                self._adds.append((stream, prompt_ids, params))
            self._cond.notify_all()
        try:
            results = await asyncio.shield(asyncio.gather(*(s.accepted for s in streams), return_exceptions=True))
        except asyncio.CancelledError:
            for s in streams:
                self.abort(s.request_id)
            raise
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            for s in streams:
                self.abort(s.request_id)
            raise errors[0]
        return [RequestStream(self, s) for s in streams]

    def abort(self, request_id: str) -> None:
        with self._cond:
            stream = self._streams.pop(request_id, None)
            if stream is not None:
                stream.finished = True
            self._aborts.append(request_id)
            self._cond.notify_all()

    # --- engine thread -------------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cond:
                while not (self._stopping or self._adds or self._aborts or self._has_work()):
                    self._cond.wait()
                if self._stopping:
                    self._fail_all(EngineDead("server is shutting down"))
                    return
                adds, self._adds = self._adds, []
                aborts, self._aborts = self._aborts, []
            for request_id in aborts:
                self._call_quietly(self.engine.abort_request, request_id)
            for stream, prompt_ids, params in adds:
                if stream.finished:  # aborted before it reached the engine
                    self._resolve(stream, None)
                    continue
                try:
                    self.engine.add_request(stream.request_id, prompt_ids, params)
                except Exception as e:  # noqa: BLE001 - reported to the request, never fatal to the thread
                    with self._cond:
                        self._streams.pop(stream.request_id, None)
                    self._resolve(stream, e)
                else:
                    self._resolve(stream, None)
            if self._has_work():
                self._step()

    def _has_work(self) -> bool:
        try:
            return bool(self.engine.has_unfinished_requests())
        except Exception:  # noqa: BLE001
            log.exception("engine.has_unfinished_requests() failed")
            return False

    def _step(self) -> None:
        start = time.perf_counter()
        self.step_started_at = time.monotonic()
        try:
            outputs = self.engine.step()
        except Exception as e:  # noqa: BLE001 - a broken batch fails its requests, not the server
            self.step_errors += 1
            log.exception("engine.step() failed; failing the in-flight requests")
            with self._cond:
                streams = list(self._streams.values())
            for s in streams:
                self._call_quietly(self.engine.abort_request, s.request_id)
            self._fail_all(RuntimeError(f"engine error: {type(e).__name__}: {e}"))
            return
        finally:
            self.step_started_at = None
        self.steps += 1
        self.last_step_seconds = time.perf_counter() - start
        now = time.monotonic()
        for out in outputs:
            with self._cond:
                stream = self._streams.get(out.request_id)
                if stream is None:
                    continue  # aborted meanwhile
                if stream.first_output_at is None:
                    stream.first_output_at = now
                if out.finish_reason is not None:
                    stream.samples_left -= 1
                    if stream.samples_left <= 0:
                        del self._streams[out.request_id]
            stream.loop.call_soon_threadsafe(stream.queue.put_nowait, out)

    def _fail_all(self, error: BaseException) -> None:
        with self._cond:
            streams, self._streams = list(self._streams.values()), {}
        for s in streams:
            self._resolve(s, error)
            s.loop.call_soon_threadsafe(s.queue.put_nowait, error)

    @staticmethod
    def _resolve(stream: _Stream, error: BaseException | None) -> None:
        def settle() -> None:
            fut = stream.accepted
            if fut is not None and not fut.done():
                fut.set_exception(error) if error is not None else fut.set_result(None)

        try:
            stream.loop.call_soon_threadsafe(settle)
        except RuntimeError:  # the loop is closed (shutdown)
            pass

    @staticmethod
    def _call_quietly(fn: Any, *args: Any) -> None:
        try:
            fn(*args)
        except Exception:  # noqa: BLE001 - e.g. aborting a request the engine already finished
            pass


__all__ = ["AsyncEngine", "EngineDead", "Overloaded", "RequestStream"]
