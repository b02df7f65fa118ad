"""The weights an RL trainer's rollout engine samples from, and how they follow the policy after each update.

Two ways, one contract: `.policy` is the module being trained, `.model` what the `LLMEngine` runs (set `.engine`
once it exists), `.sync()` makes it sample from the policy's weights as they are now and returns the seconds
that took.

- `SharedWeights`: the engine runs the policy module itself (PyTorch fp32 path; LoRA adapters live beside the
  frozen base). A sync only drops the engine's prefix cache. Sampling log-probs are exactly the policy's.
- `QuantizedCopy` (the default in `qwen25 train grpo`): the engine runs a q8 copy of the policy on the native
  fused forward (`qwen25.kernels.native`): 3.9x the rollout tokens/s of the policy path on the 0.5B
  (BENCHMARKS.md). A sync writes the policy's current weights (each LoRA projection merged: W + B A * scaling)
  into the copy's int8 weights and scales *in place*, so the engine's native weight views stay valid, then
  asks the engine to refresh what it derived from them (`LLMEngine.weights_updated`). With LoRA only the
  decoder projections are re-quantized (the embedding and lm_head are frozen); a full fine-tune re-quantizes
  everything. The copy costs q8's memory (about 1.1 bytes per weight). The samples then come from the q8
  rounding of the policy, not the policy itself: the objective's ratio still uses the policy's own log-probs
  (as TRL does when vLLM samples in another precision), and the mismatch is the q8 rounding (the native q8
  path's perplexity is 1.0036x the fp32 reference's: README).
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn

from qwen25.train.lora import LoraLinear

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
    """A q8 copy of the policy for the native kernels, rewritten in place from the policy on every sync."""

    def __init__(self, policy: nn.Module) -> None:
        from qwen25.weights.quantized import model_from_quantized_state_dict

        self.policy = policy
        self.model = model_from_quantized_state_dict(policy.config, self._initial_state())
        self.engine: Any = None  # set by the caller once the engine exists
        self._projections = self._pair_projections()
        self._scratch = torch.empty(max(src.out_features * src.in_features for _, _, src in self._projections))

    @torch.no_grad()
    def _initial_state(self) -> dict[str, torch.Tensor]:
        from qwen25.weights.quantized import quantized_state_dict

        modules = dict(self.policy.named_modules())

        def weight(name: str) -> torch.Tensor:
            owner, _, leaf = name.rpartition(".")
            module = modules[owner]
            tensor = getattr(module, leaf).detach().float()
            if leaf == "weight" and isinstance(module, LoraLinear):
                return tensor + module.delta_weight()
            return tensor.clone() if tensor.dim() == 1 else tensor  # norms: the copy's own, not shared

        def rows(name: str, start: int, stop: int) -> torch.Tensor:  # the tables (never LoRA-wrapped)
            return modules[name.rpartition(".")[0]].weight.detach()[start:stop].float()

        return quantized_state_dict(self.policy.config, weight, rows, bits=8)

    def _pair_projections(self) -> list[tuple[nn.Module, int, nn.Module]]:
        """(the copy's fused q8 projection, first row, the policy's projection) for every decoder projection."""
        from qwen25.kernels.quant import Q8Linear

        fused = {"self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                 "self_attn.o_proj": ("self_attn.o_proj",), "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"),
                 "mlp.down_proj": ("mlp.down_proj",)}
        pairs = []
        for ours, theirs in zip(self.model.model.layers, self.policy.model.layers, strict=True):
            for target_name, names in fused.items():
                target = ours.get_submodule(target_name)
                if not isinstance(target, Q8Linear):
                    raise TypeError(f"rollout weights: {target_name} is {type(target).__name__}, not one q8 block")
                first = 0
                for name in names:
                    source = theirs.get_submodule(name)
                    pairs.append((target, first, source))
                    first += source.out_features
        return pairs

    def _tables_train(self) -> bool:
        inner = self.policy.model
        return any(p.requires_grad for p in (*inner.embed_tokens.parameters(), *self.policy.lm_head.parameters()))

    def _write(self, target: nn.Module, first: int, weight: torch.Tensor, lora: LoraLinear | None) -> None:
        """Rows [first, first + len(weight)) of a q8 target from fp32-able `weight` (+ the LoRA update)."""
        from qwen25.kernels.quant import quantize_q8_

        N, K = weight.shape
        group = K // target.scales.shape[-1]
        step = max(1, self._scratch.numel() // K)
        for r in range(0, N, step):
            stop = min(N, r + step)
            rows = self._scratch[:(stop - r) * K].view(stop - r, K)
            if lora is not None:  # W + (B A) * scaling, the same operations as `LoraLinear.delta_weight`
                torch.matmul(lora.lora_B.weight[r:stop].float(), lora.lora_A.weight.float(), out=rows)
                rows.mul_(lora.scaling).add_(weight[r:stop])
            else:
                rows.copy_(weight[r:stop])
            quantize_q8_(rows, target.weight_q[first + r:first + stop],
                         target.scales[first + r:first + stop].view(stop - r, K // group))

    @torch.no_grad()
    def sync(self) -> float:
        start = time.perf_counter()
        for target, first, source in self._projections:
            lora = source if isinstance(source, LoraLinear) else None
            self._write(target, first, source.weight, lora)
            if source.bias is not None:
                target.bias[first:first + source.out_features].copy_(source.bias)
        for ours, theirs in zip(self.model.model.layers, self.policy.model.layers, strict=True):
            ours.input_layernorm.weight.copy_(theirs.input_layernorm.weight)
            ours.post_attention_layernorm.weight.copy_(theirs.post_attention_layernorm.weight)
        self.model.model.norm.weight.copy_(self.policy.model.norm.weight)
        if self._tables_train():
            self._write(self.model.lm_head, 0, self.policy.lm_head.weight, None)
            if not self.policy.config.tie_word_embeddings:
                self._write(self.model.model.embed_tokens, 0, self.policy.model.embed_tokens.weight, None)
        if self.engine is not None:
            self.engine.weights_updated()
        return time.perf_counter() - start
