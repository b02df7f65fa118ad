"""Dual Chunk Attention (DCA): the Qwen2.5-1M length extrapolation, as vLLM's `DUAL_CHUNK_FLASH_ATTN` backend
and `DualChunkRotaryEmbedding` compute it, as an attention backend over unrotated keys.

Configured by a checkpoint's `dual_chunk_attention_config` {chunk_size C, local_size, original_max_position_
embeddings W}. The sequence is cut into chunks of L = C - local_size positions; a key at position j is rotated
with j mod L. A query at position i sees three kinds of keys, each with its own query rotation:

- intra-chunk (same chunk, causal): query position i mod L, so the relative distance is the true i - j;
- successive-chunk (the previous chunk): query position min(i mod L + L, C), the true distance while it is
  below C, capped so that no distance exceeds C;
- inter-chunk (every earlier chunk): the constant query position min(2L - 1, C), distances in (C - L, C].

Every distance the model sees is at most C (a length it was trained on), however long the sequence. The three
parts are attended separately and merged through their log-sum-exp, which is exactly one softmax over all keys
with those remapped distances (the tests build that dense matrix). Below min(C, 2L) tokens every distance is
the true one and DCA equals plain attention (up to fp32 rounding); vLLM's DCA crashed there, this one does not.

Length scaling (vLLM's, for sequences longer than W): keys are multiplied by s = max(1, 0.1 ln(n / W) + 1) for
the sequence length n when they are written, queries by s of the current length, so a one-pass forward scales
logits by s^2 (as YaRN's attention factor does). W = 0 or absent: no scaling. A rope_scaling (static YaRN) in
the same config applies its frequencies and attention factor to every rotation.

Costs: a key is stored once, unrotated (`UnrotatedKVCache`); each pass rotates the context's keys. A plain causal
pass (no padding, no documents: the engine's prefill chunks and single-sequence decode) attends to key slices
only, each run of queries inside one chunk to its own chunk, the previous one and the rest, through PyTorch's
fused CPU flash kernel (`dual_chunk_attention_causal`: the cost of causal attention); other passes build the
three masked logit blocks per query, in query blocks that bound memory. With sparse prefill on
(`qwen25.model.sparse_prefill`, MInference's vertical-slash pattern), long prefill passes estimate one pattern over
the three parts and attend only to its keys (`dual_chunk_sparse_prefill`, the combination vLLM's DCA backend
runs); a checkpoint's `sparse_attention_*` fields are accepted and ignored. The engine's paged cache stores keys
unrotated for it; on a cache that stores rotated keys (`ContiguousKVCache`) it runs plain attention while that is
exact and raises NotImplementedError beyond. DCA runs on the PyTorch path (the native forward takes neither it
nor dynamic YaRN).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch

from qwen25.config import ModelConfig
from qwen25.model.attention import (AttentionSpec, KVCache, attention_with_lse, merge_by_lse, sdpa_attention,
                                   stores_unrotated_keys)
from qwen25.model.rope import apply_rope, rope_cos_sin, rope_inv_freq
from qwen25.model.sparse_prefill import SparsePrefillConfig, pattern_from_probs, vertical_slash_attention

BLOCK_ELEMENTS = 1 << 24  # logits per part computed at once (64 MiB in fp32): bounds memory on long prompts


def dca_query_positions(q_pos: torch.Tensor, chunk_size: int, local_size: int) -> tuple[torch.Tensor, ...]:
    """The query positions of the intra, successive and inter parts for absolute positions q_pos."""
    L = chunk_size - local_size
    within = q_pos % L
    return within, (within + L).clamp(max=chunk_size), torch.full_like(q_pos, min(2 * L - 1, chunk_size))


def dual_chunk_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor,
                         inv_freq: torch.Tensor, rope_scale: float, chunk_size: int, local_size: int, past: int = 0,
                         mask: torch.Tensor | None = None) -> torch.Tensor:
    """DCA of q (B, H, T, D) over k/v (B, H_kv, S, D), all unrotated, computed in fp32.

    q_pos (B, T), k_pos (B, S): absolute positions. mask (B|1, 1, T, S) bool: who may attend to whom (padding,
    documents, causality); None: causal by index, key j visible to query t iff j <= past + t. -> (B, H, T, D)."""
    B, H, T, D = q.shape
    H_kv, S = k.shape[1], k.shape[2]
    G, L = H // H_kv, chunk_size - local_size
    scale = 1.0 / math.sqrt(D)
    rotated = []
    for pos in dca_query_positions(q_pos, chunk_size, local_size):
        cos, sin = rope_cos_sin(pos, inv_freq, rope_scale)
        rotated.append(apply_rope(q.float(), cos, sin).view(B, H_kv, G, T, D))
    cos, sin = rope_cos_sin(k_pos % L, inv_freq, rope_scale)
    k_rot = apply_rope(k.float(), cos, sin).unsqueeze(2)  # (B, H_kv, 1, S, D)
    v32 = v.float().unsqueeze(2)
    q_chunk, k_chunk = q_pos // L, k_pos // L
    out = torch.empty(B, H_kv, G, T, D, dtype=torch.float32, device=q.device)
    step = max(1, BLOCK_ELEMENTS // max(1, B * H * S))
    k_idx = torch.arange(S, device=q.device)
    for t0 in range(0, T, step):
        t1 = min(T, t0 + step)
        if mask is None:
            visible = (k_idx <= past + torch.arange(t0, t1, device=q.device).unsqueeze(1)).view(1, 1, t1 - t0, S)
        else:
            visible = mask[:, :, t0:t1].bool()
        back = (q_chunk[:, t0:t1, None] - k_chunk[:, None, :]).unsqueeze(1)  # chunks between query and key
        regions = (back <= 0, back == 1, back >= 2)  # intra, successive, inter
        parts = []
        for q_part, region in zip(rotated, regions):
            part = (visible & region).unsqueeze(2)  # (B|1, 1, 1, t, S)
            if parts and not bool(part.any()):
                continue
            parts.append(attention_with_lse(q_part[:, :, :, t0:t1], k_rot, v32, part, scale))
        out[:, :, :, t0:t1] = merge_by_lse(parts)
    return out.view(B, H, T, D).to(v.dtype)


def _flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
           causal: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention with its log-sum-exp through PyTorch's fused CPU flash kernel: q (B, h, t, D), k/v
    (B, h, s, D) fp32 -> out (B, h, t, D), lse (B, h, t). causal: query i sees keys <= i (t == s)."""
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, scale=scale)[:2]
    return out, lse


