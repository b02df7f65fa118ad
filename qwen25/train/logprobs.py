"""Log-probs of labelled tokens without the full (B, T, vocab) logits: DPO's and GRPO's policy and reference.

Labels follow the training loop's convention: `labels[b, t]` is the token that follows position t (already
shifted), -100 where there is no loss. For every labelled position

    logp[b, t] = log softmax(lm_head(hidden[b, t]))[labels[b, t]]      (fp32; 0 where labels == -100)

`token_logps(...)` returns these per position (B, T) and, when asked, the entropy of the same distributions;
`sequence_logps(...)` their per-row sums and counts. Only the labelled positions' hidden states go through
`lm_head`, `chunk` positions at a time; with gradients on, each chunk runs under activation checkpointing, so
its (chunk, vocab) logits and softmax are recomputed in backward instead of kept: for 0.5B's 151,936-token
vocabulary a chunk of 256 positions is 156 MB of fp32 logits (about three such buffers live at once: logits,
log-softmax, their gradient), whatever the batch or sequence length; the lm_head matmul is as efficient in
chunks of 256 rows as whole. Under
FSDP2 the root module must run whole (its hooks gather the embedding and lm_head), so there the logits are
materialised (tiny test models only).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from qwen25.train.distributed import DistContext, is_sharded
from qwen25.train.loop import IGNORE_INDEX, autocast

__all__ = ["LOGP_CHUNK", "TokenLogps", "sequence_logps", "token_logps"]

LOGP_CHUNK = 256


@dataclass
class TokenLogps:
    """Per-position results, (B, T) fp32 on the model's device, zero where labels == -100."""

    logps: torch.Tensor
    entropy: torch.Tensor | None  # only when asked for (detached unless gradients were on)
    mask: torch.Tensor  # (B, T) bool, labels != -100


def _chunk_stats(lm_head: nn.Module, ctx: DistContext, dtype: str, with_entropy: bool, hidden: torch.Tensor,
                 targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with autocast(ctx, dtype):
        logits = lm_head(hidden)
    return _stats(logits, targets, with_entropy)


def _stats(logits: torch.Tensor, targets: torch.Tensor, with_entropy: bool) -> tuple[torch.Tensor, torch.Tensor]:
    logp_all = F.log_softmax(logits.float(), dim=-1)  # (n, V)
    logps = logp_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    if not with_entropy:
        return logps, logps.new_zeros(())
    return logps, -(logp_all.exp() * logp_all).sum(-1)


def token_logps(model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor, ctx: DistContext,
                dtype: str = "float32", chunk: int = LOGP_CHUNK, *, entropy: bool = False,
                padding_mask: torch.Tensor | None = None, document_ids: torch.Tensor | None = None) -> TokenLogps:
    """log p(labels[b, t] | tokens <= t) for input_ids / labels (B, T), per position (see the module docstring).

    padding_mask (B, T): False at (left) padding; document_ids (B, T): packed documents (see Qwen2Model)."""
    if input_ids.shape != labels.shape or input_ids.dim() != 2:
        raise ValueError(f"input_ids {tuple(input_ids.shape)} and labels {tuple(labels.shape)} must be the same (B, T)")
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    input_ids, labels = input_ids.to(ctx.device), labels.to(ctx.device)
    kwargs = {"padding_mask": None if padding_mask is None else padding_mask.to(ctx.device),
              "document_ids": None if document_ids is None else document_ids.to(ctx.device)}
    keep = labels != IGNORE_INDEX
    targets = labels[keep]  # (N,)
    if is_sharded(model) or not hasattr(model, "lm_head"):
        with autocast(ctx, dtype):
            logits = model(input_ids, **kwargs)
        flat_logps, flat_ent = _stats(logits[keep], targets, entropy)
    else:
        with autocast(ctx, dtype):
            hidden = model.model(input_ids, **kwargs)[keep]  # (N, H) after the final norm
        logp_parts, ent_parts = [], []
        for i in range(0, targets.numel(), chunk):
            args = (model.lm_head, ctx, dtype, entropy, hidden[i:i + chunk], targets[i:i + chunk])
            if torch.is_grad_enabled() and targets.numel() > chunk:
                lp, ent = torch.utils.checkpoint.checkpoint(_chunk_stats, *args, use_reentrant=False)
            else:
                lp, ent = _chunk_stats(*args)
            logp_parts.append(lp)
            ent_parts.append(ent)
        if logp_parts:
            flat_logps = torch.cat(logp_parts)
            flat_ent = torch.cat(ent_parts) if entropy else None
        else:  # no labelled position: zeros, still connected to the graph
            flat_logps = hidden.sum(-1).float() * 0.0
            flat_ent = flat_logps.detach().clone() if entropy else None
    logps = torch.zeros(labels.shape, dtype=torch.float32, device=ctx.device).masked_scatter(keep, flat_logps)
    ent_out = None
    if entropy:
        ent_out = torch.zeros(labels.shape, dtype=torch.float32, device=ctx.device).masked_scatter(keep, flat_ent)
    return TokenLogps(logps=logps, entropy=ent_out, mask=keep)


def sequence_logps(model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor, ctx: DistContext,
                   dtype: str = "float32", chunk: int = LOGP_CHUNK, *, padding_mask: torch.Tensor | None = None,
                   document_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log-probs (B,) fp32, labelled positions (B,) int64) for input_ids / labels (B, T)."""
    out = token_logps(model, input_ids, labels, ctx, dtype, chunk, padding_mask=padding_mask,
                      document_ids=document_ids)
    return out.logps.sum(-1), out.mask.sum(-1)
