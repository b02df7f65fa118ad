"""OpenAI-shaped errors: `APIError` (raise it anywhere in a request) and the handlers that turn it, request
validation failures and unexpected exceptions into `error_body` JSON.

Status codes: bad request 400 (naming the field as `param`), unknown model or path 404, wrong method 405, body over
the limit 413, missing/wrong key 401 (raised by `server.middleware`), full server 429, dead engine 503, anything
unexpected 500 (its details go to the log, not to the client). No exception escapes a handler, and FastAPI's
`{"detail": ...}` bodies never reach a client: every error is OpenAI's envelope.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from qwen25.server.protocol import error_body

log = logging.getLogger("qwen25.server")


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    """A 400 `invalid_request_error` naming the offending field."""
    return APIError(400, message, param=param, code=code)


def install_error_handlers(app: FastAPI) -> None:
    """Register the handlers for APIError, request validation errors and any other exception on `app`."""

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError) -> JSONResponse:
        return JSONResponse(error_body(e.message, e.type, e.param, e.code), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, e: RequestValidationError) -> JSONResponse:
        message, param = describe_validation(e.errors())
        return JSONResponse(error_body(message, param=param), status_code=400)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, e: HTTPException) -> JSONResponse:
        kinds = {404: ("not_found_error", f"no route {request.method} {request.url.path[:200]}"),
                 405: ("invalid_request_error", f"method {request.method} is not allowed on this route")}
        type_, message = kinds.get(e.status_code, ("invalid_request_error", str(e.detail)))
        return JSONResponse(error_body(message, type_), status_code=e.status_code, headers=e.headers)

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, e: Exception) -> JSONResponse:
        log.exception("unhandled error on %s", request.url.path)
        return JSONResponse(error_body(f"internal error ({type(e).__name__}); the server log has the details",
                                       "server_error"), status_code=500)


def describe_validation(errors: Sequence[dict[str, Any]]) -> tuple[str, str | None]:
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


__all__ = ["APIError", "bad_request", "describe_validation", "install_error_handlers"]