def _chunk_runs(past: int, T: int, L: int) -> Iterator[tuple[int, int, int]]:
    """(t0, t1, first position of the chunk) for each run of the queries at past..past+T-1 inside one chunk."""
    t0 = 0
    while t0 < T:
        start = (past + t0) // L * L
        t1 = min(T, start + L - past)
        yield t0, t1, start
        t0 = t1


def _rotated_keys(k: torch.Tensor, inv_freq: torch.Tensor, rope_scale: float, L: int) -> torch.Tensor:
    """Keys (B, H_kv, S, D) at positions 0..S-1, rotated with DCA's key positions (j mod L), fp32."""
    cos, sin = rope_cos_sin(torch.arange(k.shape[2]) % L, inv_freq, rope_scale)
    return apply_rope(k.float(), cos.unsqueeze(0), sin.unsqueeze(0))


def _rotated_queries(q: torch.Tensor, p0: int, parts: int, inv_freq: torch.Tensor, rope_scale: float,
                     chunk_size: int, local_size: int) -> list[torch.Tensor]:
    """The first `parts` of (intra, successive, inter) rotations of queries q (B, H, n, D) at p0..p0+n-1, fp32."""
    positions = dca_query_positions(torch.arange(p0, p0 + q.shape[2]), chunk_size, local_size)[:parts]
    rotated = []
    for qp in positions:
        cos, sin = rope_cos_sin(qp, inv_freq, rope_scale)
        rotated.append(apply_rope(q.float(), cos.unsqueeze(0), sin.unsqueeze(0)))
    return rotated


