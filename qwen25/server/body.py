"""Request bodies: read with a size limit, decoded and validated off the event loop, every failure a client error.

`parse_body(request, Model, limits)` replaces FastAPI's own body handling for the generation routes, because that
handling parses on the event loop (a 10 MB body held /health for seconds) and answers some malformed bodies with
`{"detail": ...}`. Here: a body over `limits.max_body_bytes` is a 413 (refused before reading when Content-Length
says so, cut off mid-stream otherwise); invalid UTF-8, invalid JSON, NaN/Infinity, numbers out of float range,
lone surrogates (`"\\ud800"`), nesting deeper than `limits.max_json_depth` and anything the pydantic model refuses
are 400s in OpenAI's envelope. Decoding, the structural walk and validation run in a worker thread.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from pydantic import BaseModel, ValidationError

from qwen25.server.config import Limits
from qwen25.server.errors import APIError, bad_request, describe_validation

M = TypeVar("M", bound=BaseModel)
INLINE_BYTES = 16 << 10  # smaller bodies are decoded on the event loop (a thread hop costs more than they do)
_SURROGATE = re.compile("[\ud800-\udfff]")


def too_large(limit: int) -> APIError:
    return APIError(413, f"request body is larger than the server's limit of {limit} bytes", param="body",
                    code="request_too_large")


async def read_body(request: Request, limit: int) -> bytes:
    """The raw body, at most `limit` bytes (413 otherwise)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise bad_request("Content-Length is not a number", "body")
        if len(declared) > 18 or int(declared) > limit:
            raise too_large(limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number JSON allows")


def decode_json(body: bytes, max_depth: int) -> Any:
    """bytes -> JSON value, or a 400 saying what is wrong with them."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise bad_request(f"request body is not valid UTF-8 (byte 0x{body[e.start]:02x} at offset {e.start})",
                          "body", "invalid_utf8") from None
    if not text.strip():
        raise bad_request("request body is empty; send a JSON object", "body")
    try:
        value = json.loads(text, parse_constant=_reject_constant)
    except RecursionError:
        raise bad_request(f"request body nests deeper than {max_depth} levels", "body", "too_deep") from None
    except json.JSONDecodeError as e:
        raise bad_request(f"request body is not valid JSON: {e.msg} (line {e.lineno}, column {e.colno})",
                          "body", "invalid_json") from None
    except ValueError as e:  # NaN / Infinity, or an integer of more digits than Python converts
        raise bad_request(f"request body is not valid JSON: {e}", "body", "invalid_json") from None
    check_value(value, max_depth, "body")
    return value


def check_value(value: Any, max_depth: int, where: str) -> None:
    """A 400 unless `value` nests at most `max_depth` deep, has finite floats and no lone surrogates in strings."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, str):
            if not node.isascii() and _SURROGATE.search(node):
                raise bad_request(f"{where} contains a lone UTF-16 surrogate (not a Unicode character)", where,
                                  "invalid_unicode")
        elif isinstance(node, float):
            if not math.isfinite(node):
                raise bad_request(f"{where} has a number out of range ({node})", where, "invalid_number")
        elif isinstance(node, (dict, list)):
            if depth > max_depth:
                raise bad_request(f"{where} nests deeper than {max_depth} levels", where, "too_deep")
            if isinstance(node, dict):
                stack.extend((k, depth) for k in node)
                items = node.values()
            else:
                items = node
            stack.extend((x, depth + 1) for x in items if isinstance(x, (str, float, dict, list)))


def validate(model: type[M], value: Any) -> M:
    """The pydantic model of a decoded body; a 400 naming the offending fields otherwise."""
    if not isinstance(value, dict):
        raise bad_request(f"request body must be a JSON object, got {type(value).__name__}", "body")
    try:
        return model.model_validate(value)
    except ValidationError as e:
        message, param = describe_validation(e.errors(include_url=False, include_input=False))
        raise bad_request(message, param) from None
    except RecursionError:
        raise bad_request("request body nests too deeply", "body", "too_deep") from None


async def parse_body(request: Request, model: type[M], limits: Limits) -> M:
    """Read, decode and validate the request body as `model` (off the event loop unless it is small)."""
    body = await read_body(request, limits.max_body_bytes)

    def run() -> M:
        return validate(model, decode_json(body, limits.max_json_depth))

    return run() if len(body) <= INLINE_BYTES else await asyncio.to_thread(run)


class BodySchemas:
    """`openapi_extra` for routes that parse their own body, so /docs still shows each body's schema:
    `@app.post(path, openapi_extra=schemas(Model))`; the models' definitions join the document's components."""

    def __init__(self, app: FastAPI) -> None:
        self.defs: dict[str, Any] = {}
        generate = app.openapi

        def openapi() -> dict[str, Any]:
            if app.openapi_schema is None:
                document = generate()
                document.setdefault("components", {}).setdefault("schemas", {}).update(self.defs)
            return app.openapi_schema  # type: ignore[return-value]

        app.openapi = openapi  # type: ignore[method-assign]

    def __call__(self, model: type[BaseModel]) -> dict[str, Any]:
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        self.defs.update(schema.pop("$defs", {}))
        self.defs[model.__name__] = schema
        ref = {"$ref": f"#/components/schemas/{model.__name__}"}
        return {"requestBody": {"required": True, "content": {"application/json": {"schema": ref}}}}


__all__ = ["BodySchemas", "check_value", "decode_json", "parse_body", "read_body", "validate"]
