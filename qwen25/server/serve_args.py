"""`qwen25 serve`'s server-side options: the request-limit flags (`ServeLimitsArgs`, a `cli_args` group that
`qwen25.cli.ServeConfig` inherits), the API-key rule and the loopback test behind the exposure warning.

Kept here, next to `config.Limits`, so that the CLI module only wires them; importing it needs no FastAPI.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from qwen25.cli_args import arg
from qwen25.server.config import Limits as ServerLimits

_LIMITS = ServerLimits()


@dataclass
class ServeLimitsArgs:
    cli_group = "request limits (a request over one is refused with HTTP 400, or 413 for the body)"

    max_body_size: int = arg(_LIMITS.max_body_bytes, metavar="BYTES")
    """request body size (default: 4 MiB)"""
    max_json_depth: int = _LIMITS.max_json_depth
    """nesting of the body and of JSON inside it"""
    max_stop_strings: int = _LIMITS.max_stop_strings
    """stop strings per request"""
    max_stop_length: int = arg(_LIMITS.max_stop_chars, metavar="CHARS")
    """characters per stop string"""
    max_n: int = _LIMITS.max_n
    """choices per prompt (n)"""
    max_logit_bias: int = _LIMITS.max_logit_bias
    """logit_bias entries"""
    max_tools: int = _LIMITS.max_tools
    """tools per request"""
    max_schema_size: int = arg(_LIMITS.max_schema_bytes, metavar="BYTES")
    """each JSON schema, regex, grammar or tool parameters schema"""
    max_prompts: int = _LIMITS.max_prompts
    """prompts in one text-completions request"""

    def limits(self) -> ServerLimits:
        values = dict(max_body_bytes=self.max_body_size, max_json_depth=self.max_json_depth,
                      max_stop_strings=self.max_stop_strings, max_stop_chars=self.max_stop_length, max_n=self.max_n,
                      max_logit_bias=self.max_logit_bias, max_tools=self.max_tools,
                      max_schema_bytes=self.max_schema_size, max_prompts=self.max_prompts)
        bad = [k for k, v in values.items() if v < 1]
        if bad:
            raise ValueError(f"request limits must be >= 1: {', '.join(bad)}")
        return ServerLimits(**values)



def serve_api_key(key: str | None, no_api_key: bool) -> str | None:
    """The key to require, or None: an empty key is an error unless --no-api-key says "no key" explicitly."""
    if no_api_key:
        if key and key.strip():
            raise ValueError("--no-api-key contradicts the API key given (--api-key or $QWEN25_API_KEY)")
        return None
    if key is not None and not key.strip():
        raise ValueError("the API key is empty (--api-key '' or QWEN25_API_KEY=''): give a key, or pass "
                         "--no-api-key to serve without one")
    return key


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


__all__ = ["ServeLimitsArgs", "is_loopback", "serve_api_key"]
