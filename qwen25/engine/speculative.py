"""Speculative decoding for greedy requests: what to draft and how (proposers and their settings).

Each step the runner asks a sequence's proposer for up to k guesses of its next tokens; the target model
computes [last token, draft_1..k] in the same pass as the other rows and the runner keeps the drafts while
they equal its own greedy choices, plus its choice after the last accepted one: 1..k+1 tokens per pass, and
exactly the target's greedy output, since every emitted token is an argmax of target logits over exactly
the tokens before it. Rejected drafts' keys/values lie beyond the sequence's computed tokens and are
overwritten later. Speculation applies to greedy requests (`speculation_applies`); other requests in
the same engine run as usual.

Proposers:
- `NgramProposer` (prompt lookup): find the latest earlier occurrence of the sequence's last n tokens
  (n = max..min) and propose what followed it. Free; pays off when the output copies the input (code edits,
  quoting, extraction, summaries with names).
- `DraftModelProposer`: a small model of the same vocabulary (Qwen2.5-0.5B drafting for 1.5B+) decodes k greedy
  tokens on its own contiguous cache, which is cut back to the agreed prefix each round.
"""


from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Protocol

import torch

from qwen25.engine.kv_cache import ContiguousKVCache, activation_dtype
from qwen25.engine.sampler import greedy_token
from qwen25.model.qwen2 import Qwen2ForCausalLM
from qwen25.sampling_params import SamplingParams


METHODS = ("ngram", "draft_model")


@dataclass(frozen=True)
class SpeculativeConfig:
    """How the engine speculates (vLLM's `speculative_config` keys): method "ngram" (prompt lookup) or "draft_model"
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

    def __init__(self, model: Qwen2ForCausalLM, capacity: int = 4096, native: Any = None) -> None:
        """native: the draft model's `NativeForward` (None: its PyTorch modules run)."""
        self.model = model
        self.native = native
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
                ids = torch.tensor([fed])
                view = cache.native_view() if self.native is not None else None
                logits = (self.native.forward_cache(ids, cache, view, 1) if view is not None else
                          self.model(ids, cache=cache, logits_to_keep=1))
                drafts.append(greedy_token(logits[0, -1]))
                fed = drafts[-1:]
        self._cached = tokens + drafts[:-1]
        return drafts


@dataclass
class SpeculativeStats:
    """Counters of speculative steps: target passes of a speculating sequence, tokens drafted / accepted /
    emitted by those passes."""

    target_passes: int = 0
    drafted: int = 0
    accepted: int = 0
    emitted: int = 0

    def record(self, drafted: int, emitted: int) -> None:
        """One pass of one sequence: `drafted` drafts went in, `emitted` tokens came out (accepted + 1)."""
        self.target_passes += 1
        self.drafted += drafted
        self.accepted += max(emitted - 1, 0)
        self.emitted += emitted

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_pass(self) -> float:
        return self.emitted / self.target_passes if self.target_passes else 0.0


def speculation_applies(params: SamplingParams) -> bool:
    """Speculation reproduces greedy decoding (penalties included: the runner applies them per draft position):
    no sampling, logits processors (grammars, logit_bias: stateful) or logprobs."""
    return params.is_greedy and params.logprobs is None and not params.logits_processors


def make_proposer(spec: SpeculativeConfig, draft_model: Qwen2ForCausalLM | None = None,
                  draft_native: Any = None) -> Proposer:
    """A fresh proposer for one sequence."""
    if spec.method == "draft_model":
        if draft_model is None:
            raise ValueError("speculative method 'draft_model' needs the loaded draft model")
        return DraftModelProposer(draft_model, native=draft_native)
    return NgramProposer(spec.prompt_lookup_max, spec.prompt_lookup_min)


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i
