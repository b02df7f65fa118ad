"""Pairwise preference losses as pure functions over sequence log-probs or scores (one value per pair).

    dpo_loss(sigmoid)   -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r)))          (DPO, Rafailov et al. 2023)
    dpo_loss(ipo)       ((pi_c - ref_c) / n_c - (pi_r - ref_r) / n_r - 1 / (2 beta))^2   (IPO, Azar et al. 2023)
    bradley_terry_loss  -log sigmoid(r_c - r_r - margin)                                  (reward model)

pi / ref are the summed log-probs of a response's tokens under the policy / the reference; n its token count.
IPO's log-ratios are averaged per token, as TRL does (its authors' normalisation), so beta means the same for
short and long responses. The implicit DPO rewards beta * (pi - ref) come back for the metrics.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

__all__ = ["DPO_LOSS_TYPES", "bradley_terry_loss", "dpo_loss"]

DPO_LOSS_TYPES = ("sigmoid", "ipo")


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float = 0.1, loss_type: Literal["sigmoid", "ipo"] = "sigmoid",
             chosen_tokens: torch.Tensor | None = None, rejected_tokens: torch.Tensor | None = None,
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(per-pair loss (B,), chosen rewards (B,), rejected rewards (B,)); rewards are beta * log-ratio, detached.

    chosen_tokens / rejected_tokens (B,): response lengths, needed by IPO."""
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    chosen_ratio = policy_chosen - ref_chosen
    rejected_ratio = policy_rejected - ref_rejected
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * (chosen_ratio - rejected_ratio))
    elif loss_type == "ipo":
        if chosen_tokens is None or rejected_tokens is None:
            raise ValueError("the IPO loss needs the response token counts")
        delta = chosen_ratio / chosen_tokens.clamp(min=1) - rejected_ratio / rejected_tokens.clamp(min=1)
        losses = (delta - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"DPO loss type {loss_type!r}: use one of {', '.join(DPO_LOSS_TYPES)}")
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def bradley_terry_loss(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor,
                       margin: torch.Tensor | float | None = None) -> torch.Tensor:
    """Per-pair -log sigmoid(r_chosen - r_rejected - margin) (B,): the negative log-likelihood that the chosen
    response wins under the Bradley-Terry model; margin (per pair or one number) demands a larger gap."""
    diff = chosen_scores - rejected_scores
    if margin is not None:
        diff = diff - margin
    return -F.logsigmoid(diff)
