"""`ModelRunner`: the only engine part that builds tensors. Runs the model on a scheduled batch and samples.

A step's rows are split into a few forward passes of similar new-token counts (decodes together, prefill chunks
together) so that a 1-token decode is not left-padded to a 512-token chunk: each extra pass costs one more
read of the weights, padding costs compute per padded token, and a tiny DP over the sorted counts picks the
cheaper split. A q8 or q4 model runs the whole step as one unpadded pass of the fused native forward
(`qwen25.kernels.native`), which reads and writes the paged cache in place. Each row samples with `sample_next` and
its own `torch.Generator` (seeded from params.seed), only when all its tokens are computed (a prefill chunk that
is not the last samples nothing).
"""

from __future__ import annotations

from typing import Any

import torch

from qwen25.engine.paged_cache import PagedKVCache, PagedStep
from qwen25.engine.sampler import sample_next, top_logprobs
from qwen25.engine.scheduler import ScheduledBatch
from qwen25.engine.sequence import Sequence
from qwen25.kernels.native import KVView
from qwen25.model.qwen2 import Qwen2ForCausalLM

Logprob = tuple[float, list[tuple[int, float]]]


def split_by_length(counts: list[int], pass_cost: int) -> list[list[int]]:
    """Partition row indices into forward passes minimising sum(pass_cost + rows * max new tokens)."""
    order = sorted(range(len(counts)), key=counts.__getitem__)
    best = [0] + [1 << 62] * len(order)  # best[i]: cost of the i shortest rows
    cut = [0] * (len(order) + 1)
    for i in range(1, len(order) + 1):
        for j in range(i):
            cost = best[j] + pass_cost + (i - j) * counts[order[i - 1]]
            if cost < best[i]:
                best[i], cut[i] = cost, j
    groups, i = [], len(order)
    while i:
        groups.append(order[cut[i]:i])
        i = cut[i]
    return groups[::-1]


