"""`AuthAndCount`: the pure-ASGI middleware in front of the API routes (/v1/*, /tokenize, /detokenize).

It checks the API key (`Authorization: Bearer KEY` or `x-api-key`; a 401 error envelope otherwise) when one is
configured, and counts every API request by endpoint and status in `ServerMetrics.requests`. Other paths (/,
/health, /metrics) pass through untouched. It never wraps `receive`, so client-disconnect detection still works.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from typing import Any

from fastapi.responses import JSONResponse

from qwen25.server.metrics import ServerMetrics
from qwen25.server.protocol import error_body


def is_api_path(path: str) -> bool:
    return path.startswith("/v1/") or path in ("/tokenize", "/detokenize")


class AuthAndCount:
    def __init__(self, app: Any, api_key: str | None, metrics: ServerMetrics) -> None:
        self.app, self.api_key, self.metrics = app, api_key, metrics

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http" or not is_api_path(scope["path"]):
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        if self.api_key is not None and not self._authorized(scope):
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

    def _authorized(self, scope: dict) -> bool:
        assert self.api_key is not None
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        given = headers.get("authorization", "")
        token = given[7:].strip() if given[:7].lower() == "bearer " else headers.get("x-api-key", "")
        return secrets.compare_digest(token.encode(), self.api_key.encode())


__all__ = ["AuthAndCount", "is_api_path"]
