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

Costs: a key is stored once, unrotated (`UnrotatedKVCache`); each pass rotates the context's keys and computes
up to three logit blocks per query, in query blocks that bound the memory of long prompts. Sparse prefill
(`qwen25.model.sparse_prefill`, MInference's vertical-slash pattern) is not combined with DCA: a checkpoint's
`sparse_attention_*` fields are accepted and the dense DCA runs; asking for sparse prefill with DCA is refused. The engine's paged cache stores keys unrotated for it; on a cache that stores rotated keys
(`ContiguousKVCache`) it runs plain attention while that is exact and raises NotImplementedError beyond.
"""

from __future__ import annotations

import math

import torch

from qwen25.config import ModelConfig
from qwen25.model.attention import AttentionSpec, KVCache, sdpa_attention, stores_unrotated_keys
from qwen25.model.rope import apply_rope, rope_cos_sin, rope_inv_freq

BLOCK_ELEMENTS = 1 << 24  # logits per part computed at once (64 MiB in fp32): bounds memory on long prompts


def dca_query_positions(q_pos: torch.Tensor, chunk_size: int, local_size: int) -> tuple[torch.Tensor, ...]:
    """The query positions of the intra, successive and inter parts for absolute positions q_pos."""
    L = chunk_size - local_size
    within = q_pos % L
    return within, (within + L).clamp(max=chunk_size), torch.full_like(q_pos, min(2 * L - 1, chunk_size))


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible: torch.Tensor,
            scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention with its log-sum-exp. q (B, Hkv, G, t, D), k/v (B, Hkv, 1, S, D), visible (B|1, 1, 1, t, S).
    -> out (B, Hkv, G, t, D), lse (B, Hkv, G, t); a query with no visible key gets out 0, lse -inf."""
    logits = (q @ k.transpose(-1, -2)) * scale
    logits = logits.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(logits, dim=-1)
    probs = torch.exp(logits - torch.where(torch.isinf(lse), 0.0, lse).unsqueeze(-1))
    return probs @ v, lse


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
        outs, lses = [], []
        for q_part, region in zip(rotated, regions):
            part = (visible & region).unsqueeze(2)  # (B|1, 1, 1, t, S)
            if outs and not bool(part.any()):
                continue
            o, lse = _attend(q_part[:, :, :, t0:t1], k_rot, v32, part, scale)
            outs.append(o)
            lses.append(lse)
        if len(outs) == 1:
            out[:, :, :, t0:t1] = outs[0]
            continue
        stacked = torch.stack(lses)  # (parts, B, H_kv, G, t)
        weights = torch.exp(stacked - torch.logsumexp(stacked, dim=0)).nan_to_num(0.0)
        out[:, :, :, t0:t1] = sum(w.unsqueeze(-1) * o for w, o in zip(weights, outs))
    return out.view(B, H, T, D).to(v.dtype)


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
        mask, _ = spec.mask(q.device)
        return dual_chunk_attention(q, k_all, v_all, positions, k_pos, self.inv_freq, self.rope_scale,
                                    self.chunk_size, self.local_size, past=spec.past, mask=mask)
