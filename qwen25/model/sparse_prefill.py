"""Sparse prefill: MInference's vertical-slash attention pattern, estimated per prefill chunk, as an attention
backend wrapped around the reference one.

For each head the last `last_q` queries of a chunk attend densely to every key; the attention they pay is summed
per key (vertical columns) and per distance query - key (slash diagonals). The top `vertical_size` columns (the
first `sink_size` always) and the top `slash_size` diagonals (the `local_size` nearest always) are kept, and
every query of the chunk attends only to those: slashes at block granularity (a slash diagonal selects, for a
block of `block_size` queries, the one or two key blocks it crosses: a superset of the diagonal), verticals as
exact columns, deduplicated against the selected blocks so that no key enters the softmax twice. With budgets
that cover every column or every diagonal this is exactly dense attention (up to fp32 rounding); the tests check it.

Defaults are MInference's published vertical-slash budgets (last_q 64, 1000 verticals, 6096 slashes, the first
30 columns and the last 100 diagonals forced); `min_length` keeps short prompts dense. The pattern is estimated
again for every prefill chunk (the engine's chunked prefill), over the whole cache so far.

Where it runs: passes of more than one new token over at least `min_length` keys, with no padding and no
documents (one row of the engine's chunked prefill, or lock-step rows of equal length); everything else (decode,
ragged batched prefill) runs the wrapped backend. Default RoPE, static YaRN and Dual Chunk Attention (whose
backend runs the pattern over its three parts, `qwen25.model.dca.dual_chunk_sparse_prefill`); dynamic YaRN
re-rotates cached keys at attention time and is refused with a clear error. The fused native forward runs the
same pattern (`qwen25/kernels/sparse_attention.c`: the same estimate, the same key set) for the engine's passes
(`sparse_prefill_config`); the runner keeps the PyTorch path only where the kernel cannot take the model
(`sparse_prefill_applies`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F

from qwen25.config import ModelConfig
from qwen25.model.attention import AttentionBackend, AttentionSpec, KVCache, attention_with_lse, sdpa_attention
from qwen25.model.rope import apply_rope, is_dynamic

GROUP_ELEMENTS = 1 << 24  # gathered key elements per group of query blocks: bounds the memory of a chunk


@dataclass(frozen=True, slots=True)
class SparsePrefillConfig:
    """Budgets of the vertical-slash pattern (MInference's defaults)."""

    vertical_size: int = 1000
    """key columns kept per head (the strongest by the last queries' attention)"""
    slash_size: int = 6096
    """diagonals (query - key distances) kept per head"""
    last_q: int = 64
    """queries at the end of each chunk that estimate the pattern"""
    sink_size: int = 30
    """first key columns always kept (attention sinks)"""
    local_size: int = 100
    """nearest diagonals always kept (the local window)"""
    block_size: int = 64
    """query and key block size of the slash gather"""
    min_length: int = 8192
    """passes over fewer keys (cached + new) run dense attention"""

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, int) or isinstance(value, bool) or value < (0 if f.name == "min_length" else 1):
                raise ValueError(f"sparse prefill: {f.name} must be a positive integer, got {value!r}")

    @classmethod
    def from_setting(cls, setting: SparsePrefillSetting) -> SparsePrefillConfig | None:
        """None/False: off; True: defaults; a dict of field names, a config, or a flag's text: "on", "off" or a
        JSON object of field names."""
        if isinstance(setting, str):
            text = setting.strip()
            if text.lower() in ("on", "off", "true", "false"):
                setting = text.lower() in ("on", "true")
            else:
                try:
                    setting = json.loads(text)
                except json.JSONDecodeError as e:
                    raise ValueError(f"--sparse-prefill: expected on, off or a JSON object, got {text!r} ({e})") from e
        if setting is None or setting is False:
            return None
        if setting is True:
            return cls()
        if isinstance(setting, cls):
            return setting
        if isinstance(setting, dict):
            known = {f.name for f in fields(cls)}
            if unknown := set(setting) - known:
                raise ValueError(f"sparse prefill: unknown keys {sorted(unknown)}; known: {sorted(known)}")
            return cls(**setting)
        raise ValueError(f"sparse prefill: expected True, a dict of {[f.name for f in fields(cls)]} or None, "
                         f"got {setting!r}")


SparsePrefillSetting = SparsePrefillConfig | dict[str, Any] | bool | str | None


