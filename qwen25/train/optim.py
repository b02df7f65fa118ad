"""Optimizer, learning-rate schedule and gradient clipping for every training stage.

Objective-independent: the stage scripts decide the loss; this module decides how gradients move weights.

- AdamW (decoupled weight decay, Loshchilov & Hutter) with two parameter groups. Weight decay applies to the
  matrices of the decoder (attention and MLP projections, LoRA A/B, an untied lm_head). It does not apply to
  1-D parameters — RMSNorm gains and the q/k/v biases — nor to the token embedding (and so not to a head tied to
  it). The embedding is exempt because decoupled decay shrinks every row on every step while only the rows of
  tokens in the batch get gradient: with Qwen's 151,936-token vocabulary most rows would decay towards zero
  between their rare updates (the choice of nanoGPT/nanochat; HF Trainer decays embeddings, Megatron too).
- Schedule: linear warmup from lr/warmup to lr over `warmup_steps`, then cosine (or linear) decay to `min_lr` at
  the last step, and `min_lr` after. `constant` keeps lr after warmup. A `LambdaLR`, so its state_dict resumes it.
  The report's SFT schedule (7e-6 -> 7e-7) is cosine from lr to min_lr.
- Gradient clipping by the global L2 norm over every trainable parameter (`clip_gradients`); under FSDP2 the
  gradients are sharded DTensors and the norm is reduced across ranks (torch's clip_grad_norm_ does this for
  DTensors), so each rank clips with the same full-model norm.
- Gradient accumulation is the loop's (`qwen25.train.loop`): it sums micro-batch gradients and normalises the
  loss by the loss tokens of the whole accumulated, all-rank batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["OptimSettings", "build_optimizer", "build_scheduler", "clip_gradients", "lr_factor", "param_groups"]


@dataclass
class OptimSettings:
    lr: float
    min_lr: float
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    schedule: str = "cosine"  # cosine | linear | constant
    warmup_steps: int = 0
    total_steps: int = 1

    def __post_init__(self) -> None:
        if self.lr <= 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise ValueError(f"need 0 <= min_lr <= lr and lr > 0, got lr={self.lr} min_lr={self.min_lr}")
        if self.schedule not in ("cosine", "linear", "constant"):
            raise ValueError(f"unknown schedule {self.schedule!r} (cosine, linear or constant)")
        if self.warmup_steps < 0 or self.total_steps < 1:
            raise ValueError(f"warmup_steps must be >= 0 and total_steps >= 1, got {self.warmup_steps}, "
                             f"{self.total_steps}")


def is_decayed(name: str, param: nn.Parameter) -> bool:
    """Weight decay for matrices only: not norms, biases (1-D) or the token embedding (see the module doc)."""
    return param.ndim >= 2 and "embed_tokens" not in name


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups over the trainable parameters: decayed matrices, and the rest with weight_decay 0.

    A tied lm_head is the embedding's own Parameter, met once (named_parameters skips duplicates)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (decay if is_decayed(name, p) else no_decay).append(p)
    if not decay and not no_decay:
        raise ValueError("the model has no trainable parameters")
    return [{"params": decay, "weight_decay": weight_decay, "group": "decay"},
            {"params": no_decay, "weight_decay": 0.0, "group": "no_decay"}]


def build_optimizer(model: nn.Module, settings: OptimSettings) -> torch.optim.AdamW:
    # fused=True: one pass over parameter, gradient and both moments per tensor, where the op-by-op update makes
    # about a dozen (AdamW over 450M fp32 parameters on 2 cores: 1.6-2.0 s -> 0.25 s per step, measured;
    # transformers' Trainer defaults to it too). Deterministic run to run, so resume stays bit-identical.
    return torch.optim.AdamW(param_groups(model, settings.weight_decay), lr=settings.lr, betas=settings.betas,
                             eps=settings.eps, fused=True)


def lr_factor(step: int, settings: OptimSettings) -> float:
    """The multiplier of `lr` for optimizer step `step` (0-based): warmup, then decay to min_lr / lr."""
    warmup, total = settings.warmup_steps, settings.total_steps
    if step < warmup:
        return (step + 1) / warmup
    floor = settings.min_lr / settings.lr
    if settings.schedule == "constant":
        return 1.0
    span = max(1, total - warmup - 1)  # the last step (total - 1) gets exactly min_lr
    progress = min(1.0, (step - warmup) / span)
    if settings.schedule == "linear":
        return 1.0 - (1.0 - floor) * progress
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


class _Factor:
    """A picklable lr_lambda (LambdaLR stores callable objects' state; a closure would not round-trip)."""

    def __init__(self, settings: OptimSettings) -> None:
        self.settings = settings

    def __call__(self, step: int) -> float:
        return lr_factor(step, self.settings)


def build_scheduler(optimizer: torch.optim.Optimizer, settings: OptimSettings) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, _Factor(settings))


def clip_gradients(parameters: list[nn.Parameter], max_norm: float | None) -> float:
    """Scale gradients so that their global L2 norm is at most max_norm (None or 0: measure only); returns the
    norm before clipping. FSDP2's sharded gradients (DTensors) give the norm over the whole model."""
    grads = [p for p in parameters if p.grad is not None]
    if not grads:
        return 0.0
    norm = torch.nn.utils.clip_grad_norm_(grads, max_norm if max_norm else float("inf"), foreach=False)
    if hasattr(norm, "full_tensor"):  # a DTensor under FSDP2
        norm = norm.full_tensor()
    return float(norm)
