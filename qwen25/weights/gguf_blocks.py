"""Load a GGUF file as a model whose projections and embedding are the file's own blocks (`quantization="gguf"`).

The Q4_K / Q6_K / Q5_0 / Q8_0 tensors become `GGMLLinear` / `GGMLEmbedding` layers over the memory-mapped file:
no requantization and no cache copy, so loading costs about an mmap. q/k/v and gate/up stay separate tensors
(a `ConcatLinear` of their parts, which the native forward reads part by part). Matrices of a type the block
kernels lack (F32, F16, BF16, Q4_0, Q5_K, ...) are dequantized at load and stored as Q8_0 blocks in memory (one
more rounding for those tensors only; the Qwen2.5 Q4_K_M files have none). Norms and biases are fp32.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from qwen25.config import ModelConfig
from qwen25.kernels.ggml_linear import ConcatLinear, EmbeddingSource, GGMLEmbedding, GGMLLinear
from qwen25.kernels.ggml_matmul import TYPES
from qwen25.model.qwen2 import Qwen2ForCausalLM
from qwen25.weights.block_quant import quantize_q8_0
from qwen25.weights.gguf_writer import gguf_tensor_name
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


def _vector(g, name: str) -> torch.nn.Parameter:  # noqa: ANN001
    return torch.nn.Parameter(torch.from_numpy(np.array(g.dequantize(name), dtype=np.float32)), requires_grad=False)


LinearOf = Callable[[str, str | None], nn.Module]  # (HF weight name, HF bias name or None) -> block layer
VectorOf = Callable[[str], nn.Parameter]  # HF name of a norm weight -> fp32 parameter


def assemble_block_model(config: ModelConfig, linear: LinearOf, vector: VectorOf, embed_tokens: GGMLEmbedding,
                         lm_head: GGMLLinear) -> Qwen2ForCausalLM:
    """A model whose projections are block layers: q/k/v and gate/up as `ConcatLinear`s of their separate tensors
    (the layout the native forward reads), built on the meta device so no float copy is ever allocated; frozen,
    eval mode. Shared by GGUF files (their own blocks) and in-memory quantization (`weights.quantized`)."""
    with torch.device("meta"):
        model = Qwen2ForCausalLM(config)
    for i, layer in enumerate(model.model.layers):
        attn, mlp, p = layer.self_attn, layer.mlp, f"model.layers.{i}."
        attn.qkv_proj = ConcatLinear([linear(f"{p}self_attn.{x}_proj.weight", f"{p}self_attn.{x}_proj.bias")
                                      for x in "qkv"])
        attn.o_proj = linear(f"{p}self_attn.o_proj.weight", f"{p}self_attn.o_proj.bias")  # if a file has one
        del attn.q_proj, attn.k_proj, attn.v_proj
        mlp.gate_up_proj = ConcatLinear([linear(f"{p}mlp.{x}_proj.weight", None) for x in ("gate", "up")])
        mlp.down_proj = linear(f"{p}mlp.down_proj.weight", None)
        del mlp.gate_proj, mlp.up_proj
        layer.input_layernorm.weight = vector(f"{p}input_layernorm.weight")
        layer.post_attention_layernorm.weight = vector(f"{p}post_attention_layernorm.weight")
    model.model.embed_tokens = embed_tokens
    model.lm_head = lm_head
    model.model.norm.weight = vector("model.norm.weight")
    model.model.reset_rope()
    return model.eval().requires_grad_(False)


def load_gguf_blocks(g, config: ModelConfig) -> Qwen2ForCausalLM:  # noqa: ANN001 - GGUFFile
    """The model of an open GGUFFile with block layers (see the module docstring); frozen, eval mode. The tensor
    bytes go on 2 MiB pages first where the system allows (`weights.huge_pages`): decode reads them all per token."""
    g.use_huge_pages()
    def linear(weight: str, bias: str | None) -> GGMLLinear:
        raw, kind, rows, cols = _blocks(g, gguf_tensor_name(weight))
        b = gguf_tensor_name(bias) if bias else None
        b = torch.from_numpy(np.array(g.dequantize(b), dtype=np.float32)) if b and b in g.tensors else None
        return GGMLLinear(raw, kind, cols, rows, b)

    raw, kind, rows, cols = _blocks(g, "token_embd.weight")
    in_file = kind == int(g.info("token_embd.weight").ggml_type)  # the file's own bytes: rows read with pread
    source = EmbeddingSource(g.path, g.info("token_embd.weight").offset) if in_file else None
    embed = GGMLEmbedding(raw, kind, rows, cols, source)
    head = "output.weight" if "output.weight" in g.tensors else "token_embd.weight"  # tied: the embedding's bytes
    raw, kind, rows, cols = _blocks(g, head)
    return assemble_block_model(config, linear, lambda name: _vector(g, gguf_tensor_name(name)), embed,
                                GGMLLinear(raw, kind, cols, rows))
