"""`NativeForward`: the whole model forward in one native call, on ggml blocks (a GGUF file's own, or made in memory).

Every pass of a quantized model on a KV cache (decode steps, speculative verification, prompt chunks) runs
through `qwen25/kernels/forward.c` instead of ~45 PyTorch ops per layer (measured against the PyTorch path and
llama.cpp in BENCHMARKS.md). Matmul inputs are rounded to 8 bits per block of the weight type there, as
`GGMLLinear` rounds them on the PyTorch path. A pass is a list of rows (token, position, sequence); each row
attends to its sequence's positions 0..position in the KV cache, which `KVView` describes (contiguous per
sequence, or paged through block tables). A row's result depends only on its own token and the cached
keys/values, never on the other rows of the pass: outputs are identical whether a sequence runs alone or batched, with its prompt in one chunk or several, with or
without prefix-cache hits. The cache may store float32, float16 or bfloat16: keys (after RoPE) and values are
rounded to it when written and widened back to fp32 when attention reads them, the current pass's own included.

Available for models whose projections are `GGMLLinear` layers (q, k, v and gate, up as separate tensors of Q4_K /
Q6_K / Q5_0 / Q8_0 blocks, read in place) and whose embedding is a `GGMLEmbedding`: `quantization="gguf"`, "q8"
and "q4" (`qwen25.weights.gguf_blocks`, `qwen25.weights.quantized`), when the kernel builds;
`NativeForward.for_model` returns None otherwise and callers keep the PyTorch path. The weights are read where
they lie on every call, so blocks rewritten in place (a trainer's rollout copy) need no refresh.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from qwen25.kernels import load_forward_kernel
from qwen25.kernels.ggml_linear import ConcatLinear, GGMLEmbedding, GGMLLinear
from qwen25.kernels.ggml_matmul import BLOCK
from qwen25.kernels.native_sparse import SparseScratch, declare, takes_sparse
from qwen25.model.layers import RMSNorm
from qwen25.model.rope import is_dynamic, rope_cos_sin, rope_type
from qwen25.model.qwen2 import Qwen2ForCausalLM
from qwen25.model.sparse_prefill import SparsePrefillConfig

PASS_ROWS = 512  # rows per native call: bounds the work buffer (activations) of long prompts
SHORT_ROWS = 16  # passes up to this many rows (decode steps, verification) check their inputs on Python lists

_ptr, _int = ctypes.c_void_p, ctypes.c_int


class _QMat(ctypes.Structure):
    _fields_ = [("w", _ptr), ("bias", _ptr), ("N", _int), ("K", _int), ("ggml_type", _int)]


class _QLayer(ctypes.Structure):
    _fields_ = [("input_norm", _ptr), ("post_norm", _ptr), ("qkv", _QMat * 3), ("o", _QMat), ("gate", _QMat),
                ("up", _QMat), ("down", _QMat)]


class _QModel(ctypes.Structure):
    _fields_ = [("n_layers", _int), ("hidden", _int), ("n_heads", _int), ("n_kv_heads", _int), ("head_dim", _int),
                ("intermediate", _int), ("vocab", _int), ("eps", ctypes.c_float), ("layers", ctypes.POINTER(_QLayer)),
                ("embed", _QMat), ("final_norm", _ptr), ("lm_head", _QMat)]


class _KVView(ctypes.Structure):
    _fields_ = [("k", _ptr), ("v", _ptr), ("layer_stride", ctypes.c_long), ("seq_stride", ctypes.c_long),
                ("head_stride", ctypes.c_long), ("tables", _ptr), ("table_width", _int), ("block_size", _int),
                ("dtype", _int)]


KV_DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # the cache dtypes forward.c reads and writes


@dataclass
class KVView:
    """Where row keys/values live. keys/values: a contiguous (L, B, H_kv, S, D) cache (`tables` None, a row's
    sequence index picks B) or a paged (L, H_kv, num_blocks, block_size, D) pool with int32 block tables
    (n_seqs, width); float32, float16 or bfloat16 (`KV_DTYPES`), both the same."""

    keys: torch.Tensor
    values: torch.Tensor
    tables: torch.Tensor | None = None

    def as_struct(self) -> _KVView:
        k, v = self.keys, self.values
        if k.dtype not in KV_DTYPES or v.dtype != k.dtype or not (k.is_contiguous() and v.is_contiguous()):
            raise ValueError("the native forward needs contiguous key/value caches of one dtype, float32, float16 "
                             f"or bfloat16; got {k.dtype} keys and {v.dtype} values")
        if self.tables is None:
            L, B, H, S, D = k.shape
            return _KVView(k.data_ptr(), v.data_ptr(), B * H * S * D, H * S * D, S * D, None, 0, 0,
                           KV_DTYPES[k.dtype])
        L, H, N, bs, D = k.shape
        if self.tables.dtype != torch.int32 or not self.tables.is_contiguous():
            self.tables = self.tables.to(torch.int32).contiguous()  # kept on self: C reads it during the call
        tables = self.tables
        return _KVView(k.data_ptr(), v.data_ptr(), H * N * bs * D, 0, N * bs * D, tables.data_ptr(),
                       tables.shape[1], bs, KV_DTYPES[k.dtype])


def _qmat(module: GGMLLinear | GGMLEmbedding) -> _QMat:
    """The C view of a block layer: its bytes, read in place."""
    bias = getattr(module, "bias", None)
    bias_ptr = None if bias is None else bias.data_ptr()
    N, K = (module.num_embeddings, module.embedding_dim) if isinstance(module, GGMLEmbedding) else \
        (module.out_features, module.in_features)
    return _QMat(module.raw.ctypes.data, bias_ptr, N, K, module.ggml_type)


def _parts(module: nn.Module) -> list[nn.Module]:
    """The row blocks of a projection: a ConcatLinear's parts, or the module itself."""
    return list(module.parts) if isinstance(module, ConcatLinear) else [module]


