"""Speculative decoding for greedy generation: cheap drafts, verified by the target model in one forward pass.

Each round a proposer guesses up to k next tokens; the target model runs once over [last token, draft_1..k]
and yields its own greedy choice at every one of those positions. The drafts are accepted while they equal
the target's choices, and the target's choice after the last accepted draft comes for free, so a round emits
1..k+1 tokens for one target pass. Rejected positions are dropped from the KV cache by moving its length back.
The output is the target's greedy output by construction: every emitted token is an argmax of target logits
over exactly the tokens before it.

Proposers:
- `NgramProposer` (prompt lookup): find the latest earlier occurrence of the sequence's last n tokens
  (n = max..min) and propose what followed it. Free; pays off when the output copies the input (code edits,
  quoting, extraction, summaries with names).
- `DraftModelProposer`: a small model of the same vocabulary (Qwen2.5-0.5B drafting for 1.5B+) decodes k greedy
  tokens on its own contiguous cache, which is cut back to the agreed prefix each round.

Greedy only, one sequence at a time (the continuous-batching engine serves everything else); `LLM` uses this
path when it was built with a `speculative_config` and a request is plain greedy.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from typing import Any, Protocol

import torch

from qwen25.engine.engine import activation_dtype
from qwen25.engine.generator import TokenEvent
from qwen25.engine.kv_cache import ContiguousKVCache
from qwen25.model.qwen2 import Qwen2ForCausalLM


METHODS = ("ngram", "draft_model")


@dataclass(frozen=True)
class SpeculativeConfig:
    """How `LLM` speculates (vLLM's `speculative_config` keys): method "ngram" (prompt lookup) or "draft_model"
    (`model` = a draft checkpoint sharing the target's tokenizer)."""

    method: str = "ngram"
    num_speculative_tokens: int = 4
    prompt_lookup_max: int = 3
    prompt_lookup_min: int = 1
    model: str | None = None

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"speculative method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.method == "draft_model" and not self.model:
            raise ValueError("speculative method 'draft_model' needs 'model' (the draft checkpoint)")
        if not 1 <= self.num_speculative_tokens <= 16:
            raise ValueError(f"num_speculative_tokens must be in [1, 16], got {self.num_speculative_tokens}")
        NgramProposer(self.prompt_lookup_max, self.prompt_lookup_min)  # validates the lookup range

    @classmethod
    def from_dict(cls, settings: dict[str, Any]) -> SpeculativeConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(settings) - known)
        if unknown:
            raise ValueError(f"unknown speculative_config keys {unknown}; known: {sorted(known)}")
        method = settings.get("method") or ("draft_model" if settings.get("model") else "ngram")
        return cls(**{**settings, "method": method})


class Proposer(Protocol):
    def propose(self, tokens: list[int], k: int) -> list[int]:
        """Up to k guesses for the tokens that follow `tokens` (the prompt and the output so far)."""
        ...


def ngram_lookup(tokens: list[int], k: int, max_n: int = 3, min_n: int = 1) -> list[int]:
    """Prompt-lookup drafting: the up-to-k tokens that followed the latest earlier occurrence of the last n
    tokens, trying n = max_n down to min_n; [] when nothing matches."""
    size = len(tokens)
    for n in range(min(max_n, size - 1), min_n - 1, -1):
        tail = tokens[size - n:]
        for start in range(size - n - 1, -1, -1):  # latest occurrence first; it must be followed by something
            if tokens[start:start + n] == tail:
                return tokens[start + n:start + n + k]
    return []


@dataclass
class NgramProposer:
    max_n: int = 3
    min_n: int = 1

    def __post_init__(self) -> None:
        if not 1 <= self.min_n <= self.max_n:
            raise ValueError(f"need 1 <= prompt_lookup_min <= prompt_lookup_max, got {self.min_n}, {self.max_n}")

    def propose(self, tokens: list[int], k: int) -> list[int]:
        return ngram_lookup(tokens, k, self.max_n, self.min_n)


class DraftModelProposer:
    """Greedy drafts from a small model. Its cache holds a prefix of the sequence; each round it is cut back
    to the longest prefix it shares with the current tokens, the missing tokens are fed in one pass, and k
    tokens are decoded one at a time."""

    def __init__(self, model: Qwen2ForCausalLM, capacity: int = 4096) -> None:
        self.model = model
        self.capacity = capacity
        self._cache: ContiguousKVCache | None = None
        self._cached: list[int] = []  # the tokens whose keys/values are in the cache

    def reset(self, capacity: int) -> None:
        """Start a new sequence whose prompt + output + drafts fit in `capacity` tokens."""
        dtype = activation_dtype(self.model)
        self._cache = ContiguousKVCache(self.model.config, 1, capacity, dtype=dtype)
        self._cached = []

    def propose(self, tokens: list[int], k: int) -> list[int]:
        if k <= 0:
            return []
        if self._cache is None or self._cache.max_length < len(tokens) + k:
            self.reset(max(self.capacity, len(tokens) + k + 1))
        cache = self._cache
        assert cache is not None
        keep = _common_prefix(self._cached, tokens)
        keep = min(keep, len(tokens) - 1)  # re-feed at least one token to get the next logits
        cache.truncate(keep)
        fed = tokens[keep:]
        drafts: list[int] = []
        with torch.inference_mode():
            for _ in range(k):
                logits = self.model(torch.tensor([fed]), cache=cache, logits_to_keep=1)
                drafts.append(int(logits[0, -1].argmax()))
                fed = drafts[-1:]
        self._cached = tokens + drafts[:-1]
        return drafts


@dataclass
class SpeculativeStats:
    """Counters over a generation: target passes, tokens drafted / accepted / emitted."""

    target_passes: int = 0
    drafted: int = 0
    accepted: int = 0
    emitted: int = 0
    accepted_per_pass: list[int] = field(default_factory=list)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_pass(self) -> float:
        return self.emitted / self.target_passes if self.target_passes else 0.0


def speculative_greedy(target: Qwen2ForCausalLM, prompt_ids: list[int], max_new_tokens: int,
                       stop_ids: frozenset[int], proposer: Proposer, num_speculative_tokens: int,
                       stats: SpeculativeStats | None = None) -> Iterator[TokenEvent]:
    """Greedy generation of `target` for one prompt, drafting with `proposer`. Yields a TokenEvent per emitted
    token (index 0) and a last one with token_id None when a stop token ends it ("stop"); after the token that
    reaches max_new_tokens, the event carries "length". Close the iterator to stop early."""
    if not prompt_ids:
        raise ValueError("empty prompt: nothing to condition on")
    if num_speculative_tokens < 0:
        raise ValueError(f"num_speculative_tokens must be >= 0, got {num_speculative_tokens}")
    stats = stats if stats is not None else SpeculativeStats()
    k = num_speculative_tokens
    cache = ContiguousKVCache(target.config, 1, len(prompt_ids) + max_new_tokens + k + 1,
                              dtype=activation_dtype(target))
    tokens = list(prompt_ids)
    produced = 0
    with torch.inference_mode():
        logits = target(torch.tensor([prompt_ids]), cache=cache, logits_to_keep=1)
    stats.target_passes += 1
    candidates = [int(logits[0, -1].argmax())]  # target-greedy tokens not yet emitted, in order
    while True:
        for token in candidates:
            if token in stop_ids:
                yield TokenEvent(0, None, "stop")
                return
            tokens.append(token)
            produced += 1
            stats.emitted += 1
            if produced >= max_new_tokens:
                yield TokenEvent(0, token, "length")
                return
            yield TokenEvent(0, token, None)
        # `tokens[-1]` is emitted but not in the cache yet; draft what follows it and verify in one pass.
        budget = min(k, max_new_tokens - produced)
        drafts = proposer.propose(tokens, budget)[:budget] if budget > 0 else []
        fed = [tokens[-1], *drafts]
        with torch.inference_mode():
            logits = target(torch.tensor([fed]), cache=cache, logits_to_keep=len(fed))
        greedy = logits[0].argmax(dim=-1).tolist()
        accepted = 0
        while accepted < len(drafts) and drafts[accepted] == greedy[accepted]:
            accepted += 1
        cache.truncate(cache.length - (len(drafts) - accepted))  # keep tokens[-1] and the accepted drafts
        stats.target_passes += 1
        stats.drafted += len(drafts)
        stats.accepted += accepted
        stats.accepted_per_pass.append(accepted)
        candidates = [*drafts[:accepted], greedy[accepted]]


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i
