"""Turn a checkpoint on disk (GGUF file or HF directory) into a ready model, tokenizer and defaults.

Owns the dispatch by format and the meta-device build + `assign=True` load (no randomly initialised copy
of the weights is ever allocated). Parsing lives in `weights.gguf` / `weights.safetensors`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from qwen25.config import GenerationDefaults, ModelConfig
from qwen25.model.layers import rope_inv_freq
from qwen25.model.qwen2 import Qwen2ForCausalLM
from qwen25.weights.safetensors import load_safetensors

if TYPE_CHECKING:
    from qwen25.tokenizer import Tokenizer


class CheckpointError(ValueError):
    """A checkpoint is incomplete or inconsistent (missing files, tensors or shapes)."""


@dataclass
class Checkpoint:
    config: ModelConfig
    model: Qwen2ForCausalLM
    tokenizer: "Tokenizer"
    generation_defaults: GenerationDefaults | None
    source: Path
    format: str  # "gguf" or "hf"
    quantization: str | None = None  # "q8" / "q4" when the model holds quantized weights


def model_from_state_dict(config: ModelConfig, state_dict: dict[str, torch.Tensor], source: str = "") -> Qwen2ForCausalLM:
    """Build a Qwen2ForCausalLM on the meta device and assign the given tensors (HF names) to it."""
    with torch.device("meta"):
        model = Qwen2ForCausalLM(config)
    state_dict = dict(state_dict)
    if config.tie_word_embeddings:
        state_dict["lm_head.weight"] = state_dict.get("model.embed_tokens.weight")  # re-tied below
    expected = model.state_dict()
    missing = [k for k in expected if state_dict.get(k) is None]
    if missing:
        raise CheckpointError(f"{source}: checkpoint lacks {len(missing)} tensors, e.g. {missing[:3]}")
    unexpected = [k for k in state_dict if k not in expected]
    if unexpected:
        raise CheckpointError(f"{source}: checkpoint has tensors this architecture does not use: {unexpected[:3]}")
    for name, ref in expected.items():
        if tuple(state_dict[name].shape) != tuple(ref.shape):
            raise CheckpointError(f"{source}: tensor {name} has shape {tuple(state_dict[name].shape)}, "
                                  f"config implies {tuple(ref.shape)}")
    model.load_state_dict(state_dict, assign=True, strict=True)
    model.tie_weights()
    inv_freq, _ = rope_inv_freq(config.head_dim, config.rope_theta, config.rope_scaling)
    model.model.inv_freq = inv_freq  # non-persistent buffer: was created on the meta device
    return model.eval().requires_grad_(False)


def _hf_parts(path: Path) -> tuple[ModelConfig, "Tokenizer", GenerationDefaults | None]:
    """An HF directory's config, tokenizer and generation defaults (no weights)."""
    from qwen25.tokenizer import Tokenizer

    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path}: no config.json (not an HF model directory)")
    if not (path / "tokenizer.json").is_file():
        raise CheckpointError(f"{path}: no tokenizer.json")
    config = ModelConfig.from_json_file(path / "config.json")
    gen_path = path / "generation_config.json"
    defaults = GenerationDefaults.from_dict(json.loads(gen_path.read_text())) if gen_path.is_file() else None
    return config, Tokenizer.from_pretrained_dir(path), defaults


def load_hf_directory(path: Path, dtype: torch.dtype, quantization: str | None = None) -> Checkpoint:
    config, tokenizer, defaults = _hf_parts(path)
    if quantization in ("q8", "q4"):
        from qwen25.weights.quantized import load_quantized

        model = load_quantized(path, config, bits=int(quantization[1]))  # streamed from the mapped shards
    else:
        model = model_from_state_dict(config, load_safetensors(path, dtype=dtype), str(path))
    return Checkpoint(config, model, tokenizer, defaults, path, "hf", quantization)


def load_gguf(path: Path, dtype: torch.dtype, quantization: str | None = None) -> Checkpoint:
    from qwen25.tokenizer import Tokenizer
    from qwen25.weights.gguf import GGUFFile, config_from_gguf, load_gguf_state_dict

    gguf = GGUFFile(path)
    config = config_from_gguf(gguf)
    if quantization in ("q8", "q4"):
        from qwen25.weights.quantized import load_quantized

        model = load_quantized(path, config, bits=int(quantization[1]), gguf=gguf)
    else:
        model = model_from_state_dict(config, load_gguf_state_dict(gguf, dtype=dtype), str(path))
    tokenizer = Tokenizer.from_gguf_metadata(gguf.metadata)
    return Checkpoint(config, model, tokenizer, None, path, "gguf", quantization)


def load_quantized_file(path: Path, quantization: str | None) -> Checkpoint:
    """A file written by `qwen25 quantize --output`: weights from it; config, tokenizer and generation defaults
    from the checkpoint it was made from (named in its metadata), which must still exist."""
    from qwen25.weights.quantized import model_from_quantized_state_dict, read_quantized_metadata

    meta = read_quantized_metadata(path)
    kind = f"q{meta['bits']}"
    if quantization is None:
        raise ValueError(f"{path}: holds {kind} weights and cannot be loaded unquantized; use quantization "
                         f"'{kind}' or 'auto'")
    source = Path(meta["source"])
    if not source.exists():
        raise CheckpointError(f"{path}: made from {source}, which no longer exists (the config and tokenizer "
                              "are read from there)")
    if source.is_dir():
        config, tokenizer, defaults = _hf_parts(source)
    else:
        from qwen25.tokenizer import Tokenizer
        from qwen25.weights.gguf import GGUFFile, config_from_gguf

        gguf = GGUFFile(source)
        config, tokenizer, defaults = config_from_gguf(gguf), Tokenizer.from_gguf_metadata(gguf.metadata), None
    model = model_from_quantized_state_dict(config, load_safetensors(path))
    return Checkpoint(config, model, tokenizer, defaults, path, "hf" if source.is_dir() else "gguf", kind)


QUANTIZATIONS = ("none", "q8", "q4")


def load_checkpoint(path: str | Path, dtype: torch.dtype = torch.float32, quantization: str | None = None) -> Checkpoint:
    """Load a .gguf file or an HF directory (config.json + safetensors + tokenizer files).

    quantization: None/"none" keeps `dtype` weights (dequantized for GGUF: the reference path); "q8" / "q4" give
    the fast int8 / int4 model with fused projections, memory-mapped from the repack cache when `qwen25 quantize`
    (or an earlier load) wrote it, else streamed from the checkpoint and cached (see `weights.quantized`).
    A .safetensors file written by `qwen25 quantize --output` loads as the format it holds."""
    if quantization not in (None, *QUANTIZATIONS):
        raise ValueError(f"quantization must be one of {QUANTIZATIONS}, got {quantization!r}")
    quantization = None if quantization == "none" else quantization
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or directory")
    if path.is_dir():
        return load_hf_directory(path, dtype, quantization)
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic == b"GGUF" or path.suffix == ".gguf":
        return load_gguf(path, dtype, quantization)
    if path.suffix == ".safetensors":
        return load_quantized_file(path, quantization)
    raise CheckpointError(f"{path}: neither a GGUF file, an HF model directory nor a `qwen25 quantize` output")
