"""GRPO's objective: group-normalised advantages and the clipped, KL-penalised token loss (pure functions).

For a prompt with G sampled completions o_1..o_G and scalar rewards r_1..r_G, `group_advantages` gives

    A_i = (r_i - mean(r)) / (std(r) + 1e-4)     scale="group" (GRPO, DeepSeekMath; std with Bessel's correction)
    A_i =  r_i - mean(r)                        scale="none"  (Dr. GRPO: no std scaling, no difficulty bias)
    A_i = (r_i - mean(r)) / (std(all r) + 1e-4) scale="batch" (std over the whole batch)

so a group whose rewards are all equal has A = 0 exactly (no NaN: the 1e-4 keeps the divisor positive).
Each token t of completion i gets the same A_i. With the ratio rho = exp(log pi(o_t) - log pi_old(o_t)),

    l_t = -min(rho * A, clip(rho, 1 - eps_low, 1 + eps_high) * A) + beta * k3_t,
    k3_t = exp(log ref - log pi) - (log ref - log pi) - 1          (Schulman's k3, unbiased, >= 0)

(pi_old is the policy that sampled, so on the first update after sampling rho = 1 with the gradient of
log pi; eps_high > eps_low is DAPO's clip-higher). The per-token losses are reduced over the mask by
`loss_type`, with TRL's names:

    grpo     mean over sequences of (sum_t l_t / |o_i|)                  (GRPO paper; biased to short answers)
    bnpo     sum of l_t over the micro-batch / its token count
    dr_grpo  sum of l_t / (sequences x max_completion_length)            (Dr. GRPO: a constant normaliser)
    dapo     sum of l_t / num_items, the token count of the whole global batch (DAPO's token-level mean;
             equal to bnpo when the global batch is one micro-batch)

Kept from the papers: group advantages, PPO-style token clip, k3 KL to a frozen reference, clip-higher.
Dropped: DAPO's dynamic sampling (degenerate groups are counted, not re-sampled) and its soft overlong
penalty; PPO's value function (none in GRPO); sequence-level ratios (GSPO). `mask_truncated` (TRL issue
5697) zeroes the loss mask of completions the length limit cut, so they add no gradient: their reward is
not about a finished answer. With beta = 0 a completion whose advantage is 0 (its group's rewards all equal)
has l_t = 0 and no gradient, so the rollout may leave it out of the policy pass (`drop_zero_advantage_rows`):
the loss, its gradient, kl and clip_fraction are unchanged because the loss units (and `dropped_tokens`, the
masked tokens left out) still count it; entropy is then the mean over the completions that were run.

`GRPOObjective` plugs this into the shared training loop (`qwen25.train.loop`), which divides the summed loss
of the global batch by its count of loss units: for "grpo" and "dr_grpo" the unit is a sequence (each
micro-batch returns the sum over its rows of the row's loss), for "dapo" a masked token (the sum over tokens),
so the loop's division reproduces each normalisation over the whole global batch (all micro-batches and
ranks). "bnpo" (a per-micro-batch token mean) is dapo's with one micro-batch on one process, so the trainer
offers grpo, dr_grpo and dapo. The computation matches TRL 1.16's GRPOTrainer._compute_loss value for value and
gradient for gradient (tests/test_grpo_objective.py calls TRL's own code).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

__all__ = ["ADV_EPS", "GRPO_LOSS_TYPES", "TRAINER_LOSS_TYPES", "GRPOLoss", "GRPOObjective", "group_advantages",
           "grpo_token_loss", "loss_units_for", "mask_truncated"]

ADV_EPS = 1e-4
GRPO_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
TRAINER_LOSS_TYPES = ("grpo", "dr_grpo", "dapo")
LossType = Literal["grpo", "bnpo", "dr_grpo", "dapo"]
Scale = Literal["group", "batch", "none"]


def group_advantages(rewards: torch.Tensor, group_size: int,
                     scale: Scale = "group") -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages (N,), all_equal (N // G,) bool) for rewards (N,) laid out group by group (G consecutive
    samples per prompt). ValueError for G < 2 (no baseline) or N not a multiple of G."""
    if group_size < 2:
        raise ValueError(f"GRPO needs at least 2 samples per prompt (--num-generations), got {group_size}")
    if rewards.dim() != 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards {tuple(rewards.shape)} must be 1-D with a multiple of {group_size} entries")
    if scale not in ("group", "batch", "none"):
        raise ValueError(f"scale {scale!r}: use group, batch or none")
    rewards = rewards.float()
    grouped = rewards.view(-1, group_size)
    centred = (grouped - grouped.mean(dim=1, keepdim=True)).reshape(-1)
    group_std = grouped.std(dim=1)  # (N / G,), unbiased
    all_equal = torch.isclose(group_std, torch.zeros_like(group_std))
    centred = centred.masked_fill(all_equal.repeat_interleave(group_size), 0.0)  # exactly 0, not a rounding residue
    if scale == "none":
        return centred, all_equal
    std = group_std.repeat_interleave(group_size) if scale == "group" else rewards.std().expand_as(rewards)
    return centred / (std + ADV_EPS), all_equal


