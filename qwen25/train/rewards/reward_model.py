"""Reward-model reward: a trained scalar reward model (`qwen25 train rm`) scores each prompt + completion.

The text is encoded the way the reward model was trained (`qwen25.train.pairs`): when the example has
`messages` (the prompt as OpenAI messages) the conversation plus the completion as the assistant turn is
rendered with the reward model's chat template; otherwise the prompt text and the completion are tokenized as
they are (the end-of-sequence token appended). The score is the head's output at the last token, unnormalised.
Scoring happens on text, so the policy's token ids never reach the reward model; still, a reward model with a
different tokenizer than the policy was almost certainly trained on another model family's outputs, so giving
`policy_tokenizer` makes a mismatch a ValueError at construction (`allow_other_tokenizer=True` accepts it).
Sequences longer than `max_length` keep their end (the reply) and lose the start of the prompt.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from qwen25.model.sequence_classification import Qwen2ForSequenceClassification
from qwen25.train.pairs import encode_pair_record

__all__ = ["RewardModelReward", "same_tokenizer"]

_PROBES = ("Hello, world!", "def f(x):\n    return x * 2", "<|im_start|>user\n数学 12345<|im_end|>")


def same_tokenizer(a: Any, b: Any) -> bool:
    """Whether two tokenizers have the same vocabulary size and encode a few probe strings alike."""
    return len(a) == len(b) and all(a.encode(t) == b.encode(t) for t in _PROBES)


class RewardModelReward:
    """A reward model as a `Reward` (see the module docstring)."""

    def __init__(self, model: Qwen2ForSequenceClassification, tokenizer: Any, chat_template: str | None = None, *,
                 name: str = "rm", batch_size: int = 8, max_length: int = 4096, policy_tokenizer: Any = None,
                 allow_other_tokenizer: bool = False) -> None:
        if policy_tokenizer is not None and not allow_other_tokenizer and not same_tokenizer(tokenizer,
                                                                                              policy_tokenizer):
            raise ValueError(f"reward model {name!r} uses another tokenizer than the policy (vocabulary "
                             f"{len(tokenizer)} vs {len(policy_tokenizer)}, or different encodings): it was trained "
                             "on another model family; pass allow_other_tokenizer=True to use it anyway")
        self.model, self.tokenizer = model.eval(), tokenizer
        self.template = chat_template if chat_template is not None else getattr(tokenizer, "chat_template", None)
        self.name, self.batch_size, self.max_length = name, batch_size, max_length
        if model.pad_token_id is None:  # a transformers save without one: the tokenizer's (batches need it)
            pad = tokenizer.pad_token_id
            model.pad_token_id = pad if pad is not None else tokenizer.eos_token_id
        self.pad_id = model.pad_token_id

    @classmethod
    def load(cls, path: str | Path, **kwargs: Any) -> RewardModelReward:
        """From a reward-model directory (`qwen25 train rm` output or a transformers
        Qwen2ForSequenceClassification save)."""
        from qwen25.checkpoint import load_tokenizer
        from qwen25.train.reward_model import load_reward_model

        path = Path(path).expanduser()
        return cls(load_reward_model(path), load_tokenizer(path), **kwargs)

    def encode(self, prompt: str, completion: str, example: dict) -> list[int]:
        source = example.get("messages") or prompt
        pair = encode_pair_record({"prompt": source, "chosen": completion, "rejected": completion}, self.tokenizer,
                                  self.template, f"reward {self.name}")
        return (pair.prompt + pair.chosen)[-self.max_length:]

    @torch.no_grad()
    def __call__(self, prompts: list[str], completions: list[str], examples: list[dict]) -> list[float]:
        encoded = [self.encode(p, c, e) for p, c, e in zip(prompts, completions, examples, strict=True)]
        device = next(self.model.parameters()).device
        scores = [0.0] * len(encoded)
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
        for start in range(0, len(order), self.batch_size):
            ids = order[start:start + self.batch_size]
            width = max(len(encoded[i]) for i in ids)
            batch = torch.full((len(ids), width), self.pad_id, dtype=torch.long)
            for row, i in enumerate(ids):
                batch[row, :len(encoded[i])] = torch.tensor(encoded[i])
            values = self.model(batch.to(device))[:, 0].tolist()
            for i, v in zip(ids, values, strict=True):
                scores[i] = float(v)
        return scores