def estimate_pattern(q_last: torch.Tensor, k: torch.Tensor, cfg: SparsePrefillConfig) -> tuple[torch.Tensor, ...]:
    """The vertical columns (H, nv) and slash distances (H, ns) of one row, from its last queries q_last
    (H, n, D) at positions S-n..S-1 over its keys k (H_kv, S, D), both rotated."""
    H, n, D = q_last.shape
    H_kv, S = k.shape[0], k.shape[1]
    q_last = q_last.float() / math.sqrt(D)
    logits = (q_last.view(H_kv, H // H_kv, n, D) @ k.float().unsqueeze(1).transpose(-1, -2)).view(H, n, S)
    future = torch.ones(n, n, dtype=torch.bool, device=k.device).triu(1)  # only the last n keys can be ahead
    logits[:, :, S - n:].masked_fill_(future, float("-inf"))
    return pattern_from_probs(torch.softmax(logits, dim=-1), cfg)


def pattern_from_probs(probs: torch.Tensor, cfg: SparsePrefillConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The vertical columns (H, nv) and slash distances (H, ns) from the attention probs (H, n, S) of a row's
    last n queries (positions S-n..S-1) over its S keys."""
    H, n, S = probs.shape
    vertical = probs.sum(1)  # (H, S)
    vertical[:, :cfg.sink_size] = float("inf")
    # slash[d] sums probs[i, p_i - d] over the last queries p_i = S-n+i: row i read backwards from its own position
    slash = torch.zeros(H, S, device=probs.device)
    for i in range(n):
        p = S - n + i
        slash[:, :p + 1] += probs[:, i, :p + 1].flip(-1)
    slash[:, :cfg.local_size] = float("inf")
    return vertical.topk(min(cfg.vertical_size, S)).indices, slash.topk(min(cfg.slash_size, S)).indices


def vertical_slash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, past: int,
                             cfg: SparsePrefillConfig,
                             pattern: tuple[torch.Tensor, torch.Tensor] | None = None,
                             key_range: tuple[int, int] | None = None
                             ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Causal attention of one row's T queries (H, T, D) at positions past..past+T-1 over its rotated keys and
    values (H_kv, S = past+T, D), restricted to the row's vertical-slash pattern (estimated, or the given
    (columns (H, nv), distances (H, ns)) of `estimate_pattern`). -> (H, T, D).

    key_range (lo, hi): only keys at positions lo..hi-1 count (one part of Dual Chunk Attention); the result is
    then (out (H, T, D) fp32, log-sum-exp (H, T)), a query with no key in the range getting out 0, lse -inf."""
    H, T, D = q.shape
    H_kv, S = k.shape[0], k.shape[1]
    bs, dev = cfg.block_size, q.device
    columns, distances = pattern if pattern is not None else estimate_pattern(q[:, -min(cfg.last_q, T):], k, cfg)
    n_kb = (S + bs - 1) // bs
    # block offsets (query block - key block) that the slashes cross: distance m*bs + r spans offsets m and m+1
    block_offsets = torch.zeros(H, n_kb + 1, dtype=torch.bool, device=dev)
    block_offsets.scatter_(1, distances // bs, True)
    block_offsets.scatter_(1, distances // bs + (distances % bs > 0).long(), True)
    block_offsets = block_offsets[:, :n_kb]
    n_off = int(block_offsets.sum(1).max())
    offsets = torch.where(block_offsets, torch.arange(n_kb, device=dev), n_kb + S).sort(dim=1).values[:, :n_off]

    first_qb = past // bs
    n_qb = (S - 1) // bs - first_qb + 1
    lead = past - first_qb * bs
    q_blocks = torch.zeros(H, n_qb * bs, D, dtype=q.dtype, device=dev)
    q_blocks[:, lead:lead + T] = q
    q_blocks = q_blocks.view(H, n_qb, bs, D)
    kv_head = (torch.arange(H, device=dev) // (H // H_kv)).view(-1, 1, 1)
    n_col = columns.shape[1]
    out = torch.empty(H, n_qb, bs, D, dtype=q.dtype if key_range is None else torch.float32, device=dev)
    lse = torch.empty(H, n_qb, bs, dtype=torch.float32, device=dev)
    group = max(1, GROUP_ELEMENTS // (H * (n_off * bs + n_col) * max(bs, D)))
    for g0 in range(0, n_qb, group):
        qb = torch.arange(first_qb + g0, first_qb + min(g0 + group, n_qb), device=dev)  # absolute query blocks
        q_pos = (qb.unsqueeze(1) * bs + torch.arange(bs, device=dev)).view(1, -1, bs, 1)  # (1, g, bs, 1)
        kb = qb.view(1, -1, 1) - offsets.unsqueeze(1)  # (H, g, n_off)
        block_ok = (kb >= 0).repeat_interleave(bs, dim=2)
        k_pos = (kb.clamp(min=0).unsqueeze(-1) * bs + torch.arange(bs, device=dev)).flatten(2)  # (H, g, n_off*bs)
        # a column inside a block the slashes already selected for this query block is counted there
        col_offset = (qb.view(1, -1, 1) - columns.unsqueeze(1) // bs).clamp(min=0)  # (H, g, nv)
        duplicate = block_offsets.gather(1, col_offset.flatten(1).clamp(max=n_kb - 1)).view_as(col_offset)
        key_pos = torch.cat([k_pos, columns.unsqueeze(1).expand(-1, qb.shape[0], -1)], dim=2)  # (H, g, n)
        usable = torch.cat([block_ok, ~duplicate], dim=2).unsqueeze(2) & (key_pos.unsqueeze(2) <= q_pos)
        index = key_pos.clamp(max=S - 1)  # a last block's tail past S is masked (its position exceeds every query)
        if key_range is None:
            # Key 0 (a forced sink column, or inside block 0) is visible to every query row: no row is all-masked.
            out[:, g0:g0 + qb.shape[0]] = F.scaled_dot_product_attention(
                q_blocks[:, g0:g0 + qb.shape[0]], k[kv_head, index], v[kv_head, index], attn_mask=usable,
                scale=1.0 / math.sqrt(D))
            continue
        usable = usable & ((key_pos >= key_range[0]) & (key_pos < key_range[1])).unsqueeze(2)
        out[:, g0:g0 + qb.shape[0]], lse[:, g0:g0 + qb.shape[0]] = attention_with_lse(
            q_blocks[:, g0:g0 + qb.shape[0]].float(), k[kv_head, index].float(), v[kv_head, index].float(), usable,
            1.0 / math.sqrt(D))
    if key_range is None:
        return out.view(H, n_qb * bs, D)[:, lead:lead + T]
    return out.view(H, n_qb * bs, D)[:, lead:lead + T], lse.view(H, n_qb * bs)[:, lead:lead + T]


class SparsePrefillAttention:
    """An attention backend: vertical-slash sparse attention for long prefill passes, `base` for the rest."""

    def __init__(self, config: SparsePrefillConfig, base: AttentionBackend = sdpa_attention) -> None:
        self.sparse_prefill = config
        self.base = base

    def applies(self, num_new: int, num_keys: int) -> bool:
        """Whether a pass of num_new new tokens over num_keys keys (cached + new) runs sparse."""
        return num_new > 1 and num_keys >= self.sparse_prefill.min_length

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
                 sin: torch.Tensor, cache: KVCache | None, spec: AttentionSpec) -> torch.Tensor:
        T = q.shape[2]
        if (not self.applies(T, spec.past + T) or spec.key_mask is not None or spec.document_ids is not None
                or not spec.causal):
            return self.base(layer, q, k, v, cos, sin, cache, spec)
        if hasattr(self.base, "sparse_prefill_call"):  # Dual Chunk Attention: a pattern over its three parts
            return self.base.sparse_prefill_call(layer, q, k, v, cos, sin, cache, spec, self.sparse_prefill)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(layer, k, v)
        return torch.stack([vertical_slash_attention(q[b], k[b], v[b], spec.past, self.sparse_prefill)
                            for b in range(q.shape[0])])


def check_sparse_prefill(config: ModelConfig) -> None:
    """Raise ValueError when the model's attention cannot run sparse prefill (keys rotated at attention time)."""
    if is_dynamic(config.rope_scaling):
        raise ValueError("sparse prefill needs default RoPE or static YaRN; dynamic YaRN re-rotates the cached "
                         "keys at attention time. Use a static rope_scaling or run dense prefill")


def enable_sparse_prefill(model: torch.nn.Module, setting: SparsePrefillSetting) -> SparsePrefillConfig | None:
    """Make a Qwen2ForCausalLM's default attention sparse for long prefill passes (or dense again with
    None/False). Call it after any long-context change (`set_long_context` resets the backend)."""
    config = SparsePrefillConfig.from_setting(setting)
    inner = model.model
    base = inner.attention.base if isinstance(inner.attention, SparsePrefillAttention) else inner.attention
    if config is None:
        inner.attention = base
        return None
    check_sparse_prefill(model.config)
    inner.attention = SparsePrefillAttention(config, base)
    return config


def sparse_prefill_config(model: torch.nn.Module) -> SparsePrefillConfig | None:
    """The model's sparse prefill budgets, or None when its attention is dense."""
    attention = model.model.attention
    return attention.sparse_prefill if isinstance(attention, SparsePrefillAttention) else None


def sparse_prefill_applies(model: torch.nn.Module, num_new: list[int], num_keys: list[int]) -> bool:
    """Whether any row of a pass (its new tokens, its keys cached + new) would run sparse on this model."""
    attention = model.model.attention
    return isinstance(attention, SparsePrefillAttention) and any(
        attention.applies(n, s) for n, s in zip(num_new, num_keys))
