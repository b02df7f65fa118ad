"""A checkpoint ready to run: model + tokenizer + generation defaults, and the facts derived from them.

This is the loader above `weights/` that the engine, the server, `LLM` and the trainers are built from: it
resolves a path, loads the weights (`qwen25.weights.loader`), and answers the questions every face asks of a
checkpoint: which token ids end a turn, which sampling defaults it ships, whether it is an instruct model.
"""

from __future__ import annotations

from pathlib import Path

import torch

from qwen25.config import IM_END_ID
from qwen25.sampling_params import SamplingParams
from qwen25.weights.loader import Checkpoint, CheckpointError, load_checkpoint

# Qwen2.5-Instruct's shipped generation_config.json (SPEC §1.1), used for instruct checkpoints that carry
# none (a GGUF file has no generation config).
QWEN25_INSTRUCT_DEFAULTS = dict(temperature=0.7, top_p=0.8, top_k=20, repetition_penalty=1.05)

__all__ = ["Checkpoint", "CheckpointError", "QWEN25_INSTRUCT_DEFAULTS", "default_sampling_params", "is_instruct",
           "load", "stop_token_ids"]


def load(path: str | Path, dtype: torch.dtype = torch.float32, quantization: str | None = None) -> Checkpoint:
    """Load a .gguf file, an HF directory or a `qwen25 quantize` output (see `weights.loader.load_checkpoint`)."""
    return load_checkpoint(path, dtype, quantization)


def is_instruct(checkpoint: Checkpoint) -> bool:
    """Instruct checkpoints end turns with <|im_end|>; base checkpoints with <|endoftext|> (SPEC §1.1)."""
    return IM_END_ID in checkpoint.config.eos_token_ids


def stop_token_ids(checkpoint: Checkpoint) -> set[int]:
    """Every token id that ends generation: the tokenizer's, the config's and the generation config's."""
    ids = set(checkpoint.tokenizer.stop_token_ids) | set(checkpoint.config.eos_token_ids)
    if checkpoint.generation_defaults is not None:
        ids |= set(checkpoint.generation_defaults.eos_token_ids)
    return ids


def default_sampling_params(checkpoint: Checkpoint) -> SamplingParams:
    """The checkpoint's generation_config defaults; Qwen2.5-Instruct's for instruct GGUFs; else neutral."""
    d = checkpoint.generation_defaults
    if d is not None:
        values = {k: getattr(d, k) for k in ("temperature", "top_p", "top_k", "repetition_penalty")}
        return SamplingParams(**{k: v for k, v in values.items() if v is not None})
    return SamplingParams(**QWEN25_INSTRUCT_DEFAULTS) if is_instruct(checkpoint) else SamplingParams()
