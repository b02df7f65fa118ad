"""`Sequence`: one request as the scheduler sees it: its tokens, how many of them have KV in the cache, its blocks.

Pure Python (no torch), so the scheduler and block manager are testable without a model. A sequence advances
by "computing" tokens (writing their KV): a prefill computes the prompt (possibly in chunks), a decode computes
the last sampled token. Whenever every token is computed, the model's logits for the last one give the next
token. Recompute-preemption just resets `num_computed_tokens`; prompt and outputs are kept. A decode may carry
speculative `draft_ids`: they are computed with the last token in one step and only the accepted ones join
`token_ids`.
"""

from __future__ import annotations

from enum import Enum, auto
from itertools import count

from qwen25.sampling_params import SamplingParams


class SequenceStatus(Enum):
    WAITING = auto()
    RUNNING = auto()
    FINISHED = auto()


_ids = count()


class Sequence:
    def __init__(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                 stop_token_ids: frozenset[int] = frozenset(), max_tokens: int = 256, index: int = 0) -> None:
        if not prompt_token_ids:
            raise ValueError("empty prompt: nothing to condition on")
        self.seq_id = next(_ids)
        self.request_id = request_id
        self.index = index  # which of the request's n samples this is
        self.token_ids = list(prompt_token_ids)  # prompt + outputs
        self.num_prompt_tokens = len(prompt_token_ids)
        self.params = params
        self.stop_token_ids = stop_token_ids
        self.max_tokens = max_tokens
        self.status = SequenceStatus.WAITING
        self.num_computed_tokens = 0  # tokens whose KV is in the cache
        self.block_table: list[int] = []
        self.block_hashes: list[int] = []  # chained content hashes of the leading full blocks (prefix caching)
        self.num_registered_blocks = 0  # leading blocks already offered to the prefix cache
        self.finish_reason: str | None = None
        self.num_cached_tokens = 0  # prompt tokens served from the prefix cache at the last admission
        self.num_preemptions = 0
        # Speculative drafts for the next step: computed after the last token, verified by the runner, never
        # part of token_ids until accepted.
        self.draft_ids: list[int] = []

    def __repr__(self) -> str:
        return (f"Sequence({self.request_id!r}, tokens={self.num_tokens}, computed={self.num_computed_tokens}, "
                f"blocks={self.block_table}, {self.status.name})")

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[: self.num_prompt_tokens]

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def is_prefill(self) -> bool:
        """More than one token to compute (a prompt, or a re-prefill after preemption)."""
        return self.num_uncomputed_tokens > 1

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def tokens_to_compute(self, n: int) -> list[int]:
        """The next n tokens whose keys/values are not cached yet: uncomputed tokens, then the drafts."""
        start = self.num_computed_tokens
        tokens = self.token_ids[start:start + n]
        return tokens + self.draft_ids[:n - len(tokens)] if len(tokens) < n else tokens

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)
