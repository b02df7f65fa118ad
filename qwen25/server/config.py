"""`ServerConfig`: what the HTTP layer needs to know about the model it serves (name, limits, defaults, key).

Plain data with no behaviour; built by `server.app.create_app_from_checkpoint` (or by tests) and read by the
planner, the routes and the middleware.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from qwen25.sampling_params import SamplingParams


@dataclass
class ServerConfig:
    model_name: str
    max_model_len: int
    vocab_size: int
    default_params: SamplingParams = field(default_factory=SamplingParams)  # the checkpoint's generation defaults
    stop_token_ids: Sequence[int] = ()
    api_key: str | None = None  # None: no authentication
    max_pending: int = 64  # engine requests in flight or queued before new ones get a 429
    aliases: Sequence[str] = ()  # other model names accepted in requests


__all__ = ["ServerConfig"]