def dual_chunk_attention_causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, past: int, inv_freq: torch.Tensor,
                                rope_scale: float, chunk_size: int, local_size: int) -> torch.Tensor:
    """`dual_chunk_attention` for the common case, at the cost of causal attention: query t at position past + t
    over keys at positions 0..past+T-1 (no padding, no documents). Each run of queries inside one chunk attends
    to key slices only: its own chunk's earlier keys and its causal square (intra), the previous chunk
    (successive) and every earlier chunk (inter), each through the fused flash kernel with the GQA group folded
    into the query axis, then merged through the log-sum-exp. q (B, H, T, D), k/v (B, H_kv, S, D) unrotated."""
    B, H, T, D = q.shape
    H_kv = k.shape[1]
    G, L, scale = H // H_kv, chunk_size - local_size, 1.0 / math.sqrt(D)
    k_rot, v32 = _rotated_keys(k, inv_freq, rope_scale, L), v.float()
    out = torch.empty(B, H, T, D, dtype=torch.float32, device=q.device)
    for t0, t1, start in _chunk_runs(past, T, L):
        p0, p1, n = past + t0, past + t1, t1 - t0
        chunk = start // L
        rotated = _rotated_queries(q[:, :, t0:t1], p0, min(chunk, 2) + 1, inv_freq, rope_scale, chunk_size,
                                   local_size)
        # the causal square (keys p0..p1-1), one head per query head; then the key spans, GQA group folded
        parts = [_flash(rotated[0], k_rot[:, :, p0:p1].repeat_interleave(G, dim=1),
                        v32[:, :, p0:p1].repeat_interleave(G, dim=1), scale, causal=True)]
        spans = [(0, start, p0), (1, start - L, start), (2, 0, start - L)][:len(rotated)]  # (part, first, end)
        for part, lo, hi in spans:
            if hi > lo:
                o, lse = _flash(rotated[part].reshape(B, H_kv, G * n, D), k_rot[:, :, lo:hi], v32[:, :, lo:hi], scale)
                parts.append((o.reshape(B, H, n, D), lse.reshape(B, H, n)))
        out[:, :, t0:t1] = merge_by_lse(parts)
    return out.to(v.dtype)


