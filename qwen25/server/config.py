"""`ServerConfig`: what the HTTP layer needs to know about the model it serves (name, limits, defaults, key), and
`Limits`: the bounds on the work one request may ask for.

Plain data with no behaviour; built by `server.app.create_app_from_checkpoint` (or by tests) and read by the
planner, the routes and the middleware. `server.limits` enforces `Limits`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from qwen25.sampling_params import SamplingParams


@dataclass(frozen=True)
class Limits:
    """Per-request bounds, checked before anything reaches the engine (a 400 naming the field, or a 413 for the
    body). The defaults are generous for real clients (a full 32K-token context is ~130 KB of text) and follow
    OpenAI's published limits where it has them (128 tools, logit_bias, n); `qwen25 serve --help` lists the flags."""

    max_body_bytes: int = 4 << 20  # request body; larger is a 413 (before it is read when Content-Length says so)
    max_json_depth: int = 64  # nesting of the body and of JSON inside it (tool-call arguments, schema strings)
    max_stop_strings: int = 16  # `stop` entries
    max_stop_chars: int = 1024  # length of each stop string
    max_n: int = 16  # choices per prompt
    max_logit_bias: int = 1024  # logit_bias entries
    max_tools: int = 128  # tools offered in one request
    max_schema_bytes: int = 64 << 10  # each JSON schema / regex / grammar / tool parameters, as JSON text
    max_prompts: int = 256  # prompts in one text-completions request (a list); n samples of each also count
    max_token_id_list: int = 1 << 20  # token ids in one request (prompt lists, stop_token_ids, /detokenize)


@dataclass
class ServerConfig:
    model_name: str
    max_model_len: int
    vocab_size: int
    default_params: SamplingParams = field(default_factory=SamplingParams)  # the checkpoint's generation defaults
    stop_token_ids: Sequence[int] = ()
    api_key: str | None = None  # None: no authentication; "" is refused (say None to mean "no key")
    max_pending: int = 64  # engine requests in flight or queued before new ones get a 429
    aliases: Sequence[str] = ()  # other model names accepted in requests
    allow_special_tokens_in_content: bool = False  # chat content may spell control tokens (qwen25.chat.prompt)
    limits: Limits = field(default_factory=Limits)
    docs: bool = True  # serve /docs and /openapi.json (behind the key when there is one)


__all__ = ["Limits", "ServerConfig"]
