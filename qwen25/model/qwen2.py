"""The Qwen2 decoder-only transformer (Qwen2.5 uses this architecture unchanged).

Parameter names equal HF's (`model.layers.N.self_attn.q_proj.weight`, ...), so safetensors checkpoints load
with no rename table. The module holds weights and RoPE frequencies only: the KV cache belongs to the caller
and is passed in, positions are explicit (not assumed 0..T-1), and attention goes through a swappable backend
that receives q/k/v before rotation, so packed documents, DCA or sparse attention change no code here; with
no backend given, the one the config needs runs (`qwen25.model.long_context.attention_for_config`).
"""

from __future__ import annotations

import torch
from torch import nn

from qwen25.config import ModelConfig
from qwen25.model.attention import AttentionBackend, AttentionSpec, KVCache, sdpa_attention
from qwen25.model.layers import RMSNorm, SwiGLU
from qwen25.model.long_context import attention_for_config
from qwen25.model.rope import positions_in_documents, rope_cos_sin, rope_inv_freq


class Qwen2Attention(nn.Module):
    """GQA attention with q/k/v bias. Engines may fuse q/k/v into one `qkv_proj` (rows: q, k, v) at load time."""

    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        h, d = config.hidden_size, config.head_dim
        self.q_proj = nn.Linear(h, self.num_heads * d, bias=True)
        self.k_proj = nn.Linear(h, self.num_kv_heads * d, bias=True)
        self.v_proj = nn.Linear(h, self.num_kv_heads * d, bias=True)
        self.o_proj = nn.Linear(self.num_heads * d, h, bias=False)
        self.qkv_proj: nn.Module | None = None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, spec: AttentionSpec,
                cache: KVCache | None, attention: AttentionBackend) -> torch.Tensor:
        B, T, _ = x.shape
        if self.qkv_proj is not None:
            kv_width = self.num_kv_heads * self.head_dim
            q, k, v = self.qkv_proj(x).split([self.num_heads * self.head_dim, kv_width, kv_width], dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.view(B, T, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = k.view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, H_kv, T, D)
        v = v.view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        out = attention(self.layer_idx, q, k, v, cos, sin, cache, spec)  # (B, H, T, D)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim))


class Qwen2DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = Qwen2Attention(config, layer_idx)
        self.mlp = SwiGLU(config.hidden_size, config.intermediate_size)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, spec: AttentionSpec,
                cache: KVCache | None, attention: AttentionBackend) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, spec, cache, attention)
        return x + self.mlp(self.post_attention_layernorm(x))


def _embedding(num_embeddings: int, dim: int) -> nn.Embedding:
    """nn.Embedding with its N(0, 1) init, skipped on the meta device (loaders build skeletons there): PyTorch's
    meta `normal_` imports its Python reference ops on first use, which was 1.2 s of every model load."""
    weight = torch.empty(num_embeddings, dim)
    if weight.device.type != "meta":
        nn.init.normal_(weight)
    return nn.Embedding(num_embeddings, dim, _weight=weight)


class Qwen2Model(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = _embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Qwen2DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rope_scale = 1.0
        self.attention: AttentionBackend = sdpa_attention
        self.register_buffer("inv_freq", torch.empty(0), persistent=False)
        self.reset_rope()

    def reset_rope(self) -> None:
        """(Re)compute the RoPE buffer and the default attention backend from the config (loaders call this
        after building on the meta device)."""
        c = self.config
        self.inv_freq, self.rope_scale = rope_inv_freq(c.head_dim, c.rope_theta, c.rope_scaling)
        self.attention = attention_for_config(c)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None, cache: KVCache | None = None,
                padding_mask: torch.Tensor | None = None, attention: AttentionBackend | None = None,
                document_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Hidden states (B, T, hidden) after the final norm.

        input_ids (B, T); positions (B, T) RoPE positions (default: past..past+T-1, or restarting at every
        document with document_ids); padding_mask (B, T) bool, False for padding tokens (left padding of
        ragged batches); document_ids (B, T): a packed row's documents, which attend only within themselves."""
        B, T = input_ids.shape
        past = cache.length if cache is not None else 0
        if positions is None:
            positions = (positions_in_documents(document_ids) if document_ids is not None else
                         torch.arange(past, past + T, device=input_ids.device).expand(B, T))
        x = self.embed_tokens(input_ids)
        cos, sin = rope_cos_sin(positions, self.inv_freq, self.rope_scale, dtype=x.dtype)
        key_mask = cache.key_mask(padding_mask, T) if cache is not None else padding_mask
        spec = AttentionSpec(T, past, key_mask=key_mask, document_ids=document_ids, positions=positions)
        attention = self.attention if attention is None else attention
        for layer in self.layers:
            x = layer(x, cos, sin, spec, cache, attention)
        if cache is not None:
            cache.commit(T)
        return self.norm(x)


class Qwen2ForCausalLM(nn.Module):
    """Qwen2 with its LM head. `forward(input_ids) -> logits (B, T, V)`."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = Qwen2Model(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def tie_weights(self) -> None:
        """Re-point lm_head at the embedding (needed after loading weights with `assign=True`)."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None, cache: KVCache | None = None,
                padding_mask: torch.Tensor | None = None, logits_to_keep: int = 0,
                attention: AttentionBackend | None = None, document_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, T, V) in fp32; with logits_to_keep=k only the last k positions (B, k, V). attention: the
        backend (default: the one the config needs)."""
        hidden = self.model(input_ids, positions, cache, padding_mask, attention, document_ids)
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        return self.lm_head(hidden).float()