def dual_chunk_sparse_prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, past: int, inv_freq: torch.Tensor,
                              rope_scale: float, chunk_size: int, local_size: int,
                              cfg: SparsePrefillConfig) -> torch.Tensor:
    """DCA of one row's T queries (H, T, D) at positions past..past+T-1 over its unrotated keys/values (H_kv,
    past+T, D), with MInference's vertical-slash pattern (as vLLM's DCA backend combines them): for each run of
    queries inside one chunk, its last `cfg.last_q` queries, each part rotated its own way, score every key
    (inter-chunk keys, then the previous chunk, then its own chunk causally), one softmax over them all gives the
    columns and diagonals to keep (`pattern_from_probs`), and each part attends to the kept keys in its range
    (`vertical_slash_attention` with key_range); the parts merge through their log-sum-exp. Budgets that cover
    every key give exactly `dual_chunk_attention_causal`. -> (H, T, D)."""
    H, T, D = q.shape
    H_kv = k.shape[0]
    G, L = H // H_kv, chunk_size - local_size
    k_rot, v32 = _rotated_keys(k.unsqueeze(0), inv_freq, rope_scale, L)[0], v.float()
    out = torch.empty(H, T, D, dtype=torch.float32)
    for t0, t1, start in _chunk_runs(past, T, L):
        p0, p1 = past + t0, past + t1
        rotated = [r[0] for r in _rotated_queries(q[None, :, t0:t1], p0, 3, inv_freq, rope_scale, chunk_size,
                                                  local_size)]
        ranges = [(2, 0, max(0, start - L)), (1, max(0, start - L), start), (0, start, p1)]  # inter, succ, intra
        n = min(cfg.last_q, t1 - t0)
        logits = torch.cat([(rotated[part][:, -n:].reshape(H_kv, G, n, D) @ k_rot[:, lo:hi].unsqueeze(1).transpose(
            -1, -2)).view(H, n, hi - lo) for part, lo, hi in ranges], dim=-1) / math.sqrt(D)
        logits[:, :, p1 - n:].masked_fill_(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
        pattern = pattern_from_probs(torch.softmax(logits, dim=-1), cfg)
        parts = [vertical_slash_attention(rotated[part], k_rot[:, :p1], v32[:, :p1], p0, cfg, pattern, (lo, hi))
                 for part, lo, hi in ranges if hi > lo]
        out[:, t0:t1] = merge_by_lse(parts)
    return out.to(v.dtype)


def spec_positions(spec: AttentionSpec, B: int, T: int) -> torch.Tensor:
    if spec.positions is None:
        raise ValueError("this attention backend rotates with positions of its own: AttentionSpec.positions is "
                         "required (Qwen2Model.forward passes them)")
    return spec.positions.expand(B, T).long()


class DualChunkAttention:
    """The DCA backend for a model config carrying `dual_chunk_attention_config`: cache-less passes, or an
    `UnrotatedKVCache` or the engine's paged cache, which store keys unrotated (prefill + decode equal one full
    pass while no length scaling applies)."""

    def __init__(self, config: ModelConfig) -> None:
        dca = config.dual_chunk_attention_config
        if not dca:
            raise ValueError("DualChunkAttention needs a config with dual_chunk_attention_config")
        self.chunk_size, self.local_size = int(dca["chunk_size"]), int(dca["local_size"])
        self.original = int(dca.get("original_max_position_embeddings") or 0)
        self.inv_freq, self.rope_scale = rope_inv_freq(config.head_dim, config.rope_theta, config.rope_scaling)

    @property
    def plain_length(self) -> int:
        """The longest sequence on which DCA equals plain attention: every distance is the true one below
        min(chunk_size, 2 * chunk_len), and no length scaling applies up to original_max_position_embeddings."""
        exact = min(self.chunk_size, 2 * (self.chunk_size - self.local_size))
        return min(exact, self.original) if self.original else exact

    def length_scale(self, lengths: torch.Tensor) -> torch.Tensor:
        """vLLM's per-sequence scale max(1, 0.1 ln(n / W) + 1) for sequence lengths n (B,) -> (B,) fp32."""
        if not self.original:
            return torch.ones(lengths.shape, dtype=torch.float32, device=lengths.device)
        return (0.1 * torch.log(lengths.float() / self.original) + 1.0).clamp(min=1.0)

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
                 sin: torch.Tensor, cache: KVCache | None, spec: AttentionSpec) -> torch.Tensor:
        return self.sparse_prefill_call(layer, q, k, v, cos, sin, cache, spec, None)

    def sparse_prefill_call(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
                            sin: torch.Tensor, cache: KVCache | None, spec: AttentionSpec,
                            sparse: SparsePrefillConfig | None) -> torch.Tensor:
        """The backend call, with MInference's vertical-slash pattern over the three parts when `sparse` is given
        (`SparsePrefillAttention` passes it for long prefill passes) and the pass is plain causal."""
        B, _, T, _ = q.shape
        positions = spec_positions(spec, B, T)
        longest = int(positions.max()) + 1
        if cache is not None and not stores_unrotated_keys(cache):
            if longest <= self.plain_length:
                return sdpa_attention(layer, q, k, v, cos, sin, cache, spec)
            raise NotImplementedError(
                f"Dual Chunk Attention over a cache of rotated keys ({type(cache).__name__}) is not "
                f"implemented: a sequence of {longest} tokens is longer than {self.plain_length}, "
                "up to which DCA equals plain attention. Use qwen25.model.attention.UnrotatedKVCache or a "
                "cache-less pass.")
        if self.original and longest > self.original:
            s = self.length_scale(positions.max(dim=1).values + 1).view(B, 1, 1, 1).to(q.device)
            q, k = q * s, (k * s).to(k.dtype)
        if cache is None:
            k_all, v_all, k_pos = k, v, positions
        else:
            k_all, v_all = cache.update(layer, k, v)
            k_pos = cache.positions_for(positions)  # type: ignore[attr-defined]
        if (spec.key_mask is None and spec.document_ids is None and positions.shape[1] == T
                and bool((positions == torch.arange(spec.past, spec.past + T)).all())
                and k_pos.shape[1] == spec.past + T and bool((k_pos == torch.arange(spec.past + T)).all())):
            args = (spec.past, self.inv_freq, self.rope_scale, self.chunk_size, self.local_size)
            if sparse is not None:
                return torch.stack([dual_chunk_sparse_prefill(q[b], k_all[b], v_all[b], *args, sparse)
                                    for b in range(B)])
            return dual_chunk_attention_causal(q, k_all, v_all, *args)
        mask, _ = spec.mask(q.device)
        return dual_chunk_attention(q, k_all, v_all, positions, k_pos, self.inv_freq, self.rope_scale,
                                    self.chunk_size, self.local_size, past=spec.past, mask=mask)
