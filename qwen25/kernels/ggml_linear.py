"""Layers whose weights are a GGUF tensor's own bytes (rows of ggml blocks: Q4_K, Q6_K, Q5_0, Q8_0), used as they
lie in the memory-mapped file: `GGMLLinear` (x @ W.T + bias through `ggml_matmul`, activations rounded to 8 bits
per block) and `GGMLEmbedding` (looked-up rows dequantized). Nothing is copied or requantized; the arrays are the
file's mapping, kept as plain attributes (not buffers: they are read-only and never saved). The fused native
forward (`qwen25.kernels.native`) reads the same bytes. The arrays may also be blocks made in memory
(`qwen25.weights.block_quant`): requantized checkpoints and the rollout copy a trainer rewrites in place.
`ConcatLinear` keeps q/k/v and gate/up as separate tensors behind one fused projection. Inference only.

An embedding given its file (`EmbeddingSource`) reads the looked-up rows with `pread` instead of through the
mapping: a fault on a mapped file maps a whole page-cache folio around the row (64 KB to 2 MB), so a few hundred
distinct tokens would otherwise keep tens of MB of a table resident of which they use ~1 KB each. The bytes are
the same either way.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from qwen25.kernels import load_ggml_kernels
from qwen25.kernels.ggml_matmul import TYPES, ggml_matmul


def _check(raw: np.ndarray, ggml_type: int, rows: int, cols: int) -> np.ndarray:
    if int(ggml_type) not in TYPES:
        raise ValueError(f"no block kernel for ggml type {int(ggml_type)}; supported: "
                         f"{', '.join(t[0] for t in TYPES.values())}")
    name, qk, block_bytes = TYPES[int(ggml_type)]
    raw = raw.reshape(-1)
    if cols % qk or raw.size != rows * (cols // qk) * block_bytes or raw.dtype != np.uint8:
        raise ValueError(f"{raw.size} bytes ({raw.dtype}) are not a {name} tensor of shape ({rows}, {cols})")
    return raw


class GGMLLinear(nn.Module):
    """Drop-in for nn.Linear(in, out, bias) over a (out, in) GGUF tensor's bytes `raw` of type `ggml_type`."""

    def __init__(self, raw: np.ndarray, ggml_type: int, in_features: int, out_features: int,
                 bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.raw = _check(raw, ggml_type, out_features, in_features)
        self.ggml_type, self.in_features, self.out_features = int(ggml_type), in_features, out_features
        self.register_buffer("bias", None if bias is None else bias.detach().float().contiguous())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = ggml_matmul(x, self.raw, self.ggml_type, (self.out_features, self.in_features))
        return (y if self.bias is None else y + self.bias).to(x.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"{TYPES[self.ggml_type][0]} (file bytes)")


@dataclass(frozen=True)
class EmbeddingSource:
    """Where a table's bytes lie in a file: `path`, starting at byte `offset`."""

    path: Path
    offset: int


class GGMLEmbedding(nn.Module):
    """Embedding table over a (num_embeddings, dim) GGUF tensor's bytes: only the looked-up rows are dequantized.
    source: the file the bytes `raw` map, to read rows from with pread (see the module docstring)."""

    def __init__(self, raw: np.ndarray, ggml_type: int, num_embeddings: int, embedding_dim: int,
                 source: EmbeddingSource | None = None) -> None:
        super().__init__()
        self.raw = _check(raw, ggml_type, num_embeddings, embedding_dim)
        self.ggml_type, self.num_embeddings, self.embedding_dim = int(ggml_type), num_embeddings, embedding_dim
        _, qk, block_bytes = TYPES[self.ggml_type]
        self.row_bytes = embedding_dim // qk * block_bytes
        self.source = source

    def rows(self, ids: torch.Tensor) -> tuple[np.ndarray, torch.Tensor]:
        """(table, local): the raw rows the ids need as a (u, row_bytes) uint8 table and each id's row in it
        (int64, the shape of ids), or the whole table and the ids themselves when there is no source. Ids are
        not range-checked here."""
        flat = ids.reshape(-1).long()
        if self.source is None:
            return self.raw.reshape(self.num_embeddings, self.row_bytes), flat.reshape(ids.shape)
        unique, local = torch.unique(flat, return_inverse=True)
        n, base = self.row_bytes, self.source.offset
        fd = os.open(self.source.path, os.O_RDONLY)  # per call: a module copy never shares or closes another's
        try:
            data = b"".join(os.pread(fd, n, base + i * n) for i in unique.tolist())
        finally:
            os.close(fd)
        if len(data) != n * unique.numel():
            raise OSError(f"{self.source.path}: short read of embedding rows (file truncated?)")
        return np.frombuffer(data, dtype=np.uint8).reshape(-1, n), local.reshape(ids.shape)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        lib = load_ggml_kernels()
        if lib is None:
            raise RuntimeError("the ggml block kernels could not be built here (no C compiler or no AVX2)")
        flat = ids.reshape(-1).long().contiguous()
        if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= self.num_embeddings):
            raise IndexError(f"token ids must be in [0, {self.num_embeddings})")
        table, local = self.rows(flat)
        local = local.contiguous()
        out = torch.empty(flat.numel(), self.embedding_dim)
        if lib.ggml_dequantize_rows(self.ggml_type, table.ctypes.data, self.embedding_dim, local.data_ptr(),
                                    local.numel(), out.data_ptr()):
            raise RuntimeError("ggml_dequantize_rows failed")
        return out.reshape(*ids.shape, self.embedding_dim)


class ConcatLinear(nn.Module):
    """One fused projection (q/k/v, or gate/up) whose row blocks are separate tensors: the parts' outputs,
    concatenated. The native forward reads the parts one by one."""

    def __init__(self, parts: list[nn.Module]) -> None:
        super().__init__()
        self.parts = nn.ModuleList(parts)
        self.in_features = parts[0].in_features
        self.out_features = sum(part.out_features for part in parts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([part(x) for part in self.parts], dim=-1)
