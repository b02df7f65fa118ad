"""Turn a checkpoint on disk (GGUF file or HF directory) into a model and its config.

Owns the dispatch by format and the meta-device build + `assign=True` load (no randomly initialised copy
of the weights is ever allocated). Parsing lives in `weights.gguf` / `weights.safetensors`; the tokenizer and
generation defaults are assembled one level up, in `qwen25.checkpoint`, from the places this reports.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from qwen25.config import ModelConfig
from qwen25.model.qwen2 import Qwen2ForCausalLM
from qwen25.weights.errors import CheckpointError
from qwen25.weights.safetensors import load_safetensors

QUANTIZATIONS = ("none", "q8", "q4", "gguf")  # gguf: a GGUF file's own blocks (weights.gguf_blocks)

__all__ = ["QUANTIZATIONS", "CheckpointError", "LoadedWeights", "load_weights", "model_from_state_dict"]


@dataclass
class LoadedWeights:
    """A loaded model and its config, and where the rest of the checkpoint (tokenizer files,
    generation_config.json) lives."""

    config: ModelConfig
    model: Qwen2ForCausalLM
    source: Path  # the file or directory the weights were read from
    format: str  # "gguf" or "hf": the kind of checkpoint `origin` is
    quantization: str | None  # "q8" / "q4" / "gguf" when the model holds ggml blocks
    origin: Path  # where the config and tokenizer live (`source`)
    gguf_metadata: dict[str, Any] | None = None  # the GGUF header (holds the vocabulary) when format is "gguf"


def model_from_state_dict(config: ModelConfig, state_dict: dict[str, torch.Tensor], source: str = "",
                          trainable: bool = False) -> Qwen2ForCausalLM:
    """Build a Qwen2ForCausalLM on the meta device and assign the given tensors (HF names) to it.

    The model comes back frozen in eval mode, or with trainable=True in train mode with every parameter
    requiring grad (the tensors' dtype is kept)."""
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
    model.model.reset_rope()  # non-persistent buffer: make sure it is a real CPU tensor after the meta build
    if trainable:
        return model.train().requires_grad_(True)
    return model.eval().requires_grad_(False)


def load_hf_directory(path: Path, dtype: torch.dtype, quantization: str | None = None,
                      trainable: bool = False) -> LoadedWeights:
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path}: no config.json (not an HF model directory)")
    config = ModelConfig.from_json_file(path / "config.json")
    if quantization in ("q8", "q4"):
        from qwen25.weights.quantized import quantize_weights, safetensors_tensors

        model = quantize_weights(config, *safetensors_tensors(config, path), bits=int(quantization[1]))
    else:
        model = model_from_state_dict(config, load_safetensors(path, dtype=dtype), str(path), trainable)
    return LoadedWeights(config, model, path, "hf", quantization, path)


def load_gguf(path: Path, dtype: torch.dtype, quantization: str | None = None,
              trainable: bool = False) -> LoadedWeights:
    from qwen25.weights.gguf import GGUFFile, config_from_gguf, load_gguf_state_dict

    gguf = GGUFFile(path)
    config = config_from_gguf(gguf)
    if quantization == "gguf":
        from qwen25.weights.gguf_blocks import load_gguf_blocks

        model = load_gguf_blocks(gguf, config)
    elif quantization in ("q8", "q4"):
        from qwen25.weights.quantized import gguf_tensors, quantize_weights

        model = quantize_weights(config, *gguf_tensors(gguf), bits=int(quantization[1]))
    else:
        model = model_from_state_dict(config, load_gguf_state_dict(gguf, dtype=dtype), str(path), trainable)
    return LoadedWeights(config, model, path, "gguf", quantization, path, gguf.metadata)


def block_kernels_run_here() -> bool:
    """Whether the block kernels (qwen25.kernels: a C compiler and AVX2) that run "gguf", "q8" and "q4" weights
    build and load on this machine."""
    from qwen25.kernels import load_ggml_kernels

    try:
        return load_ggml_kernels() is not None
    except ValueError:  # QWEN25_ISA names a level this CPU lacks
        return False


def default_quantization(path: Path, lora: bool = False) -> str:
    """What quantization="auto" means for `path`: a GGUF file's own blocks ("gguf"), or Q8_0 blocks made at load
    for a GGUF with a LoRA adapter to merge ("q8"), or for another file; an HF directory keeps its float weights
    ("none"). Where the block kernels cannot run, "none" (dequantized weights, PyTorch)."""
    if not block_kernels_run_here():
        return "none"
    return "gguf" if _is_gguf(path) and not lora else "q8" if path.is_file() else "none"


def _is_gguf(path: Path) -> bool:
    """A GGUF file, by its magic bytes or its name."""
    if path.suffix == ".gguf":
        return True
    if not path.is_file():
        return False
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def load_weights(path: str | Path, dtype: torch.dtype = torch.float32, quantization: str | None = None,
                 trainable: bool = False) -> LoadedWeights:
    """Load the model of a .gguf file or an HF directory (config.json + safetensors).

    quantization: None/"none" keeps `dtype` weights (dequantized for GGUF: the reference path); "gguf" runs a GGUF
    file's own blocks, memory-mapped (see `weights.gguf_blocks`); "q8" / "q4" quantize the checkpoint's weights
    to Q8_0 / Q4_K+Q5_0 blocks in memory, streamed tensor by tensor, run by the same layers (see
    `weights.quantized`).
    trainable: parameters that require grad, in train mode (float weights only; see `model_from_state_dict`)."""
    if quantization not in (None, *QUANTIZATIONS):
        raise ValueError(f"quantization must be one of {QUANTIZATIONS}, got {quantization!r}")
    quantization = None if quantization == "none" else quantization
    if trainable and quantization is not None:
        raise ValueError(f"trainable=True needs float weights, but quantization={quantization!r} holds quantized "
                         "blocks that take no gradient; load with quantization='none'")
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or directory")
    if quantization is not None and not block_kernels_run_here():
        from qwen25.kernels import kernels_line

        raise CheckpointError(f"quantization={quantization!r} runs on the block kernels, which cannot run here "
                              f"({kernels_line()}); load with quantization='none' (dequantized weights)")
    is_gguf = _is_gguf(path)
    if quantization == "gguf" and not is_gguf:
        raise ValueError(f"{path}: quantization 'gguf' runs a GGUF file's own blocks; this is not a GGUF file "
                         "(use 'q8', 'q4' or 'none')")
    if path.is_dir():
        return load_hf_directory(path, dtype, quantization, trainable)
    if is_gguf:
        return load_gguf(path, dtype, quantization, trainable)
    if path.suffix == ".safetensors":  # what `qwen25 quantize` wrote before it wrote GGUF files
        raise CheckpointError(f"{path}: a lone .safetensors file is not a checkpoint qwen25 loads (an older "
                              "`qwen25 quantize` output?); load its source, or `qwen25 quantize` it to a .gguf")
    raise CheckpointError(f"{path}: neither a GGUF file nor an HF model directory")
