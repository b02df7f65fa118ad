"""The context-length flags every command that loads a model takes: --max-model-len, --rope-scaling,
--dual-chunk-attention, --sparse-prefill and --kv-cache-dtype (vLLM's and transformers' names and JSON shapes).

A dataclass mixin for `qwen25.cli_args` (generate, chat, serve and eval inherit it). It only parses and checks
the flags; `qwen25.model.long_context.resolve_long_context` applies them to a model's config, and `LLMEngine`
refuses a prompt longer than max_model_len with both counts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from qwen25.cli_args import arg
from qwen25.config import parse_rope_scaling
from qwen25.model.sparse_prefill import SparsePrefillConfig


@dataclass
class ContextArgs:
    cli_group = "context length and KV cache"

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
    sparse_prefill: str | None = arg(None, metavar="on|off|JSON")
    """MInference's vertical-slash sparse attention for long prefills: "on" (its defaults: 1000 columns, 6096
    diagonals estimated from the last 64 queries of each chunk, above 8192 tokens) or a JSON object of
    `qwen25.model.sparse_prefill.SparsePrefillConfig` fields ({"vertical_size": 500, "min_length": 16384});
    faster prefill of very long prompts at some accuracy cost; default RoPE or static YaRN only (default: off)"""
    kv_cache_dtype: Literal["auto", "float32", "fp32", "float16", "fp16", "bfloat16", "bf16", "int8"] = "auto"
    """KV cache storage: float16/bfloat16 halve an fp32 cache, int8 (one scale per token and head, keys smoothed
    per channel) takes 27% of it, so about 2x/3.7x the context fits the same memory, at a perplexity cost of
    0.02% (fp16) to 1% (int8) on the 0.5B; int8 runs on the PyTorch path, not the fused native forward (default:
    auto, float16 for quantized weights, else the compute dtype)"""

    def check_context_flags(self) -> None:
        """Raise ValueError for a flag that is wrong whatever the model (before loading it)."""
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"--max-model-len must be >= 2, got {self.max_model_len}")
        if self.rope_scaling is not None:
            parse_rope_scaling(self.rope_scaling)
        if self.sparse_prefill is not None:
            SparsePrefillConfig.from_setting(self.sparse_prefill)

    def engine_settings(self) -> dict[str, Any]:
        """The LLMEngine settings these flags set (only those given)."""
        self.check_context_flags()
        settings: dict[str, Any] = {} if self.max_model_len is None else {"max_model_len": self.max_model_len}
        if self.kv_cache_dtype != "auto":
            settings["kv_cache_dtype"] = self.kv_cache_dtype
        return settings

    def long_context(self) -> dict[str, Any]:
        """`LLM`'s rope_scaling / dual_chunk_attention_config / sparse_prefill keyword arguments (flag text, or
        None: keep)."""
        return {"rope_scaling": self.rope_scaling, "dual_chunk_attention_config": self.dual_chunk_attention,
                "sparse_prefill": self.sparse_prefill}