def mask_truncated(mask: torch.Tensor, truncated: torch.Tensor) -> torch.Tensor:
    """The loss mask (B, T) with the rows of truncated completions (B,) bool zeroed."""
    return mask * (~truncated.to(torch.bool)).unsqueeze(1).to(mask.dtype)


@dataclass
class GRPOLoss:
    """The reduced loss and detached sums for metrics (token-weighted means = sum / tokens)."""

    loss: torch.Tensor
    tokens: torch.Tensor  # masked tokens
    kl_sum: torch.Tensor  # sum of k3 over masked tokens (0 when beta == 0 and no reference given)
    clipped_sum: torch.Tensor  # masked tokens whose ratio left the clip region in the direction of A


def grpo_token_loss(logps: torch.Tensor, old_logps: torch.Tensor | None, advantages: torch.Tensor,
                    mask: torch.Tensor, *, ref_logps: torch.Tensor | None = None, beta: float = 0.0,
                    eps_low: float = 0.2, eps_high: float | None = None, loss_type: LossType = "dapo",
                    max_completion_length: int | None = None, num_items: float | None = None) -> GRPOLoss:
    """The GRPO loss of one micro-batch (see the module docstring).

    logps / old_logps / ref_logps / mask: (B, T) over completion positions; advantages (B,) or (B, T).
    old_logps None: the sampling policy is the current one (rho = 1, detached). num_items: for "dapo", the
    masked-token count of the whole global batch (default: this micro-batch's). max_completion_length: for
    "dr_grpo" (required)."""
    if loss_type not in GRPO_LOSS_TYPES:
        raise ValueError(f"loss_type {loss_type!r}: use one of {', '.join(GRPO_LOSS_TYPES)}")
    if beta < 0:
        raise ValueError(f"beta must be >= 0, got {beta}")
    if beta > 0 and ref_logps is None:
        raise ValueError("beta > 0 needs the reference log-probs (ref_logps)")
    if loss_type == "dr_grpo" and not max_completion_length:
        raise ValueError("loss_type dr_grpo needs max_completion_length")
    eps_high = eps_low if eps_high is None else eps_high
    mask = mask.to(logps.dtype)
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(1)
    old = logps.detach() if old_logps is None else old_logps
    ratio = torch.exp(logps - old)
    clipped = torch.clamp(ratio, 1 - eps_low, 1 + eps_high)
    per_token = -torch.min(ratio * advantages, clipped * advantages)
    if beta > 0 or ref_logps is not None:
        diff = ref_logps - logps
        kl = torch.exp(diff) - diff - 1
    else:
        kl = torch.zeros_like(logps)
    if beta > 0:
        per_token = per_token + beta * kl
    masked = per_token * mask
    if loss_type == "grpo":
        loss = (masked.sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    elif loss_type == "bnpo":
        loss = masked.sum() / mask.sum().clamp(min=1.0)
    elif loss_type == "dr_grpo":
        loss = masked.sum() / (logps.size(0) * max_completion_length)
    else:
        denom = mask.sum() if num_items is None else torch.as_tensor(float(num_items))
        loss = masked.sum() / denom.clamp(min=1.0)
    region = ((ratio < 1 - eps_low) & (advantages < 0)) | ((ratio > 1 + eps_high) & (advantages > 0))
    return GRPOLoss(loss, mask.sum().detach(), (kl * mask).sum().detach(),
                    (region.to(mask.dtype) * mask).sum().detach())


def loss_units_for(loss_type: str, labels: torch.Tensor, truncated: torch.Tensor, drop_truncated: bool) -> int:
    """The loss units of a micro-batch for the loop: rows for grpo / dr_grpo, masked tokens for dapo."""
    if loss_type in ("grpo", "dr_grpo"):
        return int(labels.size(0))
    mask = (labels != -100).float()
    if drop_truncated:
        mask = mask_truncated(mask, truncated)
    return int(mask.sum())


class GRPOObjective:
    """The loop's objective over `RolloutBatch`es (`qwen25.train.grpo_rollout`): policy log-probs chunked over
    the completion positions (`qwen25.train.logprobs.token_logps`), then `grpo_token_loss` summed over the
    batch's loss units. Extras: kl, clip_fraction and entropy as sums over the masked tokens, logged as
    global token means through `ratio_extras`; the batch's rollout statistics as value x units (the loop logs
    their mean per unit); masked_tokens per unit."""

    ratio_extras = {"kl": "masked_tokens", "clip_fraction": "masked_tokens", "entropy": "entropy_tokens"}

    def __init__(self, loss_type: LossType = "dapo", *, beta: float = 0.0, eps_low: float = 0.2,
                 eps_high: float | None = None, max_completion_length: int | None = None,
                 drop_truncated: bool = False) -> None:
        if loss_type not in TRAINER_LOSS_TYPES:
            raise ValueError(f"--loss-type {loss_type!r}: use one of {', '.join(TRAINER_LOSS_TYPES)}")
        if loss_type == "dr_grpo" and not max_completion_length:
            raise ValueError("loss_type dr_grpo needs max_completion_length")
        if eps_low <= 0 or (eps_high is not None and eps_high <= 0):
            raise ValueError(f"clip epsilons must be > 0, got {eps_low} / {eps_high}")
        self.loss_type, self.beta, self.eps_low, self.eps_high = loss_type, beta, eps_low, eps_high
        self.max_completion_length, self.drop_truncated = max_completion_length, drop_truncated
        self.loss_label = f"GRPO clipped-ratio loss ({loss_type} normalisation)" + (f" + {beta} x KL" if beta else "")

    def __call__(self, model: nn.Module, batch: Any, ctx: Any,
                 dtype: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        from qwen25.train.logprobs import token_logps

        out = token_logps(model, batch.input_ids, batch.labels, ctx, dtype, entropy=True)
        mask = out.mask.float()
        if self.drop_truncated:
            mask = mask_truncated(mask, batch.truncated.to(mask.device))
        rows = batch.input_ids.size(0)
        ref = None if batch.ref_logps is None else batch.ref_logps.to(out.logps.device)
        old = None if batch.old_logps is None else batch.old_logps.to(out.logps.device)
        kind = "dapo" if self.loss_type == "dapo" else self.loss_type
        result = grpo_token_loss(out.logps, old, batch.advantages.to(out.logps.device), mask, ref_logps=ref,
                                 beta=self.beta, eps_low=self.eps_low, eps_high=self.eps_high, loss_type=kind,
                                 max_completion_length=self.max_completion_length, num_items=1.0)
        loss_sum = result.loss if kind == "dapo" else result.loss * rows
        units = float(batch.num_loss_units)
        entropy = (out.entropy.detach() * mask).sum() if out.entropy is not None else torch.zeros(())
        dropped = float(getattr(batch, "dropped_tokens", 0))  # masked tokens of rows left out: l_t = kl = clip = 0
        token_sums = {"kl": result.kl_sum, "clip_fraction": result.clipped_sum, "entropy": entropy,
                      "masked_tokens": result.tokens + dropped, "entropy_tokens": result.tokens}
        extras = {k: v.detach().double().cpu() for k, v in token_sums.items()}
        extras.update({k: torch.tensor(v, dtype=torch.float64) * units for k, v in batch.stats.items()})
        return loss_sum, extras
