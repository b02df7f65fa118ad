"""The OpenAI-compatible HTTP server (`qwen25 serve`; needs the [serve] extra: fastapi, uvicorn, llguidance).

Modules, in dependency order (each imports only those before it): config.py (`ServerConfig`, `Limits`),
protocol.py (pydantic wire schemas), errors.py (APIError and the error envelopes), body.py (bounded body reading
and validation off the event loop), limits.py (per-request bounds), metrics.py (Prometheus text), middleware.py
(API key, request counts by route), structured.py (llguidance grammars, logit_bias), async_engine.py (the
engine thread and per-request queues), planner.py (request -> `Plan`), pipeline.py (submit, accumulate, stream),
renderers.py (chat and text-completion output), app.py (routes, `create_app` / `create_app_from_checkpoint`),
static/index.html (the chat page). ChatML rules and tool-call parsing live in `qwen25.chat`. Nothing is imported
here, so `import qwen25.server` stays cheap.
"""
