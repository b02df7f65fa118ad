"""KV-cache storage formats: the `kv_cache_dtype` names, int8 rounding, and the per-channel key smoothing int8 uses.

float16/bfloat16 caches are plain casts. int8 stores every (token, head) vector with one fp32 absmax scale (llama.cpp's
q8_0 idea with a whole head per scale). Qwen2.5's keys carry a few huge channels (the k bias on the slowest RoPE
pairs: in the 0.5B's first layers their RMS is ~25x the median channel's), which would take the whole int8 range of
every key vector; so keys are divided by a fixed per-channel factor before rounding and multiplied back after
(SmoothQuant's alpha = 0.5: the square root of each channel's RMS, estimated from the weights alone by a seeded
Gaussian probe of the layer's key projection, equal within each RoPE pair so it commutes with the rotation). On the
0.5B this takes int8's perplexity cost from +2.9% to +1.0% and its KL 11x down (tests/test_kv_cache_dtype.py). Values
need no smoothing.
"""

from __future__ import annotations

from typing import Any

import torch

KV_CACHE_DTYPES = ("auto", "float32", "float16", "bfloat16", "int8")
ALIASES = {"fp32": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16"}
KV_CACHE_DTYPE_NAMES = KV_CACHE_DTYPES + tuple(ALIASES)
PROBE_ROWS = 512


def resolve_kv_cache_dtype(name: str, activation: torch.dtype, quantized: bool = False) -> torch.dtype:
    """The storage dtype a `kv_cache_dtype` setting names (fp32/fp16/half/bf16 are accepted for
    float32/float16/bfloat16). "auto": float16 for a model with quantized weights and fp32 activations (what the
    native forward runs), else the activations' dtype (see `auto_kv_cache_dtype`)."""
    canonical = ALIASES.get(name, name)
    if canonical not in KV_CACHE_DTYPES:
        hint = " (fp8 caches are not implemented on CPUs; int8 takes about the same memory)" if "fp8" in name else ""
        raise ValueError(f"kv_cache_dtype {name!r} is not one of {', '.join(KV_CACHE_DTYPE_NAMES)}{hint}")
    return auto_kv_cache_dtype(activation, quantized) if canonical == "auto" else getattr(torch, canonical)


def auto_kv_cache_dtype(activation: torch.dtype, quantized: bool) -> torch.dtype:
    """The cache `kv_cache_dtype="auto"` picks, at every context length (llama.cpp's default f16 cache, too).

    float16 when the weights are quantized (q8, q4, GGUF blocks) and the activations fp32: half an fp32 cache's
    bytes (at 32K tokens the 0.5B's cache is 403 MB instead of 805 MB), the native forward runs it at the fp32
    cache's speed (long-context attention is compute-bound there; values are widened to fp32), and its cost is
    far below the quantized path's own: on the real 0.5B with fp32 activations, perplexity +0.02% and KL 3.7e-6
    against the fp32 cache (tests/test_kv_cache_dtype.py); on the native path, whose int8 activation rounding
    costs ~0.4% perplexity, the fp16 cache moves the output no more than a 1e-6 nudge of the embedding scales
    does, with the same 64 greedy tokens (tests/test_native_kv16.py). Qwen2.5's keys and values stay far inside
    fp16's range (65504; the 0.5B's largest key is ~215), and fp16 keeps 3 more mantissa bits than bfloat16
    (whose KL is ~400x fp16's). Otherwise (unquantized models: the PyTorch path, the reference that matches
    transformers) the activations' dtype, so fp32 stays bit-faithful and bf16 models keep a bf16 cache."""
    return torch.float16 if quantized and activation == torch.float32 else activation


def quantize_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 of x (..., D) with one fp32 scale per vector: (q (..., D) int8, scale (...,))."""
    scale = x.float().abs().amax(dim=-1).clamp(min=1e-12) / 127.0
    return (x.float() / scale.unsqueeze(-1)).round_().clamp_(-127, 127).to(torch.int8), scale


@torch.inference_mode()
def key_smoothing(model: Any, seed: int = 0) -> torch.Tensor:
    """Per-channel key divisors (L, H_kv, D) fp32 for an int8 cache: sqrt of each channel's RMS over the layer's key
    projection of PROBE_ROWS inputs N(0, 1) times the input RMSNorm weight, the larger of each RoPE pair (c, c + D/2)
    for both, normalised to mean 1 per head. Deterministic for a model (a seeded generator)."""
    config = model.config
    H, H_kv, D = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    generator = torch.Generator().manual_seed(seed)
    factors = []
    for layer in model.model.layers:
        norm_weight = layer.input_layernorm.weight.detach().float()
        x = (torch.randn(PROBE_ROWS, config.hidden_size, generator=generator) * norm_weight).to(norm_weight.dtype)
        attention = layer.self_attn
        if attention.qkv_proj is not None:
            k = attention.qkv_proj(x)[:, H * D:(H + H_kv) * D]
        else:
            k = attention.k_proj(x)
        rms = k.float().pow(2).mean(0).sqrt().view(H_kv, D)
        pair = torch.maximum(rms[:, :D // 2], rms[:, D // 2:])
        factor = torch.cat([pair, pair], -1).clamp(min=1e-6).sqrt()
        factors.append(factor / factor.mean(-1, keepdim=True))
    return torch.stack(factors)