def _supported(module: nn.Module) -> bool:
    return isinstance(module, GGMLLinear) and all(t.is_contiguous() for t in module.buffers())


class NativeForward:
    """Runs `qwen2_forward` for a `Qwen2ForCausalLM` of block layers; holds the mirrored weight-pointer structs, so the
    model must outlive it (and its weights must not be replaced)."""

    def __init__(self, model: Qwen2ForCausalLM, lib: ctypes.CDLL) -> None:
        """lib: a build of forward.c."""
        config = model.config
        self.model, self.config, self.lib = model, config, lib
        inner = model.model
        layers = []
        for layer in inner.layers:
            attn, mlp = layer.self_attn, layer.mlp
            qkv = [_qmat(part) for part in _parts(attn.qkv_proj)] + [_QMat(), _QMat()]  # N = 0: no such block
            gate, up = (_qmat(part) for part in _parts(mlp.gate_up_proj))  # two tensors (checked in `takes`)
            layers.append(_QLayer(layer.input_layernorm.weight.data_ptr(),
                                  layer.post_attention_layernorm.weight.data_ptr(),
                                  (_QMat * 3)(*qkv[:3]), _qmat(attn.o_proj), gate, up,
                                  _qmat(mlp.down_proj)))
        self._layers = (_QLayer * len(layers))(*layers)
        self._struct = _QModel(config.num_hidden_layers, config.hidden_size, config.num_attention_heads,
                               config.num_key_value_heads, config.head_dim, config.intermediate_size,
                               config.vocab_size, config.rms_norm_eps, self._layers, _qmat(inner.embed_tokens),
                               inner.norm.weight.data_ptr(), _qmat(model.lm_head))
        lib.qwen2_work_floats.argtypes = [ctypes.POINTER(_QModel), _int, _int, _int]
        lib.qwen2_work_floats.restype = ctypes.c_size_t
        lib.qwen2_forward.argtypes = [ctypes.POINTER(_QModel), ctypes.POINTER(_KVView), _int, _ptr, _ptr, _ptr, _ptr,
                                      _ptr, _int, _ptr, _ptr, _ptr, _int, _int, _ptr]
        lib.qwen2_forward.restype = None
        declare(lib)
        self._work = torch.empty(0)
        self._sparse: SparseScratch | None = None

    @classmethod
    def for_model(cls, model: Qwen2ForCausalLM, level: str | None = None) -> NativeForward | None:
        """A native forward for this model, or None if it is not made of block layers (or no kernel).
        level: the ISA build to run (`qwen25.kernels.isa`; default the selected one, e.g. the CPU's best)."""
        if not cls.takes(model):
            return None
        lib = load_forward_kernel(level=level)
        return None if lib is None else cls(model, lib)

    @staticmethod
    def takes(model: Qwen2ForCausalLM) -> bool:
        """Whether the kernel takes this model's weights (block layers with fp32 norms), whether or not it can be
        built here: the engine's "auto" KV cache dtype follows this."""
        inner, config = model.model, model.config
        if not (isinstance(model.lm_head, GGMLLinear) and isinstance(inner.embed_tokens, GGMLEmbedding)):
            return False
        if model.lm_head.out_features != config.vocab_size or inner.embed_tokens.num_embeddings != config.vocab_size:
            return False
        if not isinstance(inner.norm, RMSNorm) or inner.norm.weight.dtype != torch.float32:
            return False
        for layer in inner.layers:
            attn, mlp = layer.self_attn, layer.mlp
            qkv = _parts(attn.qkv_proj) if attn.qkv_proj is not None else []
            gate_up = _parts(mlp.gate_up_proj)
            if not (1 <= len(qkv) <= 3 and all(map(_supported, qkv + gate_up + [attn.o_proj, mlp.down_proj]))):
                return False
            if len(gate_up) != 2 or BLOCK[gate_up[0].ggml_type] != BLOCK[gate_up[1].ggml_type]:
                return False  # gate and up apart, of one activation block size (quantized once)
            if any(p.bias is not None for p in gate_up):
                return False
            if sum(part.out_features for part in qkv) != (config.num_attention_heads + 2 * config.num_key_value_heads) \
                    * config.head_dim:
                return False  # the kernel writes q, k, v side by side and applies no gate/up bias
        if config.num_attention_heads % config.num_key_value_heads:
            return False
        if any(k % 16 for k in (config.hidden_size, config.intermediate_size,
                                config.num_attention_heads * config.head_dim)):
            return False  # the kernel quantizes activation rows 16 values at a time
        return config.head_dim % 8 == 0

    def supports(self, config: Any, attention: str, kv_dtype: torch.dtype) -> bool:
        """Whether a pass with this model config, attention kind and KV-cache dtype can run natively: the kernel
        implements plain causal attention over an fp32, fp16 or bf16 cache (and the sparse prefill, see `__call__`),
        for the config it was built from, with default RoPE or static YaRN (it rotates with the cos/sin the model's
        `rope_inv_freq` and attention factor give, as the PyTorch path does); anything else (dynamic YaRN and
        dual-chunk attention, which rotate keys at attention time, or an int8 cache) runs the PyTorch path."""
        scaling = rope_type(config.rope_scaling)
        return (config == self.config and attention == "causal" and kv_dtype in KV_DTYPES
                and (scaling in ("default", None) or (scaling == "yarn" and not is_dynamic(config.rope_scaling)))
                and not getattr(config, "dual_chunk_attention_config", None))

    def takes_sparse(self) -> bool:
        """Whether passes of this model can run sparse prefill natively (`qwen25.kernels.native_sparse`)."""
        return takes_sparse(self.config.head_dim)

    def forward_cache(self, input_ids: torch.Tensor, cache: Any, view: KVView, logits_to_keep: int) -> torch.Tensor:
        """`Qwen2ForCausalLM.forward` for a lock-step batch on a contiguous cache: (B, T) ids after
        `cache.length` cached positions; logits (B, k or T, V); commits T positions."""
        B, T = input_ids.shape
        past = cache.length
        if past + T > view.keys.shape[3]:
            raise ValueError(f"KV cache overflow: {past + T} tokens > capacity {view.keys.shape[3]}")
        keep = min(logits_to_keep or T, T)
        positions = torch.arange(past, past + T, dtype=torch.int32).repeat(B)
        seq_of_row = torch.arange(B, dtype=torch.int32).repeat_interleave(T)
        out_rows = (torch.arange(B, dtype=torch.int32).unsqueeze(1) * T + torch.arange(T - keep, T, dtype=torch.int32))
        logits = self(input_ids.reshape(-1), positions, seq_of_row, view, out_rows.reshape(-1))
        cache.commit(T)
        return logits.view(B, keep, -1)

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, seq_of_row: torch.Tensor, kv: KVView,
                 out_rows: torch.Tensor, sparse: SparsePrefillConfig | None = None) -> torch.Tensor:
        """Logits (len(out_rows), V) of the given rows after computing every row and caching its key/value.

        tokens (R,) int64; positions (R,) and seq_of_row (R,) int32; out_rows (n,) row indices. A row's keys
        and values are cached before later rows run, so rows of one sequence must come in position order. Long
        passes run as several calls of PASS_ROWS rows, with results identical to one call. sparse: MInference's
        vertical-slash sparse prefill for each run of a sequence's consecutive rows that `SparsePrefillConfig`
        makes sparse (its pattern estimated from the run's last queries: such a pass runs as one call, so the
        chunk is the caller's, as on the PyTorch path)."""
        R = tokens.shape[0]
        if R == 0:
            raise ValueError("a native forward needs at least one row")
        if R <= SHORT_ROWS:  # decode steps: the same checks on Python lists (~0.1 ms less per step)
            ids, rows = tokens.tolist(), out_rows.tolist()
            if min(ids) < 0 or max(ids) >= self.config.vocab_size:
                raise IndexError(f"token ids must be in [0, {self.config.vocab_size})")
            if rows and (min(rows) < 0 or max(rows) >= R or len(set(rows)) != len(rows)):
                raise ValueError(f"out_rows must be distinct row indices in [0, {R})")
            return self._call(tokens, positions, seq_of_row, kv, out_rows, sparse)
        if int(tokens.min()) < 0 or int(tokens.max()) >= self.config.vocab_size:
            raise IndexError(f"token ids must be in [0, {self.config.vocab_size})")
        out_rows = out_rows.long()
        if out_rows.numel() and (int(out_rows.min()) < 0 or int(out_rows.max()) >= R
                                 or out_rows.unique().numel() != out_rows.numel()):
            raise ValueError(f"out_rows must be distinct row indices in [0, {R})")
        logits = torch.empty(out_rows.shape[0], self.config.vocab_size)
        step = R if sparse is not None else PASS_ROWS
        for start in range(0, R, step):
            stop = min(start + step, R)
            wanted = ((out_rows >= start) & (out_rows < stop)).nonzero().squeeze(1)
            part = self._call(tokens[start:stop], positions[start:stop], seq_of_row[start:stop], kv,
                              out_rows[wanted] - start, sparse)
            logits[wanted] = part
        return logits

    def _call(self, tokens: torch.Tensor, positions: torch.Tensor, seq_of_row: torch.Tensor, kv: KVView,
              out_rows: torch.Tensor, sparse: SparsePrefillConfig | None = None) -> torch.Tensor:
        R, n_out = tokens.shape[0], out_rows.shape[0]
        inner = self.model.model
        cos, sin = (t.contiguous() for t in rope_cos_sin(positions.long(), inner.inv_freq, inner.rope_scale))
        max_positions = int(positions.max()) + 1
        threads = torch.get_num_threads()
        need = self.lib.qwen2_work_floats(ctypes.byref(self._struct), R, max_positions, threads)
        if self._work.numel() < need:
            self._work = torch.empty(need)
        logits = torch.empty(n_out, self.config.vocab_size)
        kv_struct = kv.as_struct()
        tokens, positions = tokens.long().contiguous(), positions.to(torch.int32).contiguous()
        seq_of_row, out_rows = seq_of_row.to(torch.int32).contiguous(), out_rows.to(torch.int32).contiguous()
        embed = self.model.model.embed_tokens
        if isinstance(embed, GGMLEmbedding):  # its looked-up rows (read from the file), tokens as rows of them
            table, tokens = embed.rows(tokens)
            tokens = tokens.contiguous()
            self._struct.embed.w = table.ctypes.data
        lib = self.lib
        sparse_args = None
        if sparse is not None and R > 1 and max_positions >= sparse.min_length:  # else no run can be sparse
            if not self.takes_sparse():
                raise ValueError(f"the native sparse prefill needs head_dim a multiple of 16, got {self.config.head_dim}")
            if self._sparse is None or self._sparse.config != sparse:
                self._sparse = SparseScratch(sparse)
            args = self._sparse.args(lib, self.config.num_attention_heads, self.config.head_dim, R, max_positions,
                                     threads)
            sparse_args = ctypes.byref(args)
        lib.qwen2_forward(ctypes.byref(self._struct), ctypes.byref(kv_struct), R, tokens.data_ptr(),
                          positions.data_ptr(), seq_of_row.data_ptr(), cos.data_ptr(), sin.data_ptr(), n_out,
                          out_rows.data_ptr(), logits.data_ptr(), self._work.data_ptr(), max_positions, threads,
                          sparse_args)
        return logits
