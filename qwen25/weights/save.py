"""Write a model as an HF model directory: what `transformers.AutoModelForCausalLM`/`AutoTokenizer`, vLLM,
`qwen25.checkpoint.load` and `LLM(dir)` load.

Owns the layout: config.json (HF `Qwen2Config` keys), generation_config.json, model.safetensors (or shards
`model-0000i-of-0000n.safetensors` + model.safetensors.index.json past `max_shard_size`), and the tokenizer
files (tokenizer.json + tokenizer_config.json with the chat template). Tied embeddings are written once, as HF
does (no lm_head.weight). Files go straight into `out_dir`: making the whole directory appear atomically (a
temporary name, then rename) is the caller's job, as `weights.export` and the trainer's checkpoints do.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from qwen25.config import GenerationDefaults, ModelConfig
from qwen25.weights.safetensors import save_safetensors

DEFAULT_MAX_SHARD_SIZE = 5 * 10**9  # transformers' default of 5GB
DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
_HF_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
# the files of an HF tokenizer that `tokenizer_dir=` copies (whichever exist)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "chat_template.json",
                   "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt")

__all__ = ["DEFAULT_MAX_SHARD_SIZE", "DTYPES", "hf_state_dict", "parse_size", "save_hf_directory"]


class SavableTokenizer(Protocol):
    """What is asked of a tokenizer object (qwen25's `Tokenizer` is one): writing its HF files into a directory."""

    def save(self, directory: str | Path) -> Any: ...


def parse_size(size: int | str) -> int:
    """Bytes from an int or a string such as "2GB", "500MB", "1GiB" (HF's units: GB = 10**9, GiB = 2**30)."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B)?\s*", size.upper())
    if m is None:
        raise ValueError(f"max_shard_size {size!r}: expected bytes or a size such as '2GB' or '500MB'")
    unit = m[2] or "B"
    power = "BKMGT".index(unit[0]) if unit != "B" else 0
    return int(float(m[1]) * ((1024 if "I" in unit else 1000) ** power))


def hf_state_dict(model: nn.Module, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The model's tensors under HF names, tied lm_head left out, cast to `dtype` when given.

    Refuses a model with LoRA layers (merge them first) or with an engine's fused/quantized projections."""
    config: ModelConfig = model.config
    state = {_clean(k): v for k, v in model.state_dict().items()}
    odd = [k for k in state if ".lora_" in k or "qkv_proj" in k or "gate_up_proj" in k or not k.endswith(
        (".weight", ".bias"))]
    if odd:
        hint = "merge the adapter first (qwen25.train.lora.merge_lora)" if ".lora_" in odd[0] else \
            "load the model with quantization='none'"
        raise ValueError(f"cannot save {odd[0]}: not a plain Qwen2 float tensor; {hint}")
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    return {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).detach().contiguous()
            for k, v in state.items()}


def _clean(name: str) -> str:
    """HF's name for a parameter of a wrapped module (activation checkpointing, torch.compile)."""
    return name.replace("_checkpoint_wrapped_module.", "").replace("_orig_mod.", "")


def _config_dict(config: ModelConfig, dtype: torch.dtype) -> dict[str, Any]:
    d = config.to_dict()
    d["torch_dtype"] = _HF_DTYPE_NAMES.get(dtype, "float32")
    d.setdefault("use_cache", True)
    if d.get("max_window_layers") is None:  # HF's Qwen2Config wants an int here; Qwen ships the layer count
        d["max_window_layers"] = config.num_hidden_layers
    return dict(sorted(d.items()))


def _generation_dict(generation_config: Mapping[str, Any] | GenerationDefaults, config: ModelConfig) -> dict:
    if isinstance(generation_config, GenerationDefaults):
        g = generation_config
        d: dict[str, Any] = {"bos_token_id": config.bos_token_id,
                             "eos_token_id": g.eos_token_ids or config.eos_token_ids}
        sampling = {k: getattr(g, k) for k in ("temperature", "top_p", "top_k", "repetition_penalty")}
        if sampling["temperature"] == 0.0:
            d["do_sample"] = False
            sampling.pop("temperature")
        elif any(v is not None for v in sampling.values()):
            d["do_sample"] = True
        d.update({k: v for k, v in sampling.items() if v is not None})
        return d
    return dict(generation_config)


def _write_weights(state: dict[str, torch.Tensor], out: Path, max_shard_size: int) -> list[str]:
    """model.safetensors, or shards + index past max_shard_size (a tensor never splits across shards)."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name in sorted(state):
        nbytes = state[name].numel() * state[name].element_size()
        if shards[-1] and size + nbytes > max_shard_size:
            shards.append({})
            size = 0
        shards[-1][name] = state[name]
        size += nbytes
    if len(shards) == 1:
        save_safetensors(shards[0], out / "model.safetensors")
        return ["model.safetensors"]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map: dict[str, str] = {}
    for file, shard in zip(names, shards, strict=True):
        save_safetensors(shard, out / file)
        weight_map.update(dict.fromkeys(shard, file))
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return [*names, "model.safetensors.index.json"]


def save_hf_directory(model: nn.Module, out_dir: str | Path, *, tokenizer: SavableTokenizer | None = None,
                      tokenizer_dir: str | Path | None = None,
                      generation_config: Mapping[str, Any] | GenerationDefaults | None = None,
                      max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
                      dtype: torch.dtype | str | None = None) -> Path:
    """Write `model` (a float, unfused Qwen2ForCausalLM) as an HF directory in `out_dir` (created if needed).

    tokenizer: an object whose `save(dir)` writes tokenizer.json + tokenizer_config.json (qwen25's Tokenizer,
    whatever it was built from, a GGUF's vocabulary included); or tokenizer_dir: an HF directory whose
    tokenizer files are copied. generation_config: a dict of HF keys or qwen25's GenerationDefaults; without
    it only bos/eos are written. dtype: "f32"/"f16"/"bf16" or a torch dtype (default: the model's)."""
    if tokenizer is not None and tokenizer_dir is not None:
        raise ValueError("give tokenizer or tokenizer_dir, not both")
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype {dtype!r}: an HF directory holds one of {', '.join(DTYPES)}")
        dtype = DTYPES[dtype]
    config: ModelConfig = model.config
    state = hf_state_dict(model, dtype)
    written = next((t.dtype for t in state.values() if t.is_floating_point()), torch.float32)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _write_weights(state, out, parse_size(max_shard_size))
    (out / "config.json").write_text(json.dumps(_config_dict(config, written), indent=2) + "\n")
    generation = _generation_dict(generation_config, config) if generation_config is not None else {
        "bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    if tokenizer is not None:
        tokenizer.save(out)
    elif tokenizer_dir is not None:
        source = Path(tokenizer_dir)
        if not (source / "tokenizer.json").is_file():
            raise FileNotFoundError(f"{source}: no tokenizer.json to copy")
        for name in TOKENIZER_FILES:
            if (source / name).is_file():
                shutil.copyfile(source / name, out / name)
    return out
