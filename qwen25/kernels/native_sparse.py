"""The native sparse prefill (`qwen25/kernels/sparse_attention.c`, part of every forward.c build): its C view.

`SparseScratch` turns a `SparsePrefillConfig` into the `SparseArgs` that `qwen2_forward` takes (NULL: dense), with
the scratch memory sized for a pass; `sparse_attention` runs one chunk's sparse attention on its own over a KV
cache (the estimate, or a given pattern, then attention over the pattern's keys) for the tests, which compare it
with the PyTorch reference (`qwen25.model.sparse_prefill`). The kernel selects exactly the keys the reference
defines; it needs head_dim a multiple of 16 (`takes_sparse`), else the runner keeps the PyTorch path.
"""

from __future__ import annotations

import ctypes

import torch

from qwen25.model.sparse_prefill import SparsePrefillConfig

_ptr, _int = ctypes.c_void_p, ctypes.c_int
_FIELDS = ("vertical_size", "slash_size", "last_q", "sink_size", "local_size", "block_size", "min_length")


class SparseArgs(ctypes.Structure):
    _fields_ = [*((name, _int) for name in _FIELDS), ("max_rows", _int), ("work", _ptr)]


def declare(lib: ctypes.CDLL) -> None:
    """Declare the sparse entry points of a forward.c build."""
    lib.sparse_work_floats.argtypes = [_int, _int, _int, _int, _int, ctypes.POINTER(SparseArgs)]
    lib.sparse_work_floats.restype = ctypes.c_size_t
    lib.sparse_attention.argtypes = [_ptr, _int, _int, _ptr, _int, _int, _int, _int, _int, ctypes.POINTER(SparseArgs),
                                     _ptr, _int, _ptr, _int, _ptr, _ptr, _ptr, _int]
    lib.sparse_attention.restype = None


def takes_sparse(head_dim: int) -> bool:
    """Whether the native kernel runs sparse prefill for this head size (its value tiles are 16 floats wide)."""
    return head_dim % 16 == 0


class SparseScratch:
    """A config's `SparseArgs` and the work memory of its passes (grown on demand, kept between passes)."""

    def __init__(self, config: SparsePrefillConfig) -> None:
        self.config = config
        self.work = torch.empty(0)

    def args(self, lib: ctypes.CDLL, heads: int, head_dim: int, rows: int, max_positions: int,
             threads: int) -> SparseArgs:
        args = SparseArgs(*(getattr(self.config, name) for name in _FIELDS), rows, None)
        need = lib.sparse_work_floats(heads, head_dim, rows, max_positions, threads, ctypes.byref(args))
        if self.work.numel() < need:
            self.work = torch.empty(need)
        args.work = self.work.data_ptr()
        return args


def sparse_attention(lib: ctypes.CDLL, kv: ctypes.Structure, layer: int, seq: int, q: torch.Tensor, past: int,
                     kv_heads: int, config: SparsePrefillConfig,
                     pattern: tuple[torch.Tensor, torch.Tensor] | None = None,
                     threads: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """One chunk's sparse attention: q (T, H, D) rotated queries at positions past..past+T-1 of `seq`, whose keys
    and values (layer `layer`) are in the cache `kv` (a KVView struct). pattern: (columns (H, nv), distances
    (H, ns)) to attend with instead of the estimate. Returns (out (T, H, D), columns (H, min(vertical_size, S)),
    distances (H, min(slash_size, S))): the estimated pattern (columns -1 padded), None when one was given."""
    T, H, D = q.shape
    S = past + T
    threads = threads or torch.get_num_threads()
    q = q.float().contiguous()
    out = torch.zeros(T, H, D)
    scratch = SparseScratch(config)
    args = scratch.args(lib, H, D, T, S, threads)
    i32 = torch.int32
    if pattern is None:
        columns = torch.full((H, min(config.vertical_size, S)), -1, dtype=i32)
        distances = torch.zeros(H, min(config.slash_size, S), dtype=i32)
        lib.sparse_attention(ctypes.byref(kv), layer, seq, q.data_ptr(), T, past, H, kv_heads, D, ctypes.byref(args),
                             None, 0, None, 0, columns.data_ptr(), distances.data_ptr(), out.data_ptr(), threads)
        return out, columns, distances
    cols, dists = (t.to(i32).contiguous() for t in pattern)
    lib.sparse_attention(ctypes.byref(kv), layer, seq, q.data_ptr(), T, past, H, kv_heads, D, ctypes.byref(args),
                         cols.data_ptr(), cols.shape[1], dists.data_ptr(), dists.shape[1], None, None,
                         out.data_ptr(), threads)
    return out, None, None
