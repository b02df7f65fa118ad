"""A checkpoint ready to run: model + tokenizer + generation defaults, and the facts derived from them.

This is the loader above `weights/` that the engine, the server, `LLM` and the trainers are built from: it
loads the weights and config (`qwen25.weights.loader`), builds the tokenizer from the checkpoint's tokenizer
files or GGUF metadata, reads generation_config.json, and answers the questions every face asks of a
checkpoint: which token ids end a turn, which sampling defaults it ships, whether it is an instruct model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from qwen25.config import IM_END_ID, GenerationDefaults, ModelConfig
from qwen25.model.qwen2 import Qwen2ForCausalLM
from qwen25.runtime import cyclic_gc_paused, release_free_heap
from qwen25.sampling_params import SamplingParams
from qwen25.tokenizer import Tokenizer
from qwen25.weights.errors import CheckpointError
from qwen25.weights.loader import LoadedWeights, load_weights

# Qwen2.5-Instruct's shipped generation_config.json (SPEC §1.1), used for instruct checkpoints that carry
# none (a GGUF file has no generation config).
QWEN25_INSTRUCT_DEFAULTS = dict(temperature=0.7, top_p=0.8, top_k=20, repetition_penalty=1.05)

__all__ = ["Checkpoint", "CheckpointError", "QWEN25_INSTRUCT_DEFAULTS", "default_sampling_params", "is_instruct",
           "load", "load_generation_defaults", "load_tokenizer", "stop_token_ids"]


@dataclass
class Checkpoint:
    config: ModelConfig
    model: Qwen2ForCausalLM
    tokenizer: Tokenizer
    generation_defaults: GenerationDefaults | None
    source: Path
    format: str  # "gguf" or "hf"
    quantization: str | None = None  # "q8" / "q4" / "gguf" when the model holds ggml blocks


def load(path: str | Path, dtype: torch.dtype = torch.float32, quantization: str | None = None,
         trainable: bool = False) -> Checkpoint:
    """Load a .gguf file or an HF directory (see `weights.loader.load_weights`).

    trainable=True gives a model in train mode whose parameters require grad (float weights only: a quantized
    load refuses it); the default is a frozen model in eval mode."""
    path = Path(path)
    if path.is_dir() and (path / "config.json").is_file():
        _require_tokenizer_files(path)  # before the (slow) weights
    with cyclic_gc_paused():  # the vocabulary's ~300k objects would otherwise set off full collections
        weights = load_weights(path, dtype, quantization, trainable=trainable)
        checkpoint = Checkpoint(weights.config, weights.model, _tokenizer(weights), _generation_defaults(weights),
                                weights.source, weights.format, weights.quantization)
    del weights  # the GGUF header's vocabulary lists (300k strings) go with it
    release_free_heap()  # building the vocabulary freed tens of MB in small pieces: give them back to the OS
    return checkpoint


def load_tokenizer(path: str | Path) -> Tokenizer:
    """The tokenizer of an HF directory (tokenizer.json + tokenizer_config.json) or a .gguf file, no weights."""
    path = Path(path)
    if path.is_dir():
        return Tokenizer.from_pretrained_dir(path)
    from qwen25.weights.gguf import GGUFFile

    with GGUFFile(path) as g:
        return Tokenizer.from_gguf_metadata(g.metadata)


def load_generation_defaults(directory: Path) -> GenerationDefaults | None:
    """An HF directory's generation_config.json, or None when it has none."""
    path = Path(directory) / "generation_config.json"
    return GenerationDefaults.from_dict(json.loads(path.read_text())) if path.is_file() else None


def _require_tokenizer_files(directory: Path) -> None:
    if not (directory / "tokenizer.json").is_file():
        raise CheckpointError(f"{directory}: no tokenizer.json")


def _tokenizer(weights: LoadedWeights) -> Tokenizer:
    if weights.gguf_metadata is not None:
        return Tokenizer.from_gguf_metadata(weights.gguf_metadata)
    _require_tokenizer_files(weights.origin)
    return Tokenizer.from_pretrained_dir(weights.origin)


def _generation_defaults(weights: LoadedWeights) -> GenerationDefaults | None:
    return load_generation_defaults(weights.origin) if weights.origin.is_dir() else None  # GGUF files ship none


# --- facts every face asks of a checkpoint ---------------------------------------------------------------
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
