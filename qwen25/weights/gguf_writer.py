"""GGUF v3 writer: a qwen2 model as a file llama.cpp loads, with F32, F16, Q8_0, Q5_0 or Q4_K tensors.

Owns the format on the writing side (ggml/docs/gguf.md): magic, version, counts, typed key/value metadata,
tensor infos, then the tensor data, each tensor at an `general.alignment` (32) boundary (the blocks come from
`weights.block_quant`); the qwen2 metadata llama.cpp reads (`qwen2.*`, `tokenizer.ggml.*`, `tokenizer.chat_template`);
the HF -> GGUF tensor names (the inverse of `weights.gguf`'s table). Does not import the `gguf` package.
The tokenizer is read through its attributes (qwen25's `Tokenizer`); nothing here builds one.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

from qwen25.config import ModelConfig
from qwen25.weights.gguf import (
    _BLOCK_NAMES,
    _GLOBAL_NAMES,
    DEFAULT_ALIGNMENT,
    GGUF_MAGIC,
)
from qwen25.weights.gguf_reader import _VT
from qwen25.weights.block_quant import QUANTIZERS, quantize_blocks
from qwen25.weights.quants import BLOCK_SIZES, GGMLType, tensor_nbytes

GGUF_VERSION = 3
GGUF_TYPES = {"f32": GGMLType.F32, "f16": GGMLType.F16, "q8_0": GGMLType.Q8_0}
# llama.cpp `enum llama_ftype` for general.file_type: all F32, mostly F16, mostly Q8_0
_FILE_TYPES = {GGMLType.F32: 0, GGMLType.F16: 1, GGMLType.Q8_0: 7}
TensorTypes = Callable[[str, tuple[int, ...]], GGMLType]  # (HF name, shape) -> the type to write it in
# llama.cpp `llama_token_type` values (tokenizer.ggml.token_type)
TOKEN_NORMAL, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED = 1, 3, 4, 5
QK8_0 = 32

_HF_TO_GGUF_GLOBAL = {hf: g for g, hf in _GLOBAL_NAMES.items()}
_HF_TO_GGUF_BLOCK = {hf: g for g, hf in _BLOCK_NAMES.items()}

__all__ = ["GGUF_TYPES", "gguf_tensor_name", "qwen2_metadata", "tokenizer_metadata", "write_gguf",
           "write_qwen2_gguf"]


class Typed:
    """A metadata value with an explicit GGUF type (default typing: bool, int -> UINT32, float -> FLOAT32, str,
    lists of str / int (INT32) / float)."""

    def __init__(self, value: Any, vtype: _VT, item_type: _VT | None = None) -> None:
        self.value, self.vtype, self.item_type = value, vtype, item_type


_SCALAR = {_VT.UINT8: "<B", _VT.INT8: "<b", _VT.UINT16: "<H", _VT.INT16: "<h", _VT.UINT32: "<I", _VT.INT32: "<i",
           _VT.FLOAT32: "<f", _VT.BOOL: "<?", _VT.UINT64: "<Q", _VT.INT64: "<q", _VT.FLOAT64: "<d"}


def _string(s: str) -> bytes:
    data = s.encode("utf-8", "surrogateescape")  # the reader's inverse: token bytes survive exactly
    return struct.pack("<Q", len(data)) + data


def _infer(value: Any) -> Typed:
    if isinstance(value, Typed):
        return value
    if isinstance(value, bool):
        return Typed(value, _VT.BOOL)
    if isinstance(value, int):
        return Typed(value, _VT.UINT32 if 0 <= value < 2**32 else _VT.INT64)
    if isinstance(value, float):
        return Typed(value, _VT.FLOAT32)
    if isinstance(value, str):
        return Typed(value, _VT.STRING)
    if isinstance(value, (list, tuple)):
        first = value[0] if value else ""
        item = _VT.STRING if isinstance(first, str) else _VT.FLOAT32 if isinstance(first, float) else \
            _VT.BOOL if isinstance(first, bool) else _VT.INT32
        return Typed(list(value), _VT.ARRAY, item)
    raise TypeError(f"GGUF metadata cannot hold {type(value).__name__}: {value!r}")


def _encode_value(t: Typed) -> bytes:
    if t.vtype == _VT.STRING:
        return _string(t.value)
    if t.vtype == _VT.ARRAY:
        head = struct.pack("<IQ", t.item_type, len(t.value))
        if t.item_type == _VT.STRING:
            return head + b"".join(_string(s) for s in t.value)
        return head + np.asarray(t.value, dtype=_SCALAR[t.item_type]).tobytes()
    return struct.pack(_SCALAR[t.vtype], t.value)


# --- tensor encodings ----------------------------------------------------------------------------------------
def _encode_tensor(x: np.ndarray, ggml_type: GGMLType) -> bytes:
    if ggml_type == GGMLType.F32:
        return np.ascontiguousarray(x, dtype="<f4").tobytes()
    if ggml_type == GGMLType.F16:
        return np.ascontiguousarray(x, dtype="<f2").tobytes()
    if ggml_type in QUANTIZERS:
        return quantize_blocks(x, ggml_type).tobytes()
    raise ValueError(f"the GGUF writer encodes F32, F16, {', '.join(t.name for t in QUANTIZERS)}, not "
                     f"{ggml_type.name}")


# --- the file ------------------------------------------------------------------------------------------------
TensorSource = tuple[str, tuple[int, ...], GGMLType, Callable[[], np.ndarray]]


def write_gguf(path: str | os.PathLike, metadata: Mapping[str, Any], tensors: Iterable[TensorSource],
               alignment: int = DEFAULT_ALIGNMENT) -> None:
    """Write a GGUF v3 file: `metadata` {key: value or Typed}, then each tensor (name, torch-order shape, type,
    a callable giving its float array, called once when its data is written: big models stream)."""
    tensors = list(tensors)
    for name, shape, ggml_type, _ in tensors:
        block = BLOCK_SIZES[ggml_type][0]
        if shape[-1] % block:
            raise ValueError(f"tensor {name}: row length {shape[-1]} is not a multiple of {block} "
                             f"({ggml_type.name} blocks)")
    meta = dict(metadata)
    if alignment != DEFAULT_ALIGNMENT:
        meta["general.alignment"] = Typed(alignment, _VT.UINT32)
    with open(path, "wb") as f:
        f.write(GGUF_MAGIC + struct.pack("<IQQ", GGUF_VERSION, len(tensors), len(meta)))
        for key, value in meta.items():
            t = _infer(value)
            f.write(_string(key) + struct.pack("<I", t.vtype) + _encode_value(t))
        offset = 0
        for name, shape, ggml_type, _ in tensors:
            ne = tuple(reversed(shape))  # ggml order: the row (contiguous) dimension first
            f.write(_string(name) + struct.pack(f"<I{len(ne)}QIQ", len(ne), *ne, ggml_type, offset))
            offset += -(-tensor_nbytes(ggml_type, shape) // alignment) * alignment
        _pad(f, alignment)
        for name, shape, ggml_type, get in tensors:
            array = get()
            if tuple(array.shape) != tuple(shape):
                raise ValueError(f"tensor {name}: got shape {tuple(array.shape)}, declared {tuple(shape)}")
            f.write(_encode_tensor(array, ggml_type))
            _pad(f, alignment)


def _pad(f: BinaryIO, alignment: int) -> None:
    f.write(b"\0" * (-f.tell() % alignment))


# --- qwen2 ---------------------------------------------------------------------------------------------------
def gguf_tensor_name(hf_name: str) -> str:
    """model.layers.3.self_attn.q_proj.bias -> blk.3.attn_q.bias (the inverse of `weights.gguf.hf_tensor_name`)."""
    stem, _, suffix = hf_name.rpartition(".")
    if stem in _HF_TO_GGUF_GLOBAL:
        return f"{_HF_TO_GGUF_GLOBAL[stem]}.{suffix}"
    parts = stem.split(".", 3)
    if len(parts) == 4 and parts[:2] == ["model", "layers"] and parts[3] in _HF_TO_GGUF_BLOCK:
        return f"blk.{int(parts[2])}.{_HF_TO_GGUF_BLOCK[parts[3]]}.{suffix}"
    raise ValueError(f"no GGUF name for tensor {hf_name!r}: not part of a qwen2 model")


def qwen2_metadata(config: ModelConfig, name: str = "qwen2") -> dict[str, Any]:
    """general.* and qwen2.* keys, typed as llama.cpp's converter writes them."""
    md: dict[str, Any] = {
        "general.architecture": "qwen2", "general.type": "model", "general.name": name,
        "qwen2.block_count": config.num_hidden_layers, "qwen2.context_length": config.max_position_embeddings,
        "qwen2.embedding_length": config.hidden_size, "qwen2.feed_forward_length": config.intermediate_size,
        "qwen2.attention.head_count": config.num_attention_heads,
        "qwen2.attention.head_count_kv": config.num_key_value_heads,
        "qwen2.rope.freq_base": float(config.rope_theta),
        "qwen2.attention.layer_norm_rms_epsilon": float(config.rms_norm_eps),
    }
    if config.head_dim * config.num_attention_heads != config.hidden_size:
        md["qwen2.attention.key_length"] = md["qwen2.attention.value_length"] = config.head_dim
    scaling = config.rope_scaling or {}
    kind = scaling.get("type") or scaling.get("rope_type")
    if kind in ("yarn", "linear"):
        md["qwen2.rope.scaling.type"] = kind
        md["qwen2.rope.scaling.factor"] = float(scaling["factor"])
        if "original_max_position_embeddings" in scaling:
            md["qwen2.rope.scaling.original_context_length"] = int(scaling["original_max_position_embeddings"])
    elif kind not in (None, "default"):
        raise ValueError(f"rope_scaling type {kind!r} has no GGUF encoding that qwen25 writes")
    return md


