"""`AuthAndCount`: the pure-ASGI middleware in front of the API routes (/v1/*, /tokenize, /detokenize) and the
API's own description (/docs, /redoc, /openapi.json).

It checks the API key (`Authorization: Bearer KEY` or `x-api-key`; a 401 error envelope otherwise) when one is
configured, and counts every API request by route template and status in `ServerMetrics.requests`: the label is
one of a fixed set (`route_label`), so made-up paths all count as "other" and cannot grow /metrics. Other paths
(/, /health, /metrics) pass through untouched. It never wraps `receive`, so client-disconnect detection still works.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from typing import Any

from fastapi.responses import JSONResponse

from qwen25.server.metrics import ServerMetrics
from qwen25.server.protocol import error_body

ROUTES = ("/v1/models", "/v1/chat/completions", "/v1/completions", "/tokenize", "/detokenize")
DOCS = ("/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json")


def is_api_path(path: str) -> bool:
    return path.startswith("/v1/") or path in ("/v1", "/tokenize", "/detokenize")


def is_protected(path: str) -> bool:
    """Paths that need the key when one is set: the API and its description."""
    return is_api_path(path) or path in DOCS


def route_label(path: str) -> str:
    """The metrics label of a request path: its route template, or "other" (404s, anything made up)."""
    if path in ROUTES or path in DOCS:
        return path
    if path.startswith("/v1/models/") and len(path) > len("/v1/models/"):
        return "/v1/models/{model}"
    return "other"


class AuthAndCount:
    def __init__(self, app: Any, api_key: str | None, metrics: ServerMetrics) -> None:
        if api_key is not None and not api_key:
            raise ValueError("the API key is empty; give a key, or None for an open server")
        self.app, self.api_key, self.metrics = app, api_key, metrics

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http" or not is_protected(scope["path"]):
            await self.app(scope, receive, send)
            return
        label = route_label(scope["path"])
        if self.api_key is not None and not self._authorized(scope):
            self.metrics.requests.inc(endpoint=label, status="401")
            response = JSONResponse(error_body("invalid or missing API key (send 'Authorization: Bearer KEY')",
                                               "authentication_error", code="invalid_api_key"), status_code=401,
                                    headers={"WWW-Authenticate": "Bearer"})
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
            self.metrics.requests.inc(endpoint=label, status=status)

    def _authorized(self, scope: dict) -> bool:
        assert self.api_key is not None
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        given = headers.get("authorization", "")
        token = given[7:].strip() if given[:7].lower() == "bearer " else headers.get("x-api-key", "")
        return secrets.compare_digest(token.encode("utf-8", "replace"), self.api_key.encode("utf-8", "replace"))


__all__ = ["AuthAndCount", "is_api_path", "is_protected", "route_label"]
