"""qwen25: a from-scratch implementation of the Qwen2.5 model family (model, weights, tokenizer, chat, engine).

`from qwen25 import LLM, SamplingParams` is the offline API. Heavy modules (torch) load on first use, so
`import qwen25` and the CLI's `--help` stay fast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "LLM": "qwen25.llm",
    "RequestOutput": "qwen25.llm",
    "CompletionOutput": "qwen25.llm",
    "SamplingParams": "qwen25.sampling_params",
    "ModelConfig": "qwen25.config",
    "PRESETS": "qwen25.config",
    "Qwen2ForCausalLM": "qwen25.model.qwen2",
    "Tokenizer": "qwen25.tokenizer",
    "LLMEngine": "qwen25.engine.engine",
    "ContextLengthError": "qwen25.engine.errors",
}

if TYPE_CHECKING:
    from qwen25.config import PRESETS, ModelConfig
    from qwen25.engine.engine import LLMEngine
    from qwen25.engine.errors import ContextLengthError
    from qwen25.llm import LLM, CompletionOutput, RequestOutput
    from qwen25.model.qwen2 import Qwen2ForCausalLM
    from qwen25.sampling_params import SamplingParams
    from qwen25.tokenizer import Tokenizer


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'qwen25' has no attribute {name!r}")


__all__ = list(_EXPORTS)
