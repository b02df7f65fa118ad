"""The test oracle for generation: lock-step batch generation over a contiguous KV cache (the simple loop).

Prompts of different lengths are left-padded into one batch (explicit positions + key mask), prefilled in one
forward pass, then decoded one token per step; finished rows are dropped from the batch. Token ids in, token
ids out: text (detokenizing, stop strings) is the caller's job, which calls `finish()` when a stop string hits.
Only tests use it: `LLMEngine` is the one generation engine; this loop is what its outputs are checked against.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from qwen25.engine.kv_cache import ContiguousKVCache
from qwen25.engine.sampler import sample_next, top_logprobs
from qwen25.model.qwen2 import Qwen2ForCausalLM
from qwen25.sampling_params import SamplingParams


@dataclass
class Sequence:
    """One generation: prompt, settings, and what has been produced so far."""

    prompt_ids: list[int]
    params: SamplingParams
    stop_ids: frozenset[int]
    max_new_tokens: int
    output_ids: list[int] = field(default_factory=list)
    logprobs: list[tuple[float, list[tuple[int, float]]]] = field(default_factory=list)
    finish_reason: str | None = None

    @property
    def is_finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(frozen=True, slots=True)
class TokenEvent:
    """Sequence `index` produced `token_id` (None when it finished on a stop token or was finished)."""

    index: int
    token_id: int | None
    finish_reason: str | None


class BatchGenerator:
    """Generate for several sequences at once. Iterate to get `TokenEvent`s in step order."""

    def __init__(self, model: Qwen2ForCausalLM, sequences: list[Sequence]) -> None:
        if not sequences:
            raise ValueError("no sequences to generate")
        self.model = model
        self.sequences = sequences
        self._generators = [self._make_generator(s.params.seed) for s in sequences]
        self._prompt_tensors = [torch.tensor(s.prompt_ids, dtype=torch.long) for s in sequences]
        self._active = [i for i, s in enumerate(sequences) if not s.is_finished]

    @staticmethod
    def _make_generator(seed: int | None) -> torch.Generator:
        g = torch.Generator()
        g.manual_seed(seed if seed is not None else int(torch.randint(0, 2**62, (1,))))
        return g

    def finish(self, index: int, reason: str) -> None:
        """Stop sequence `index` (e.g. a stop string matched); it leaves the batch at the next step."""
        if not self.sequences[index].is_finished:
            self.sequences[index].finish_reason = reason

    def __iter__(self) -> Iterator[TokenEvent]:
        dtype = next(self.model.parameters()).dtype
        rows = self._active
        lengths = [len(self.sequences[i].prompt_ids) for i in rows]
        width = max(lengths)
        capacity = width + max(self.sequences[i].max_new_tokens for i in rows)
        cache = ContiguousKVCache(self.model.config, len(rows), capacity, dtype=dtype)
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.bool)
        for r, (i, n) in enumerate(zip(rows, lengths)):
            ids[r, width - n:] = self._prompt_tensors[i]
            mask[r, width - n:] = True
        positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
        logits = self._forward(ids, positions, cache, mask)
        next_pos = positions[:, -1] + 1
        while rows:
            tokens: list[int] = []
            for r, i in enumerate(rows):
                event = self._advance(i, logits[r])
                tokens.append(event.token_id if event.token_id is not None else 0)
                yield event
            keep = [r for r, i in enumerate(rows) if not self.sequences[i].is_finished]
            if not keep:
                return
            if len(keep) < len(rows):
                index = torch.tensor(keep)
                cache.select(index)
                next_pos = next_pos[index]
                rows = [rows[r] for r in keep]
                tokens = [tokens[r] for r in keep]
            step_ids = torch.tensor(tokens, dtype=torch.long).unsqueeze(1)
            logits = self._forward(step_ids, next_pos.unsqueeze(1), cache, None)
            next_pos = next_pos + 1

    # inference_mode per call, not around the loop: a generator must not leave it on while suspended.
    @torch.inference_mode()
    def _forward(self, ids: torch.Tensor, positions: torch.Tensor, cache: ContiguousKVCache,
                 mask: torch.Tensor | None) -> torch.Tensor:
        return self.model(ids, positions=positions, cache=cache, padding_mask=mask, logits_to_keep=1)[:, -1]

    def _advance(self, index: int, logits: torch.Tensor) -> TokenEvent:
        seq = self.sequences[index]
        if seq.is_finished:  # finished from outside (stop string) since the last step
            return TokenEvent(index, None, seq.finish_reason)
        output = torch.tensor(seq.output_ids, dtype=torch.long)
        token = sample_next(logits, seq.params, self._prompt_tensors[index], output, self._generators[index])
        if token in seq.stop_ids:
            seq.finish_reason = "stop"
            return TokenEvent(index, None, "stop")
        seq.output_ids.append(token)
        if seq.params.logprobs is not None:
            seq.logprobs.append(top_logprobs(logits, token, seq.params.logprobs))
        if len(seq.output_ids) >= seq.max_new_tokens:
            seq.finish_reason = "length"
        return TokenEvent(index, token, seq.finish_reason)
