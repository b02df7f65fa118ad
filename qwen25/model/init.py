"""Fresh weights for models trained from scratch: `init_weights` and `model_from_config`.

The scheme is GPT-2's, which Qwen2 inherits through HF (`initializer_range` = 0.02): every linear and
embedding weight ~ N(0, std), biases 0, RMSNorm weights 1. Buffers (the RoPE frequencies) are not touched, and
a tied lm_head is the embedding's own tensor, so it stays tied. Loading trained weights is `qwen25.checkpoint`'s.
"""

from __future__ import annotations

import torch
from torch import nn

from qwen25.config import ModelConfig, preset
from qwen25.model.layers import RMSNorm
from qwen25.model.qwen2 import Qwen2ForCausalLM

DEFAULT_STD = 0.02  # HF Qwen2Config.initializer_range

__all__ = ["DEFAULT_STD", "init_weights", "model_from_config"]


@torch.no_grad()
def init_weights(model: nn.Module, std: float = DEFAULT_STD, seed: int | None = None) -> nn.Module:
    """Re-initialise `model` in place and return it: N(0, std) linear and embedding weights, zero biases, unit
    RMSNorm weights. seed: draw from a private generator (the global RNG is left alone); None uses the global
    RNG. A shared (tied) tensor is drawn once. Modules with parameters of any other kind, or with weights in
    buffers (a quantized model), are refused: they would silently keep their old values."""
    generators: dict[torch.device, torch.Generator] = {}

    def generator(device: torch.device) -> torch.Generator | None:
        if seed is None:
            return None
        if device not in generators:
            generators[device] = torch.Generator(device=device).manual_seed(seed)
        return generators[device]

    plan: list[tuple[nn.Module, dict[str, nn.Parameter]]] = []
    seen: set[int] = set()
    for name, module in model.named_modules():  # check everything before changing anything
        params = {k: p for k, p in module.named_parameters(recurse=False) if id(p) not in seen}
        seen.update(id(p) for p in params.values())
        in_buffers = [k for k, _ in module.named_buffers(recurse=False) if k != "inv_freq"]
        if in_buffers:  # e.g. quantized linears keep their codes in buffers
            raise ValueError(f"init_weights: {name or 'the model'} ({type(module).__name__}) holds weights in "
                             f"buffers {in_buffers}; only float models (Linear, Embedding, RMSNorm) can be initialised")
        if params and not isinstance(module, (nn.Linear, nn.Embedding, RMSNorm)):
            raise ValueError(f"init_weights: {name or 'the model'} is a {type(module).__name__}, whose parameters "
                             "it does not know how to initialise (only Linear, Embedding and RMSNorm)")
        if params:
            plan.append((module, params))
    for module, params in plan:
        if isinstance(module, RMSNorm):
            params["weight"].fill_(1.0)
            continue
        if "weight" in params:
            params["weight"].normal_(0.0, std, generator=generator(params["weight"].device))
        if "bias" in params:
            params["bias"].zero_()
    return model


def model_from_config(config: ModelConfig | str, seed: int | None = None, std: float = DEFAULT_STD,
                      dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> Qwen2ForCausalLM:
    """A freshly initialised Qwen2ForCausalLM (a ModelConfig or a preset name such as "qwen2.5-0.5b"), in train
    mode with every parameter requiring grad. Built on the meta device and allocated once (no default init that
    `init_weights` would overwrite); drawn in fp32, then cast to `dtype` (the RoPE buffer stays fp32)."""
    if isinstance(config, str):
        config = preset(config)
    with torch.device("meta"):
        model = Qwen2ForCausalLM(config)
    model.to_empty(device=device)  # allocates each tensor once, but separately: re-tie below
    model.tie_weights()
    model.model.reset_rope()  # the non-persistent RoPE buffer was created on the meta device
    model.model.inv_freq = model.model.inv_freq.to(device)
    init_weights(model, std, seed)
    if dtype != torch.float32:
        for p in model.parameters():  # parameters only: rope frequencies stay fp32, as loaded checkpoints keep them
            p.data = p.data.to(dtype)
    return model.train().requires_grad_(True)
