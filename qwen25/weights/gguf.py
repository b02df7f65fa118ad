"""GGUF v2/v3 reader: header, metadata and tensor table over one read-only memory map; the GGUF -> HF name table;
`ModelConfig` and an HF-named state dict from a qwen2 GGUF.

Owns the file format only; the metadata values are read by `gguf_reader.py`'s cursor. Bit layouts of the quantized
types live in `quants.py`; the tokenizer reads its vocabulary from `GGUFFile.metadata`. Does not import the `gguf`
package (that is a test-only reference).
Format: ggml/docs/gguf.md — magic, version, counts, key/value pairs, tensor infos, then aligned tensor data.
"""

from __future__ import annotations

import math
import mmap
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qwen25.config import ModelConfig
from qwen25.weights.gguf_reader import GGUFError, _Reader
from qwen25.weights.huge_pages import map_on_huge_pages
from qwen25.weights.quants import BLOCK_SIZES, SUPPORTED_TYPES, GGMLType, UnsupportedQuantError, dequantize

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)  # v1 used 32-bit counts; v2 and v3 share the little-endian layout read here
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # GGML_MAX_DIMS


@dataclass(frozen=True, slots=True)
class TensorInfo:
    """One tensor of the file. `shape` is in torch order (ggml `ne` reversed), so a weight is (out, in)."""

    name: str
    shape: tuple[int, ...]
    ggml_type: GGMLType
    offset: int  # absolute byte offset in the file
    nbytes: int