def _looks_special(token: str) -> bool:
    # llama.cpp's converter types `<|...|>` added tokens as CONTROL even when the HF config says special: false
    return token.startswith("<|") and token.endswith("|>")


def tokenizer_metadata(tokenizer: Any, vocab_size: int) -> dict[str, Any]:
    """tokenizer.ggml.* and tokenizer.chat_template from a qwen25 `Tokenizer` (read through `backend`,
    `added_ids`, `special_ids`, `bos/eos/pad_token_id`, `chat_template`), the vocabulary padded to the
    embedding's `vocab_size` with `[PADi]` entries typed UNUSED, as llama.cpp's converter does."""
    import json

    backend = tokenizer.backend
    spec = json.loads(backend.to_str())
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    tokens: list[str] = []
    types: list[int] = []
    for i in range(vocab_size):
        token = backend.id_to_token(i)
        if token is None or token == f"[PAD{i}]":
            tokens.append(f"[PAD{i}]")
            types.append(TOKEN_UNUSED)
        elif i in tokenizer.added_ids:
            tokens.append(token)
            types.append(TOKEN_CONTROL if i in tokenizer.special_ids or _looks_special(token) else TOKEN_USER_DEFINED)
        else:
            tokens.append(token)
            types.append(TOKEN_NORMAL)
    if backend.get_vocab_size(with_added_tokens=True) > vocab_size:
        raise ValueError(f"the tokenizer has {backend.get_vocab_size(with_added_tokens=True)} tokens, more than the "
                         f"model's {vocab_size} embeddings")
    md: dict[str, Any] = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "qwen2",
                          "tokenizer.ggml.tokens": tokens,
                          "tokenizer.ggml.token_type": Typed(types, _VT.ARRAY, _VT.INT32),
                          "tokenizer.ggml.merges": merges}
    for key, value in (("eos", tokenizer.eos_token_id), ("padding", tokenizer.pad_token_id),
                       ("bos", tokenizer.bos_token_id)):
        if value is not None:
            md[f"tokenizer.ggml.{key}_token_id"] = int(value)
    md["tokenizer.ggml.add_bos_token"] = False
    if tokenizer.chat_template:
        md["tokenizer.chat_template"] = tokenizer.chat_template
    return md


