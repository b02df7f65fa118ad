"""Load a GGUF file as a model whose projections and embedding are the file's own blocks (`quantization="gguf"`).

The Q4_K / Q6_K / Q5_0 / Q8_0 tensors become `GGMLLinear` / `GGMLEmbedding` layers over the memory-mapped file:
no requantization and no cache copy, so loading costs about an mmap. q/k/v and gate/up stay separate tensors
(a `ConcatLinear` of their parts, which the native forward reads part by part). Matrices of a type the block
kernels lack (F32, F16, BF16, Q4_0, Q5_K, ...) are dequantized at load and stored as Q8_0 blocks in memory (one
more rounding for those tensors only; the Qwen2.5 Q4_K_M files have none). Norms and biases are fp32.
"""

from __future__ import annotations

import numpy as np
import torch

from qwen25.config import ModelConfig
from qwen25.kernels.ggml_linear import EmbeddingSource, GGMLEmbedding, GGMLLinear
from qwen25.kernels.ggml_matmul import TYPES
from qwen25.kernels.quant import ConcatLinear
from qwen25.model.qwen2 import Qwen2ForCausalLM
from qwen25.weights.gguf_writer import quantize_q8_0
from qwen25.weights.quants import GGMLType

Q8_0 = int(GGMLType.Q8_0)


def _blocks(g, name: str) -> tuple[np.ndarray, int, int, int]:  # noqa: ANN001 - GGUFFile
    """(bytes, ggml type, rows, cols) of a 2-D tensor: the file's bytes when the kernels run its type, else its
    values as Q8_0 blocks."""
    info = g.info(name)
    rows, cols = int(np.prod(info.shape[:-1])), int(info.shape[-1])
    kind = int(info.ggml_type)
    if kind in TYPES and cols % TYPES[kind][1] == 0:
        return g.raw(name), kind, rows, cols
    if cols % 32:
        raise ValueError(f"{g.path}: {name} ({info.ggml_type.name}, {cols} columns) cannot run on block kernels")
    return quantize_q8_0(g.dequantize(name).reshape(rows, cols)), Q8_0, rows, cols


def _linear(g, name: str, bias: str | None = None) -> GGMLLinear:  # noqa: ANN001
    raw, kind, rows, cols = _blocks(g, name)
    b = torch.from_numpy(np.array(g.dequantize(bias), dtype=np.float32)) if bias and bias in g.tensors else None
    return GGMLLinear(raw, kind, cols, rows, b)


def _vector(g, name: str) -> torch.nn.Parameter:  # noqa: ANN001
    return torch.nn.Parameter(torch.from_numpy(np.array(g.dequantize(name), dtype=np.float32)), requires_grad=False)


def load_gguf_blocks(g, config: ModelConfig) -> Qwen2ForCausalLM:  # noqa: ANN001 - GGUFFile
    """The model of an open GGUFFile with block layers (see the module docstring); frozen, eval mode."""
    with torch.device("meta"):
        model = Qwen2ForCausalLM(config)
    for i, layer in enumerate(model.model.layers):
        attn, mlp, p = layer.self_attn, layer.mlp, f"blk.{i}."
        attn.qkv_proj = ConcatLinear([_linear(g, f"{p}attn_{x}.weight", f"{p}attn_{x}.bias") for x in "qkv"])
        attn.o_proj = _linear(g, f"{p}attn_output.weight", f"{p}attn_output.bias")
        del attn.q_proj, attn.k_proj, attn.v_proj
        mlp.gate_up_proj = ConcatLinear([_linear(g, f"{p}ffn_gate.weight"), _linear(g, f"{p}ffn_up.weight")])
        mlp.down_proj = _linear(g, f"{p}ffn_down.weight")
        del mlp.gate_proj, mlp.up_proj
        layer.input_layernorm.weight = _vector(g, f"{p}attn_norm.weight")
        layer.post_attention_layernorm.weight = _vector(g, f"{p}ffn_norm.weight")
    raw, kind, rows, cols = _blocks(g, "token_embd.weight")
    in_file = kind == int(g.info("token_embd.weight").ggml_type)  # the file's own bytes: rows read with pread
    source = EmbeddingSource(g.path, g.info("token_embd.weight").offset) if in_file else None
    model.model.embed_tokens = GGMLEmbedding(raw, kind, rows, cols, source)
    head = "output.weight" if "output.weight" in g.tensors else "token_embd.weight"  # tied: the embedding's bytes
    model.lm_head = _linear(g, head)
    model.model.norm.weight = _vector(g, "output_norm.weight")
    model.model.reset_rope()
    return model.eval().requires_grad_(False)