class GGUFFile:
    """A GGUF file mapped read-only. Tensor bytes are never copied until dequantized.

    `expect_arch="qwen2"` rejects other architectures at open; pass None to read any GGUF."""

    def __init__(self, path: str | os.PathLike[str], expect_arch: str | None = "qwen2") -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise GGUFError(f"{self.path}: no such file")
        size = self.path.stat().st_size
        if size < 4:
            raise GGUFError(f"{self.path}: not a GGUF file ({size} bytes, too short for the magic)")
        self._data: np.ndarray | None = np.memmap(self.path, dtype=np.uint8, mode="r")
        r = _Reader(memoryview(self._data), self.path)
        magic = bytes(r.buf[r.need(4, "magic"):4])
        if magic != GGUF_MAGIC:
            raise GGUFError(f"{self.path}: not a GGUF file (magic {magic!r}, expected {GGUF_MAGIC!r})")
        self.version = r.u32("version")
        if self.version not in SUPPORTED_VERSIONS:
            hint = " (a big-endian file?)" if self.version > 0xFFFF else ""
            raise GGUFError(f"{self.path}: unsupported GGUF version {self.version}{hint}; "
                            f"qwen25 reads versions {SUPPORTED_VERSIONS}")
        n_tensors, n_kv = r.u64("tensor count"), r.u64("metadata count")
        self.metadata: dict[str, Any] = {}
        for i in range(n_kv):
            key = r.string(f"metadata key #{i}")
            self.metadata[key] = r.value(r.u32(f"type of metadata {key!r}"), f"metadata {key!r}")
        if expect_arch is not None and self.architecture != expect_arch:
            raise GGUFError(f"{self.path}: unknown architecture {self.architecture!r} (general.architecture); "
                            f"qwen25 runs {expect_arch!r} models (Qwen2/Qwen2.5)")
        self.alignment = int(self.metadata.get("general.alignment", DEFAULT_ALIGNMENT))
        if self.alignment <= 0 or self.alignment & (self.alignment - 1):
            raise GGUFError(f"{self.path}: general.alignment={self.alignment} is not a power of two")
        infos = [self._tensor_info(r, i) for i in range(n_tensors)]
        self.data_offset = -(-r.pos // self.alignment) * self.alignment
        self.tensors: dict[str, TensorInfo] = {}
        for name, shape, ggml_type, rel, nbytes in infos:
            if name in self.tensors:
                raise GGUFError(f"{self.path}: tensor {name!r} appears twice")
            if rel % self.alignment:
                raise GGUFError(f"{self.path}: tensor {name!r} offset {rel} is not {self.alignment}-byte aligned")
            offset = self.data_offset + rel
            if offset + nbytes > size:
                raise GGUFError(f"{self.path}: truncated file: tensor {name!r} data ends at byte {offset + nbytes} "
                                f"past the end of the file ({size} bytes)")
            self.tensors[name] = TensorInfo(name, shape, ggml_type, offset, nbytes)
        self._drop_header_pages()

    def _drop_header_pages(self) -> None:
        """Unmap the pages the header was parsed from (metadata and vocabulary, ~6 MB for Qwen2.5): read once,
        they would otherwise stay resident for the process's life. The file is mapped read-only, so nothing is
        lost: a later read of those bytes faults them back in from the page cache."""
        mm = getattr(self._data, "_mmap", None)
        end = self.data_offset // mmap.PAGESIZE * mmap.PAGESIZE
        if mm is not None and end and hasattr(mm, "madvise") and hasattr(mmap, "MADV_DONTNEED"):
            mm.madvise(mmap.MADV_DONTNEED, 0, end)

    def _tensor_info(self, r: _Reader, i: int) -> tuple[str, tuple[int, ...], GGMLType, int, int]:
        name = r.string(f"tensor info #{i}")
        n_dims = r.u32(f"tensor {name!r} info")
        if not 1 <= n_dims <= MAX_DIMS:
            raise GGUFError(f"{self.path}: tensor {name!r} has {n_dims} dimensions (1..{MAX_DIMS} allowed)")
        ne = [r.u64(f"tensor {name!r} info") for _ in range(n_dims)]
        type_id = r.u32(f"tensor {name!r} info")
        rel = r.u64(f"tensor {name!r} info")
        try:
            ggml_type = GGMLType(type_id)
        except ValueError:
            raise GGUFError(f"{self.path}: tensor {name!r} has unsupported ggml type id {type_id} "
                            f"(unknown to qwen25)") from None
        block, type_size = BLOCK_SIZES[ggml_type]
        if ne[0] % block:
            raise GGUFError(f"{self.path}: tensor {name!r} row length {ne[0]} is not a multiple of the "
                            f"{ggml_type.name} block size {block}")
        n = math.prod(ne)
        return name, tuple(reversed(ne)), ggml_type, rel, n // block * type_size

    # --- access --------------------------------------------------------------------------------------------
    @property
    def architecture(self) -> str | None:
        return self.metadata.get("general.architecture")

    def info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise KeyError(f"{self.path}: no tensor named {name!r}") from None

    def raw(self, name: str) -> np.ndarray:
        """The tensor's bytes as a read-only uint8 view of the mapping (no copy)."""
        if self._data is None:
            raise ValueError(f"{self.path}: file is closed")
        t = self.info(name)
        return self._data[t.offset:t.offset + t.nbytes].view(np.ndarray)

    def dequantize(self, name: str) -> np.ndarray:
        """The tensor as a new float32 array of its torch shape."""
        t = self.info(name)
        try:
            return dequantize(self.raw(name), t.ggml_type, t.shape)
        except UnsupportedQuantError:
            supported = ", ".join(sorted(x.name for x in SUPPORTED_TYPES))
            raise GGUFError(f"{self.path}: tensor {name!r} has unsupported quant type {t.ggml_type.name}; "
                            f"qwen25 can dequantize {supported}") from None

    def dequantize_rows(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of a 2-D tensor as float32: quantized rows are whole blocks, so a row range is a
        contiguous byte range (lets loaders stream big tensors without a full fp32 copy)."""
        t = self.info(name)
        rows, cols = t.shape
        row_bytes = t.nbytes // rows
        raw = self.raw(name)[start * row_bytes: stop * row_bytes]
        try:
            return dequantize(raw, t.ggml_type, (stop - start, cols))
        except UnsupportedQuantError:
            return self.dequantize(name)[start:stop]  # raises the named GGUFError

    def use_huge_pages(self) -> str:
        """Map the tensor bytes on 2 MiB pages where the system allows (`weights.huge_pages`): for weights read
        whole on every decode step. Returns what was done."""
        mm = getattr(self._data, "_mmap", None)
        if mm is None:
            raise ValueError(f"{self.path}: file is closed")
        return map_on_huge_pages(mm, self.path, self.data_offset, len(self._data))

    def close(self) -> None:
        """Drop the mapping; arrays already returned by `raw` keep it alive until they are freed."""
        self._data = None

    def __enter__(self) -> GGUFFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"GGUFFile({str(self.path)!r}, v{self.version}, arch={self.architecture!r}, {len(self.tensors)} tensors)"


# --- qwen2 specifics --------------------------------------------------------------------------------------------
_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
_HAS_BIAS = {"attn_q", "attn_k", "attn_v"}  # Qwen2: bias on q/k/v only
_NAME_RE = re.compile(r"(?:blk\.(\d+)\.)?([a-z_]+)\.(weight|bias)")


def hf_tensor_name(gguf_name: str, path: str | os.PathLike[str] | None = None) -> str:
    """Map a qwen2 GGUF tensor name to its HF name, e.g. blk.3.attn_q.bias -> model.layers.3.self_attn.q_proj.bias."""
    m = _NAME_RE.fullmatch(gguf_name)
    if m:
        layer, base, suffix = m.groups()
        if layer is None and base in _GLOBAL_NAMES and suffix == "weight":
            return f"{_GLOBAL_NAMES[base]}.{suffix}"
        if layer is not None and base in _BLOCK_NAMES and (suffix == "weight" or base in _HAS_BIAS):
            return f"model.layers.{int(layer)}.{_BLOCK_NAMES[base]}.{suffix}"
    where = f"{path}: " if path is not None else ""
    raise GGUFError(f"{where}unknown tensor {gguf_name!r}: not part of a qwen2 model")


def _require_qwen2(g: GGUFFile) -> None:
    if g.architecture != "qwen2":
        raise GGUFError(f"{g.path}: unknown architecture {g.architecture!r} (general.architecture); "
                        f"qwen25 runs 'qwen2' models (Qwen2/Qwen2.5)")


def config_from_gguf(g: GGUFFile) -> ModelConfig:
    """`ModelConfig` from the `qwen2.*` metadata; vocab size and tying come from the tensor table."""
    _require_qwen2(g)
    md = g.metadata

    def get(key: str, default: Any = None) -> Any:
        value = md.get(f"qwen2.{key}", default)
        if value is None:
            raise GGUFError(f"{g.path}: missing metadata key 'qwen2.{key}'")
        return value

    if "token_embd.weight" not in g.tensors:
        raise GGUFError(f"{g.path}: missing tensor 'token_embd.weight'")
    vocab, hidden = g.tensors["token_embd.weight"].shape
    heads = get("attention.head_count")
    d: dict[str, Any] = dict(
        vocab_size=vocab,
        hidden_size=get("embedding_length"),
        intermediate_size=get("feed_forward_length"),
        num_hidden_layers=get("block_count"),
        num_attention_heads=heads,
        num_key_value_heads=get("attention.head_count_kv", heads),
        max_position_embeddings=get("context_length"),
        rms_norm_eps=get("attention.layer_norm_rms_epsilon"),
        rope_theta=float(get("rope.freq_base", 10_000.0)),  # llama.cpp's default when the key is absent
        tie_word_embeddings="output.weight" not in g.tensors,
        bos_token_id=md.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=md.get("tokenizer.ggml.eos_token_id"),
    )
    if hidden != d["hidden_size"]:
        raise GGUFError(f"{g.path}: token_embd has width {hidden} but qwen2.embedding_length is {d['hidden_size']}")
    key_length = md.get("qwen2.attention.key_length")
    if key_length is not None and key_length * heads != d["hidden_size"]:
        d["head_dim"] = key_length
    scaling = md.get("qwen2.rope.scaling.type")
    if scaling not in (None, "none"):
        rope: dict[str, Any] = {"type": scaling, "factor": float(get("rope.scaling.factor"))}
        if "qwen2.rope.scaling.original_context_length" in md:
            rope["original_max_position_embeddings"] = md["qwen2.rope.scaling.original_context_length"]
        d["rope_scaling"] = rope
    try:
        return ModelConfig.from_dict(d)
    except ValueError as e:
        raise GGUFError(f"{g.path}: inconsistent qwen2 metadata: {e}") from None


def load_gguf_state_dict(g: GGUFFile, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Every tensor dequantized, under its HF name. No q/k row permutation: qwen2 GGUFs keep HF's NEOX
    (rotate_half) layout, unlike llama GGUFs (the converter permutes only LlamaModel-derived archs)."""
    _require_qwen2(g)
    names = {name: hf_tensor_name(name, g.path) for name in g.tensors}  # fail on a bad name before any work
    return {hf: torch.from_numpy(g.dequantize(name)).to(dtype) for name, hf in names.items()}
