"""Qwen2 with a scalar (or small) head on the last real token: the reward-model architecture.

Mirrors transformers' `Qwen2ForSequenceClassification`: the decoder (`model.*`, the same names as the causal LM
without its `lm_head`) and `score` (nn.Linear(hidden, num_labels, bias=False)); a sequence's score is `score`
applied to the final-norm hidden state of its last real token, found as transformers finds it: the rightmost
token of the row that is not `pad_token_id` (the last position when there is no pad token). Batches are
right-padded with `pad_token_id`; causal attention keeps the padding out of every real position. A text that
itself ends in the pad token (base models' end-of-sequence is their pad token) is pooled at the token before
it, in training as in transformers, so a score is the same wherever it is computed. Only the pooled positions
go through `score`.
"""

from __future__ import annotations

import torch
from torch import nn

from qwen25.config import ModelConfig
from qwen25.model.qwen2 import Qwen2Model

__all__ = ["Qwen2ForSequenceClassification", "last_token_index"]


def last_token_index(input_ids: torch.Tensor, pad_token_id: int | None) -> torch.Tensor:
    """(B,) index of each row's rightmost non-pad token (the last position when pad_token_id is None)."""
    B, T = input_ids.shape
    if pad_token_id is None:
        return torch.full((B,), T - 1, dtype=torch.long, device=input_ids.device)
    positions = torch.arange(T, device=input_ids.device)
    return (positions * (input_ids != pad_token_id)).argmax(-1)


class Qwen2ForSequenceClassification(nn.Module):
    """`forward(input_ids) -> scores (B, num_labels)` in fp32 (see the module docstring)."""

    def __init__(self, config: ModelConfig, num_labels: int = 1, pad_token_id: int | None = None) -> None:
        super().__init__()
        if num_labels < 1:
            raise ValueError(f"num_labels must be >= 1, got {num_labels}")
        self.config, self.num_labels, self.pad_token_id = config, num_labels, pad_token_id
        self.model = Qwen2Model(config)
        self.score = nn.Linear(config.hidden_size, num_labels, bias=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids (B, T), right-padded with pad_token_id."""
        if self.pad_token_id is None and input_ids.shape[0] > 1:
            raise ValueError("a batch of several rows needs the reward model's pad_token_id to find each row's end")
        hidden = self.model(input_ids)  # (B, T, H)
        last = last_token_index(input_ids, self.pad_token_id)
        pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]  # (B, H)
        return self.score(pooled).float()