class ModelRunner:
    def __init__(self, model: Qwen2ForCausalLM, num_blocks: int, block_size: int,
                 dtype: torch.dtype = torch.float32, pass_cost: int = 16) -> None:
        self.model = model
        self.block_size = block_size
        self.cache = PagedKVCache(model.config, num_blocks, block_size, dtype)
        self.pass_cost = pass_cost  # one forward pass ~ this many padded tokens of compute
        self._generators: dict[int, torch.Generator] = {}
        self._prompts: dict[int, torch.Tensor] = {}

    def release(self, seq: Sequence) -> None:
        """Forget a finished sequence's sampling state."""
        self._generators.pop(seq.seq_id, None)
        self._prompts.pop(seq.seq_id, None)

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch) -> tuple[list[int | None], list[Logprob | None]]:
        """Compute every row's new tokens; return the sampled token (None if the row is mid-prefill) and its
        logprobs (if requested) per row."""
        tokens: list[int | None] = [None] * len(batch)
        logprobs: list[Logprob | None] = [None] * len(batch)
        counts = batch.num_new_tokens
        if self._native() is not None:  # rows are not padded natively: one pass for everything
            passes = [list(range(len(batch)))]
        else:
            passes = split_by_length(counts, self.pass_cost)
        for rows in passes:
            seqs = [batch.seqs[i] for i in rows]
            counts = [batch.num_new_tokens[i] for i in rows]
            logits = self.forward(seqs, counts)
            for r, (i, seq, n) in enumerate(zip(rows, seqs, counts)):
                if seq.num_computed_tokens + n == seq.num_tokens:
                    tokens[i] = token = self._sample(seq, logits[r])
                    if seq.params.logprobs is not None:
                        logprobs[i] = top_logprobs(logits[r], token, seq.params.logprobs)
        return tokens, logprobs

    def forward(self, seqs: list[Sequence], counts: list[int]) -> torch.Tensor:
        """Last-position logits (B, V) after computing counts[r] new tokens of each seqs[r]."""
        native = self._native()
        if native is not None:
            return self._forward_native(native, seqs, counts)
        B, T, bs = len(seqs), max(counts), self.block_size
        starts = [s.num_computed_tokens for s in seqs]
        P = max(starts)
        ids = [[0] * (T - n) + s.token_ids[st:st + n] for s, st, n in zip(seqs, starts, counts)]
        pos = [[0] * (T - n) + list(range(st, st + n)) for st, n in zip(starts, counts)]
        padded = any(n != T for n in counts)
        new_mask = torch.tensor([[False] * (T - n) + [True] * n for n in counts]) if padded else None

        # Token index of every key column: context right-aligned in [0, P), new tokens left-padded in [P, P+T).
        col = torch.arange(P + T).unsqueeze(0)
        st = torch.tensor(starts).unsqueeze(1)
        n = torch.tensor(counts).unsqueeze(1)
        is_past = col < P
        tok = torch.where(is_past, col - (P - st), col - (P + T - n) + st)  # (B, P+T)
        valid = torch.where(is_past, tok >= 0, tok >= st)
        width = max(len(s.block_table) for s in seqs)
        tables = torch.tensor([s.block_table + [0] * (width - len(s.block_table)) for s in seqs])
        # Masked columns read the row's token 0: already in the cache, or written by this very step before
        # the gather (update scatters first), so never uninitialized memory.
        tok = tok.clamp(min=0) * valid
        slots = tables.gather(1, tok // bs) * bs + tok % bs
        new_slots = slots[:, P:].reshape(-1)
        write_rows = new_mask.view(-1).nonzero().squeeze(1) if padded else None
        write_slots = new_slots.index_select(0, write_rows) if padded else new_slots
        key_mask = None if bool(valid.all()) else valid

        step = PagedStep(self.cache, P, write_rows, write_slots, slots, key_mask)
        logits = self.model(torch.tensor(ids), positions=torch.tensor(pos), cache=step, padding_mask=new_mask,
                            logits_to_keep=1)
        return logits[:, -1]

    def _native(self) -> Any:
        """The model's native forward if it can use this runner's cache (fp32), else None."""
        return self.model.native if self.cache.keys.dtype == torch.float32 else None

    def _forward_native(self, native: Any, seqs: list[Sequence], counts: list[int]) -> torch.Tensor:
        """The same pass through the fused native forward: rows (token, position, sequence) with no padding,
        keys/values read and written in place through the block tables."""
        tokens: list[int] = []
        positions: list[int] = []
        seq_of_row: list[int] = []
        out_rows: list[int] = []
        for r, (seq, n) in enumerate(zip(seqs, counts)):
            start = seq.num_computed_tokens
            tokens += seq.token_ids[start:start + n]
            positions += range(start, start + n)
            seq_of_row += [r] * n
            out_rows.append(len(tokens) - 1)
        width = max(len(s.block_table) for s in seqs)
        tables = torch.tensor([s.block_table + [0] * (width - len(s.block_table)) for s in seqs], dtype=torch.int32)
        view = KVView(self.cache.keys, self.cache.values, tables)
        i32 = torch.int32
        return native(torch.tensor(tokens), torch.tensor(positions, dtype=i32), torch.tensor(seq_of_row, dtype=i32),
                      view, torch.tensor(out_rows, dtype=i32))

    def _sample(self, seq: Sequence, logits: torch.Tensor) -> int:
        g = self._generators.get(seq.seq_id)
        if g is None:
            g = self._generators[seq.seq_id] = torch.Generator()
            seed = seq.params.seed
            g.manual_seed(seed if seed is not None else int(torch.randint(0, 2**62, (1,))))
            self._prompts[seq.seq_id] = torch.tensor(seq.prompt_token_ids, dtype=torch.long)
        # Per-request hooks (grammars, logit_bias): f(output ids, logits) -> logits, on the raw logits.
        for processor in seq.params.logits_processors:
            logits = processor(seq.output_token_ids, logits)
        output = torch.tensor(seq.output_token_ids, dtype=torch.long)
        return sample_next(logits, seq.params, self._prompts[seq.seq_id], output, g)
