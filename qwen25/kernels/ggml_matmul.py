"""Matmuls on a GGUF tensor's own bytes (`ggml_dot.c`): `x @ W.T` where W is rows of ggml blocks (Q4_K, Q6_K,
Q5_0, Q8_0), with x quantized to 8 bits per block first (per 32 values for Q5_0/Q8_0, scale absmax / 127; per 256
for the K types, each 32 of them with up to 3 more bits by a power-of-two exponent: `quantize_activations`). No
dequantized or requantized copy of W is made. The result equals `quantize_activations(x, type) @ dequantize(W).T` up
to fp32 summation order (tests/test_ggml_matmul.py).
"""

from __future__ import annotations

import numpy as np
import torch

from qwen25.kernels import load_ggml_kernels

# ggml type id -> (name, values per block, bytes per block); kernels sit below the weight loaders, so the ids are
# restated here (qwen25.weights.quants.GGMLType holds the same numbers and can be passed in)
TYPES: dict[int, tuple[str, int, int]] = {12: ("Q4_K", 256, 144), 14: ("Q6_K", 256, 210), 6: ("Q5_0", 32, 22),
                                          8: ("Q8_0", 32, 34)}
BLOCK = {ggml_type: qk for ggml_type, (_, qk, _) in TYPES.items()}


def supported(ggml_type: int) -> bool:
    """Whether the block kernels run this weight type (a ggml type id)."""
    return int(ggml_type) in TYPES


SUB_BLOCK, MAX_EXTRA_BITS = 32, 3  # the K types' activation sub-blocks and their power-of-two exponents (ggml_dot.c)


def quantize_activations(x: torch.Tensor, ggml_type: int) -> torch.Tensor:
    """x as the kernel rounds it for weights of `ggml_type` (the PyTorch statement of its activation blocks):
    per block of BLOCK[type] values, round(x / d) * d with d = absmax / 127; for the K types (256-value blocks)
    each 32 values j use d / 2^k_j instead, k_j the largest k <= 3 with absmax_j * 2^k <= absmax."""
    qk = BLOCK[int(ggml_type)]
    sub = SUB_BLOCK if qk == 256 else qk
    blocks = x.float().reshape(*x.shape[:-1], x.shape[-1] // qk, qk // sub, sub)
    amax = blocks.abs().amax((-2, -1), keepdim=True)
    inv = torch.where(amax > 0, 127 / amax, 0.0)  # the kernel's fp32 steps: x * (127 / absmax), rounded to even
    if sub == qk:
        return (torch.round(blocks * inv) * (amax / 127)).reshape(x.shape)
    sub_max = blocks.abs().amax(-1, keepdim=True)
    extra = torch.zeros_like(sub_max)
    for _ in range(MAX_EXTRA_BITS):  # exact comparisons: scaling by a power of two rounds nothing
        extra = torch.where(sub_max * 2 ** (extra + 1) <= amax, extra + 1, extra)
    step = 2.0 ** extra
    return (torch.round(blocks * (inv * step)) * (amax / 127 / step)).reshape(x.shape)


def ggml_matmul(x: torch.Tensor, raw: np.ndarray, ggml_type: int, shape: tuple[int, int],
                level: str | None = None) -> torch.Tensor:
    """x (..., n) fp32 times the (rows, n) weight stored as `raw` ggml bytes, transposed: (..., rows).
    level: the ISA build (`qwen25.kernels.isa`; default the selected one). Raises ValueError for an unsupported
    type, a width that is not a whole number of blocks or bytes that do not match the shape, and RuntimeError
    where the kernels cannot be built."""
    rows, n = shape
    if int(ggml_type) not in TYPES:
        name = getattr(ggml_type, "name", f"type {ggml_type}")
        raise ValueError(f"no block kernel for {name}; supported: {', '.join(t[0] for t in TYPES.values())}")
    ggml_type = int(ggml_type)
    name, qk, block_bytes = TYPES[ggml_type]
    if n % qk or x.shape[-1] != n:
        raise ValueError(f"{name} weight {shape} with input width {x.shape[-1]}: widths must match and be "
                         f"a multiple of {qk}")
    raw = np.ascontiguousarray(raw, dtype=np.uint8).reshape(-1)
    if raw.size != rows * (n // qk) * block_bytes:
        raise ValueError(f"{raw.size} bytes for a {name} weight of shape {shape}")
    lib = load_ggml_kernels(level)
    if lib is None:
        raise RuntimeError("the ggml block kernels could not be built here (no C compiler or no AVX2)")
    xs = x.detach().float().reshape(-1, n).contiguous()
    out = torch.empty(xs.shape[0], rows, dtype=torch.float32)
    status = lib.ggml_matmul(ggml_type, raw.ctypes.data, rows, n, xs.data_ptr(), xs.shape[0], out.data_ptr())
    if status:
        raise RuntimeError(f"ggml_matmul failed ({name}, shape {shape}): out of memory?")
    return out.reshape(*x.shape[:-1], rows)