def _ggml_type(shape: tuple[int, ...], wanted: GGMLType) -> GGMLType:
    # llama.cpp's converter: 1-D tensors (norms, biases) stay F32; rows that do not fill Q8_0 blocks fall back to F16
    if len(shape) == 1:
        return GGMLType.F32
    if wanted == GGMLType.Q8_0 and shape[-1] % QK8_0:
        return GGMLType.F16
    return wanted


def write_qwen2_gguf(path: str | os.PathLike, state_dict: Mapping[str, torch.Tensor], config: ModelConfig,
                     tokenizer: Any, dtype: str = "f16", name: str = "qwen2", types: TensorTypes | None = None,
                     file_type: int | None = None, shapes: Mapping[str, tuple[int, ...]] | None = None) -> None:
    """Write an HF-named float state dict (tied lm_head left out) as a qwen2 GGUF llama.cpp runs. The state
    dict may be a lazy mapping, each tensor read once, when it is written; `shapes` then gives the shapes up front.

    dtype: "f32", "f16" or "q8_0" for the 2-D weights (1-D tensors are always F32); or `types` picks each 2-D
    weight's type (a quantized mix, `general.file_type` then being `file_type`, llama.cpp's `llama_ftype`)."""
    if dtype not in GGUF_TYPES:
        raise ValueError(f"GGUF dtype {dtype!r}: one of {', '.join(GGUF_TYPES)}")
    wanted = GGUF_TYPES[dtype]
    kind = _FILE_TYPES[wanted] if types is None else file_type
    metadata = {**qwen2_metadata(config, name), **({} if kind is None else {"general.file_type": kind}),
                "general.quantization_version": 2, **tokenizer_metadata(tokenizer, config.vocab_size)}
    names = [n for n in state_dict if not (config.tie_word_embeddings and n == "lm_head.weight")]
    order = sorted(names, key=_tensor_order)
    tensors: list[TensorSource] = []
    for hf in order:
        shape = tuple(shapes[hf] if shapes is not None else state_dict[hf].shape)
        ttype = _ggml_type(shape, wanted) if types is None or len(shape) == 1 else types(hf, shape)
        tensors.append((gguf_tensor_name(hf), shape, ttype,
                        lambda hf=hf: state_dict[hf].detach().float().cpu().numpy()))
    write_gguf(Path(path), metadata, tensors)


def _tensor_order(hf_name: str) -> tuple[int, int, str]:
    """token_embd first, then the blocks in order, then output_norm and output (llama.cpp's converter order)."""
    if hf_name.startswith("model.layers."):
        return 1, int(hf_name.split(".")[2]), hf_name
    return (0 if "embed_tokens" in hf_name else 2), 0, hf_name
