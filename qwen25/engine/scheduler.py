"""`Scheduler`: decides which sequences compute how many tokens each step (continuous batching).

Pure Python. Every step: each running decode computes its one token (so a long prompt never stalls them), running
prefills continue in chunks, and waiting requests are admitted (first come, first served) while there is room
in `max_num_seqs`, the `max_num_batched_tokens` budget and the KV cache; a prompt longer than the remaining
budget is prefilled in chunks over several steps. When a decode needs a block and none is free, the most
recently admitted sequence is preempted by recompute: its blocks are released and it returns to the front of
the waiting queue with its prompt and outputs, to be prefilled again (prefix caching often still has them).

Fairness: while a prompt waits that could start, running prefills leave room in the step's budget for it (at
most half the budget), so one huge prompt being prefilled does not hold back every request behind it. A long
prompt (over `long_prefill_tokens`, by default 8 steps' budget: 4,096 tokens) yields to the others: while any other sequence
decodes or a shorter prompt waits, its prefill pauses (and it is not started), so their tokens do not wait for
its multi-second chunks; to bound the wait, after `long_prefill_pause` paused steps in a row it runs one chunk.
Its chunks are small (`long_prefill_chunk` tokens, default 1/16 of the budget: 32, fewer as it gets deeper: at
most `long_prefill_pairs` query-key pairs of attention, default long_prefill_chunk * long_prefill_tokens / 2 =
65,536), so a request arriving mid-step waits for a short step, not for a 512-token slice of a 32K-token prompt.
On the 0.5B with 2 threads (AMD EPYC, q8 native forward) such a step took 0.17-0.25 s at depths 4K-16K, where
4x the pairs took 0.53-0.74 s and an 8-token request waited 2.7x its idle latency behind them; the price is more,
smaller steps for a long prompt running alone (each carries one pass over the weights).
`blocked_on` says why the head of the queue did not start ("kv_cache" or "max_num_seqs", None if it did or
nothing waits), the queue state the server reports in /health.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from qwen25.engine.block_manager import BlockManager
from qwen25.engine.sequence import Sequence, SequenceStatus


@dataclass
class ScheduledBatch:
    """What the runner computes this step: seqs[i] computes its next num_new_tokens[i] tokens."""

    seqs: list[Sequence] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)

    def add(self, seq: Sequence, n: int) -> None:
        self.seqs.append(seq)
        self.num_new_tokens.append(n)

    def __len__(self) -> int:
        return len(self.seqs)

    @property
    def num_batched_tokens(self) -> int:
        return sum(self.num_new_tokens)


class Scheduler:
    def __init__(self, max_num_seqs: int, max_num_batched_tokens: int, block_manager: BlockManager,
                 long_prefill_tokens: int | None = None, long_prefill_pause: int = 64,
                 long_prefill_chunk: int | None = None, long_prefill_pairs: int | None = None) -> None:
        if max_num_seqs < 1 or max_num_batched_tokens < max_num_seqs:
            raise ValueError(f"need 1 <= max_num_seqs <= max_num_batched_tokens (every running decode computes a "
                             f"token each step), got {max_num_seqs} and {max_num_batched_tokens}")
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.block_manager = block_manager
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order: the tail is preempted first
        self.num_preemptions = 0
        self.blocked_on: str | None = None  # why the last schedule() left the queue's head waiting
        self.long_prefill_tokens = long_prefill_tokens or 8 * max_num_batched_tokens
        self.long_prefill_pause = long_prefill_pause
        self.long_prefill_chunk = long_prefill_chunk or max(1, max_num_batched_tokens // 16)
        self.long_prefill_pairs = long_prefill_pairs or self.long_prefill_chunk * self.long_prefill_tokens // 2
        self.long_prefill_paused = 0  # steps in a row that paused a long prefill
        self._free_when_blocked = 0  # free KV blocks when the head last did not fit

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        bm = self.block_manager
        batch = ScheduledBatch()
        budget = self.max_num_batched_tokens
        preempted = False
        for seq in list(self.running):  # decodes first, each with its speculative drafts if it has any
            if seq.status is not SequenceStatus.RUNNING or seq.is_prefill:
                continue
            while not bm.can_append(seq):
                victim = next(s for s in reversed(self.running) if s not in batch.seqs)
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    break
            if seq.status is SequenceStatus.RUNNING:
                # Drafts only ride along while the token budget and free blocks allow (never preempt for them).
                drafts = seq.draft_ids[:max(0, budget - 1 - (len(self.running) - len(batch.seqs) - 1))]
                while drafts and not bm.can_append(seq, len(drafts)):
                    drafts.pop()
                seq.draft_ids = drafts
                bm.may_append(seq, len(drafts))
                batch.add(seq, 1 + len(drafts))
                budget -= 1 + len(drafts)
        yield_long = self.long_prefill_paused < self.long_prefill_pause and (
            len(batch) > 0 or any(not self._is_long(s) for s in self.waiting))
        paused = False
        reserve = 0  # for the queue's head, if it may start this step (not while the KV cache that held it back
        # last time has not grown)
        if (self.waiting and not preempted and len(self.running) < self.max_num_seqs
                and (self.blocked_on != "kv_cache" or bm.num_free_blocks > self._free_when_blocked)):
            reserve = min(budget // 2, self.waiting[0].num_uncomputed_tokens)
        for seq in self.running:  # then running prefills, chunked to the budget (their blocks are allocated)
            if budget <= reserve:
                break
            if seq.is_prefill:
                if yield_long and self._is_long(seq):
                    paused = True
                    continue
                n = min(seq.num_uncomputed_tokens, budget - reserve, self._chunk(seq))
                batch.add(seq, n)
                budget -= n
        if not self.waiting or (budget > 0 and not preempted):  # else the last answer stands (nothing was tried)
            self.blocked_on = None
        deferred: list[Sequence] = []  # long prompts passed over this step
        while self.waiting and not preempted and budget > 0:
            seq = self.waiting[0]
            if yield_long and self._is_long(seq):
                deferred.append(self.waiting.popleft())
                paused = True
                continue
            if len(self.running) >= self.max_num_seqs:
                self.blocked_on = "max_num_seqs"
                break
            if not bm.can_allocate(seq):
                self.blocked_on, self._free_when_blocked = "kv_cache", bm.num_free_blocks
                break
            self.waiting.popleft()
            bm.allocate(seq)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            n = min(seq.num_uncomputed_tokens, budget, self._chunk(seq))
            batch.add(seq, n)
            budget -= n
        self.waiting.extendleft(reversed(deferred))
        self.long_prefill_paused = self.long_prefill_paused + 1 if paused else 0
        return batch

    def _is_long(self, seq: Sequence) -> bool:
        return seq.num_tokens > self.long_prefill_tokens

    def _chunk(self, seq: Sequence) -> int:
        """The most prompt tokens `seq` may compute this step (no limit unless it is a long prompt)."""
        if not self._is_long(seq):
            return seq.num_uncomputed_tokens
        return max(1, min(self.long_prefill_chunk, self.long_prefill_pairs // max(seq.num_computed_tokens, 1)))

    def postprocess(self, batch: ScheduledBatch, sampled: list[list[int]]) -> list[tuple[Sequence, list[int]]]:
        """Advance the sequences after the runner computed `batch`. sampled[i] holds the tokens drawn for
        seqs[i] ([] for a prefill chunk that is not the last; the accepted drafts plus one token after a
        speculative step). Returns (seq, appended tokens) for each sequence that sampled; a stop token is not
        appended and finishes the sequence ("stop"); finished sequences release their blocks."""
        events: list[tuple[Sequence, list[int]]] = []
        for seq, n, tokens in zip(batch.seqs, batch.num_new_tokens, sampled):
            if seq.status is not SequenceStatus.RUNNING:
                continue
            seq.num_computed_tokens += n - len(seq.draft_ids)
            seq.draft_ids = []
            if seq.num_computed_tokens < seq.num_tokens:
                self.block_manager.cache_blocks(seq)
                continue
            assert tokens, f"{seq} finished computing but nothing was sampled"
            events.append((seq, self.append_tokens(seq, tokens)))
        return events

    def append_tokens(self, seq: Sequence, tokens: list[int]) -> list[int]:
        """Append sampled tokens (all but the last have their KV computed: accepted drafts) until a stop token
        or max_tokens finishes `seq`; returns the tokens appended."""
        appended: list[int] = []
        for token in tokens:
            if token in seq.stop_token_ids:
                self.finish(seq, "stop")
                break
            seq.append_token(token)
            appended.append(token)
            if seq.num_output_tokens >= seq.max_tokens:
                self.finish(seq, "length")
                break
        if not seq.is_finished:
            seq.num_computed_tokens += len(appended) - 1  # the accepted drafts' keys/values are in the cache
            self.block_manager.cache_blocks(seq)
        return appended

    def fork(self, parent: Sequence, child: Sequence) -> tuple[int, int] | None | bool:
        """Run `child` (another sample of parent's prompt) on the parent's computed prompt blocks. Returns the
        block copy to make (see BlockManager.fork), or False when there is no room: then the child waits in
        the queue as a request of its own (its full prompt blocks are in the prefix cache by now)."""
        if len(self.running) >= self.max_num_seqs or not self.block_manager.can_fork(parent):
            self.add(child)
            return False
        copy = self.block_manager.fork(parent, child)
        child.status = SequenceStatus.RUNNING
        self.running.append(child)
        return copy

    def finish(self, seq: Sequence, reason: str) -> None:
        """End `seq` (stop, length, abort) wherever it is and release its blocks."""
        if seq.is_finished:
            return
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
            self.block_manager.free(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason

    def abort(self, seq: Sequence) -> None:
        self.finish(seq, "abort")

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.draft_ids = []
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)
