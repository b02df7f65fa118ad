"""The context-length flags every command that loads a model takes: --max-model-len, --rope-scaling, and
--dual-chunk-attention (vLLM's and transformers' names and JSON shapes).

A dataclass mixin for `qwen25.cli_args` (generate, chat, serve and eval inherit it). It only parses and checks
the flags; `qwen25.model.long_context.resolve_long_context` applies them to a model's config, and `LLMEngine`
refuses a prompt longer than max_model_len with both counts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from qwen25.cli_args import arg
from qwen25.config import parse_rope_scaling


@dataclass
class ContextArgs:
    cli_group = "context length"

    max_model_len: int | None = None
    """longest prompt + output a request may use, in tokens; longer prompts are refused with both counts
    (default: the model's max_position_embeddings, which --rope-scaling YaRN lengthens to factor x its window)"""
    rope_scaling: str | None = arg(None, metavar="JSON")
    """RoPE scaling as vLLM and transformers take it, e.g. '{"rope_type":"yarn","factor":4.0,
    "original_max_position_embeddings":32768}' for Qwen2.5's 128K; add "dynamic": true to leave sequences within
    the native window unscaled (static YaRN costs short prompts some quality); "none" removes the checkpoint's
    (default: the checkpoint's)"""
    dual_chunk_attention: str | None = arg(None, metavar="JSON|on|off")
    """Dual Chunk Attention (Qwen2.5-1M): a dual_chunk_attention_config JSON object ({"chunk_size": ...,
    "local_size": ..., "original_max_position_embeddings": ...}), "on" (chunk_size = the native window), or "off"
    (default: the checkpoint's config.json)"""

    def check_context_flags(self) -> None:
        """Raise ValueError for a flag that is wrong whatever the model (before loading it)."""
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"--max-model-len must be >= 2, got {self.max_model_len}")
        if self.rope_scaling is not None:
            parse_rope_scaling(self.rope_scaling)

    def engine_settings(self) -> dict[str, Any]:
        """The LLMEngine settings these flags set (only those given)."""
        self.check_context_flags()
        return {} if self.max_model_len is None else {"max_model_len": self.max_model_len}

    def long_context(self) -> dict[str, Any]:
        """`LLM`'s rope_scaling / dual_chunk_attention_config keyword arguments (flag text, or None: keep)."""
        return {"rope_scaling": self.rope_scaling, "dual_chunk_attention_config": self.dual_chunk_attention}
