"""The weights an RL trainer's rollout engine samples from, and how they follow the policy after each update.

Two ways, one contract: `.policy` is the module being trained, `.model` what the `LLMEngine` runs (set `.engine`
once it exists), `.sync()` makes it sample from the policy's weights as they are now and returns the seconds
that took.

- `SharedWeights`: the engine runs the policy module itself (PyTorch fp32 path; LoRA adapters live beside the
  frozen base). A sync only drops the engine's prefix cache. Sampling log-probs are exactly the policy's.
- `QuantizedCopy` (the default in `qwen25 train grpo`): the engine runs a Q8_0-block copy of the policy (what
  `quantization="q8"` loads) on the native fused forward (`qwen25.kernels.native`): several times the rollout
  tokens/s of the policy path (BENCHMARKS.md). A sync writes the policy's current weights (each LoRA projection
  merged: W + B A * scaling) into the copy's blocks *in place*, so the engine's native weight views stay valid
  and nothing is reallocated, then tells the engine (`LLMEngine.weights_updated`, which drops the prefix cache).
  With LoRA only the decoder projections are re-quantized (the embedding and lm_head are frozen); a full
  fine-tune re-quantizes everything. The copy costs Q8_0's memory (1.06 bytes per weight). The samples then
  come from the Q8_0 rounding of the policy, not the policy itself: the objective's ratio still uses the
  policy's own log-probs (as TRL does when vLLM samples in another precision), and the mismatch is the Q8_0
  rounding (perplexity within ~0.1% of fp32's: README).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch
from torch import nn

from qwen25.train.lora import LoraLinear
from qwen25.weights.block_quant import block_bytes, quantize_blocks_
from qwen25.weights.quants import GGMLType

__all__ = ["QuantizedCopy", "SharedWeights"]


class SharedWeights:
    """The engine samples from the policy module itself."""

    def __init__(self, policy: nn.Module) -> None:
        self.policy = self.model = policy
        self.engine: Any = None  # set by the caller once the engine exists

    def sync(self) -> float:
        start = time.perf_counter()
        if self.engine is not None:
            self.engine.reset_prefix_cache()  # shared tensors: only the cached keys/values are stale
        return time.perf_counter() - start


class QuantizedCopy:
    """A Q8_0-block copy of the policy for the native kernels, rewritten in place from the policy on every sync."""

    def __init__(self, policy: nn.Module) -> None:
        from qwen25.weights.quantized import quantize_weights

        self.policy = policy
        modules = dict(policy.named_modules())

        def weight(name: str) -> torch.Tensor:
            owner, _, leaf = name.rpartition(".")
            module = modules[owner]
            tensor = getattr(module, leaf).detach().float()
            if leaf == "weight" and isinstance(module, LoraLinear):
                return tensor + module.delta_weight()
            return tensor

        def rows(name: str, start: int, stop: int) -> torch.Tensor:  # the tables (never LoRA-wrapped)
            return modules[name.rpartition(".")[0]].weight.detach()[start:stop].float()

        with torch.no_grad():
            self.model = quantize_weights(policy.config, weight, rows, bits=8)
        self.engine: Any = None  # set by the caller once the engine exists
        self._projections = self._pair_projections()
        self._scratch = torch.empty(max(src.out_features * src.in_features for _, src in self._projections))

    def _pair_projections(self) -> list[tuple[nn.Module, nn.Module]]:
        """(the copy's block layer, the policy's projection) for every decoder projection."""
        from qwen25.kernels.ggml_linear import GGMLLinear

        names = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
                 "mlp.up_proj", "mlp.down_proj")
        pairs = []
        for ours, theirs in zip(self.model.model.layers, self.policy.model.layers, strict=True):
            attn, mlp = ours.self_attn, ours.mlp
            targets = [*attn.qkv_proj.parts, attn.o_proj, *mlp.gate_up_proj.parts, mlp.down_proj]
            for target, name in zip(targets, names, strict=True):
                if not isinstance(target, GGMLLinear) or target.ggml_type != int(GGMLType.Q8_0):
                    raise TypeError(f"rollout weights: {name} is {type(target).__name__}, not Q8_0 blocks")
                pairs.append((target, theirs.get_submodule(name)))
        return pairs

    def _tables_train(self) -> bool:
        inner = self.policy.model
        return any(p.requires_grad for p in (*inner.embed_tokens.parameters(), *self.policy.lm_head.parameters()))

    def _write(self, raw: np.ndarray, weight: torch.Tensor, lora: LoraLinear | None) -> None:
        """The Q8_0 bytes `raw` of an (N, K) matrix from fp32-able `weight` (+ the LoRA update), in place."""
        N, K = weight.shape
        out, per_row = torch.from_numpy(raw), block_bytes(GGMLType.Q8_0, 1, K)
        step = max(1, self._scratch.numel() // K)
        for r in range(0, N, step):
            stop = min(N, r + step)
            rows = self._scratch[:(stop - r) * K].view(stop - r, K)
            if lora is not None:  # W + (B A) * scaling, the same operations as `LoraLinear.delta_weight`
                torch.matmul(lora.lora_B.weight[r:stop].float(), lora.lora_A.weight.float(), out=rows)
                rows.mul_(lora.scaling).add_(weight[r:stop])
            else:
                rows.copy_(weight[r:stop])
            quantize_blocks_(rows, GGMLType.Q8_0, out[r * per_row:stop * per_row])

    @torch.no_grad()
    def sync(self) -> float:
        start = time.perf_counter()
        for target, source in self._projections:
            self._write(target.raw, source.weight, source if isinstance(source, LoraLinear) else None)
            if source.bias is not None:
                target.bias.copy_(source.bias)
        for ours, theirs in zip(self.model.model.layers, self.policy.model.layers, strict=True):
            ours.input_layernorm.weight.copy_(theirs.input_layernorm.weight)
            ours.post_attention_layernorm.weight.copy_(theirs.post_attention_layernorm.weight)
        self.model.model.norm.weight.copy_(self.policy.model.norm.weight)
        if self._tables_train():
            self._write(self.model.lm_head.raw, self.policy.lm_head.weight, None)
            if not self.policy.config.tie_word_embeddings:  # tied: the embedding holds lm_head's bytes
                self._write(self.model.model.embed_tokens.raw, self.policy.model.embed_tokens.weight, None)
        if self.engine is not None:
            self.engine.weights_updated()
        return time.perf_counter() - start
