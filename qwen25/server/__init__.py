"""The OpenAI-compatible HTTP server (`qwen25 serve`; needs the [serve] extra: fastapi, uvicorn, llguidance).

app.py (routes, `create_app` / `create_app_from_checkpoint`), protocol.py (pydantic wire schemas), async_engine.py (the
engine thread and per-request queues), tool_parser.py (Hermes tool calls), structured.py (llguidance grammars),
metrics.py (Prometheus text), testing.py (a scripted
engine and byte tokenizer for tests), static/index.html (the chat page). Nothing is imported here, so
`import qwen25.server` stays cheap.
"""
