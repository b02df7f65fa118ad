"""The weights an RL trainer's rollout engine samples from, and how they follow the policy after each update.

Two ways, one contract: `.policy` is the module being trained, `.model` what the `LLMEngine` runs (set `.engine`
once it exists), `.sync()` makes it sample from the policy's
weights as they are now and returns the seconds that took.

- `SharedWeights`: the engine runs the policy module itself (PyTorch fp32 path; LoRA adapters live beside the
  frozen base). A sync only drops the engine's prefix cache. Sampling log-probs are exactly the policy's.
- `QuantizedCopy` (the default in `qwen25 train grpo`): the engine runs a q8 copy of the policy on the native
  fused forward (`qwen25.kernels.native`), several times faster to decode. A sync writes the policy's current
  weights (each LoRA projection merged: W + B A * scaling) into the copy's int8 weights and scales *in place*,
  so the engine's native weight views stay valid, then asks the engine to refresh what it derived from them
  (`LLMEngine.weights_updated`). With LoRA only the decoder projections are re-quantized (the embedding and
  lm_head are frozen); a full fine-tune re-quantizes everything. The copy costs q8's memory (about 1.1 bytes per
  weight). The samples then come from the q8 rounding of the policy, not the policy itself: the objective's
  ratio still uses the policy's own log-probs (as TRL does when vLLM samples in another precision), and the
  mismatch is the q8 rounding (the q8 path's logits track fp32 to about 1%: `tests/test_native_forward.py`).
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
        self.model = model_from_quantized_state_dict(policy.config, self._state(tables=True))
        self.engine: Any = None  # set by the caller once the engine exists
        self._targets = dict(self.model.state_dict())  # the copy's own tensors (shared storage), written in place

    def _tables_train(self) -> bool:
        inner = self.policy.model
        return any(p.requires_grad for p in (*inner.embed_tokens.parameters(), *self.policy.lm_head.parameters()))

    @torch.no_grad()
    def _state(self, tables: bool) -> dict[str, torch.Tensor]:
        from qwen25.weights.quantized import quantized_state_dict

        modules = dict(self.policy.named_modules())

        def weight(name: str) -> torch.Tensor:
            owner, _, leaf = name.rpartition(".")
            module = modules[owner]
            tensor = getattr(module, leaf).detach()
            if leaf == "weight" and isinstance(module, LoraLinear):
                return tensor.float() + module.delta_weight()
            return tensor.float()

        def rows(name: str, start: int, stop: int) -> torch.Tensor:  # the tables (never LoRA-wrapped)
            return modules[name.rpartition(".")[0]].weight.detach()[start:stop].float()

        return quantized_state_dict(self.policy.config, weight, rows, bits=8, tables=tables)

    @torch.no_grad()
    def sync(self) -> float:
        start = time.perf_counter()
        state = self._state(tables=self._tables_train())
        for name, value in state.items():
            target = self._targets[name]
            if target.shape != value.shape or target.dtype != value.dtype:
                raise RuntimeError(f"rollout weights: {name} changed shape or dtype ({tuple(target.shape)} "
                                   f"{target.dtype} -> {tuple(value.shape)} {value.dtype})")
            target.copy_(value)
        if self.engine is not None:
            self.engine.weights_updated()
        return time.perf_counter() - start
