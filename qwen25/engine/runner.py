"""`ModelRunner`: the only engine part that builds tensors. Runs the model on a scheduled batch and samples.

One dispatch site for the fast path: the runner builds the fused native forward (`qwen25.kernels.native`) for
the model when its weights allow it, and asks it before every pass whether it supports the pass (the model's
config, the attention kind, the KV cache's dtype); otherwise the PyTorch modules run. Natively a step is one
unpadded pass that reads and writes the paged cache in place. On the PyTorch path a step's rows are split into
a few passes of similar new-token counts (decodes together, prefill chunks together) so that a 1-token decode
is not left-padded to a 512-token chunk: each extra pass costs one more read of the weights, padding costs
compute per padded token, and a tiny DP over the sorted counts picks the cheaper split. When the model's
attention rotates keys itself (dynamic YaRN, Dual Chunk Attention: `needs_unrotated_keys`), the paged cache holds
keys before rotation and each pass hands the backend every key's position, so both are exact at any length.
With sparse prefill on (`qwen25.model.sparse_prefill`), the native forward runs it too (each sequence's run of
rows in a pass estimates its own pattern); where the kernel cannot take the model (head_dim not a multiple of
16), a step with a prefill chunk long enough to run sparse takes the PyTorch path and its decode steps stay native.

Sampling: each row samples with `sample_next` and its own `torch.Generator` (seeded from params.seed), only when
all its tokens are computed (a prefill chunk that is not the last samples nothing). A row with speculative
drafts (greedy requests, see `qwen25.engine.speculative`) gets logits at the last token and at every draft;
the drafts are accepted while they equal the (penalized) argmax, and the argmax after the last accepted one
comes too, so such a row yields 1..k+1 tokens for one pass, exactly what greedy decoding would have produced.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from qwen25.engine.kv_quant import key_smoothing
from qwen25.engine.paged_cache import PagedKVCache, PagedStep
from qwen25.engine.sampler import apply_penalties, greedy_token, sample_next, top_logprobs
from qwen25.engine.scheduler import ScheduledBatch
from qwen25.engine.sequence import Sequence
from qwen25.engine.speculative import Proposer, SpeculativeConfig, make_proposer, speculation_applies
from qwen25.kernels.native import KVView, NativeForward
from qwen25.model.long_context import needs_unrotated_keys
from qwen25.model.qwen2 import Qwen2ForCausalLM
from qwen25.model.sparse_prefill import sparse_prefill_applies, sparse_prefill_config

Logprob = tuple[float, list[tuple[int, float]]]
ATTENTION = "causal"  # the attention kind of the runner's passes (plain causal attention over the paged cache)


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
                 dtype: torch.dtype = torch.float32, pass_cost: int = 16, use_native: bool = True,
                 speculative: SpeculativeConfig | None = None, draft_model: Qwen2ForCausalLM | None = None) -> None:
        self.model = model
        self.block_size = block_size
        smoothing = key_smoothing(model) if dtype == torch.int8 else None
        self.cache = PagedKVCache(model.config, num_blocks, block_size, dtype, key_smoothing=smoothing)
        self.pass_cost = pass_cost  # one forward pass ~ this many padded tokens of compute
        self.native = NativeForward.for_model(model) if use_native else None
        self.speculative = speculative
        self.draft_model = draft_model
        self._draft_native = NativeForward.for_model(draft_model) if use_native and draft_model is not None else None
        self._generators: dict[int, torch.Generator] = {}
        self._prompts: dict[int, torch.Tensor] = {}
        self._proposers: dict[int, Proposer] = {}

    def release(self, seq: Sequence) -> None:
        """Forget a finished sequence's sampling and drafting state."""
        self._generators.pop(seq.seq_id, None)
        self._prompts.pop(seq.seq_id, None)
        self._proposers.pop(seq.seq_id, None)

    def native_for_pass(self) -> NativeForward | None:
        """The native forward if it supports this runner's passes, else None (the PyTorch path runs)."""
        native = self.native
        if native is not None and native.supports(self.model.config, ATTENTION, self.cache.keys.dtype):
            return native
        return None

    # --- speculation -------------------------------------------------------------------------------
    def propose(self, seqs: Iterable[Sequence]) -> None:
        """Set `draft_ids` of every decoding sequence that speculation applies to (plain greedy requests)."""
        spec = self.speculative
        if spec is None:
            return
        for seq in seqs:
            room = seq.max_tokens - seq.num_output_tokens - 1  # tokens a step may still emit, less the free one
            if seq.is_prefill or room <= 0 or not speculation_applies(seq.params):
                seq.draft_ids = []
                continue
            proposer = self._proposers.get(seq.seq_id)
            if proposer is None:
                proposer = self._proposers[seq.seq_id] = self.new_proposer()
            seq.draft_ids = proposer.propose(seq.token_ids, min(spec.num_speculative_tokens, room))

    def new_proposer(self) -> Proposer:
        """The drafting state of one sequence (tests replace this to script the drafts)."""
        assert self.speculative is not None
        return make_proposer(self.speculative, self.draft_model, self._draft_native)

    # --- steps -------------------------------------------------------------------------------------
    @torch.inference_mode()
    def run(self, batch: ScheduledBatch,
            keep_logits: frozenset[int] = frozenset()) -> tuple[list[list[int]], list[list[Logprob] | None],
                                                                 dict[int, torch.Tensor]]:
        """Compute every row's new tokens. Returns per row the sampled tokens ([] mid-prefill) and their
        logprobs (None unless requested), and the last logits (V,) of the sequences in `keep_logits` that
        sampled (for forked samples of the same prompt)."""
        tokens: list[list[int]] = [[] for _ in range(len(batch))]
        logprobs: list[list[Logprob] | None] = [None] * len(batch)
        kept: dict[int, torch.Tensor] = {}
        native = self.native_for_pass()
        if native is not None and not native.takes_sparse() and sparse_prefill_applies(
                self.model, batch.num_new_tokens,
                [s.num_computed_tokens + n for s, n in zip(batch.seqs, batch.num_new_tokens)]):
            native = None
        passes = [list(range(len(batch)))] if native is not None else split_by_length(batch.num_new_tokens,
                                                                                       self.pass_cost)
        for rows in passes:
            seqs = [batch.seqs[i] for i in rows]
            counts = [batch.num_new_tokens[i] for i in rows]
            keep = [1 + len(seq.draft_ids) for seq in seqs]
            logits = self.forward(seqs, counts, keep, native)
            for i, seq, n, row in zip(rows, seqs, counts, logits):
                if seq.num_computed_tokens + n < seq.num_tokens + len(seq.draft_ids):
                    continue  # a prefill chunk that is not the last
                if seq.draft_ids:
                    tokens[i] = self.verify_greedy(seq, row)
                    continue
                tokens[i] = [self.sample(seq, row[-1])]
                if seq.params.logprobs is not None:
                    logprobs[i] = [top_logprobs(row[-1], tokens[i][0], seq.params.logprobs)]
                if seq.seq_id in keep_logits:
                    kept[seq.seq_id] = row[-1]
        return tokens, logprobs, kept

    def forward(self, seqs: list[Sequence], counts: list[int], keep: list[int],
                native: NativeForward | None) -> list[torch.Tensor]:
        """Logits (keep[r], V) of the last keep[r] new positions of each seqs[r] after computing its counts[r]
        new tokens (its next tokens, then its drafts)."""
        if native is not None:
            return self._forward_native(native, seqs, counts, keep)
        B, T, bs = len(seqs), max(counts), self.block_size
        starts = [s.num_computed_tokens for s in seqs]
        P = max(starts)
        ids = [[0] * (T - n) + s.tokens_to_compute(n) for s, n in zip(seqs, counts)]
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
        key_positions = tok.clamp(min=0) if needs_unrotated_keys(self.model.config) else None
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

        step = PagedStep(self.cache, P, write_rows, write_slots, slots, key_mask, key_positions)
        width_kept = max(keep)
        logits = self.model(torch.tensor(ids), positions=torch.tensor(pos), cache=step, padding_mask=new_mask,
                            logits_to_keep=width_kept)
        return [logits[r, width_kept - k:] for r, k in enumerate(keep)]

    def _forward_native(self, native: NativeForward, seqs: list[Sequence], counts: list[int],
                        keep: list[int]) -> list[torch.Tensor]:
        """The same pass through the fused native forward: rows (token, position, sequence) with no padding,
        keys/values read and written in place through the block tables."""
        tokens: list[int] = []
        positions: list[int] = []
        seq_of_row: list[int] = []
        out_rows: list[int] = []
        for r, (seq, n, k) in enumerate(zip(seqs, counts, keep)):
            start = seq.num_computed_tokens
            tokens += seq.tokens_to_compute(n)
            positions += range(start, start + n)
            seq_of_row += [r] * n
            out_rows += range(len(tokens) - k, len(tokens))
        width = max(len(s.block_table) for s in seqs)
        tables = torch.tensor([s.block_table + [0] * (width - len(s.block_table)) for s in seqs], dtype=torch.int32)
        view = KVView(self.cache.keys, self.cache.values, tables)
        i32 = torch.int32
        logits = native(torch.tensor(tokens), torch.tensor(positions, dtype=i32),
                        torch.tensor(seq_of_row, dtype=i32), view, torch.tensor(out_rows, dtype=i32),
                        sparse=sparse_prefill_config(self.model) if native.takes_sparse() else None)
        return list(logits.split(keep))

    def copy_block(self, source: int, destination: int) -> None:
        """Copy one block's keys and values (a forked sample's partial prompt block)."""
        self.cache.copy_block(source, destination)

    def verify_greedy(self, seq: Sequence, logits: torch.Tensor) -> list[int]:
        """The tokens a speculative step emits: drafts while each equals the greedy choice at its position, then
        the greedy choice after the last accepted one. logits (len(drafts) + 1, V). Penalties, if any, see the
        output so far plus the drafts before each position, exactly as one-token decoding would."""
        drafts, p = seq.draft_ids, seq.params
        penalized = p.repetition_penalty != 1.0 or p.presence_penalty != 0.0 or p.frequency_penalty != 0.0
        emitted: list[int] = []
        for i in range(len(drafts) + 1):
            row = logits[i]
            if penalized:
                prompt = torch.tensor(seq.prompt_token_ids, dtype=torch.long)
                output = torch.tensor(seq.output_token_ids + drafts[:i], dtype=torch.long)
                row = apply_penalties(row, prompt, output, p.repetition_penalty, p.presence_penalty,
                                      p.frequency_penalty)
            emitted.append(greedy_token(row))
            if i == len(drafts) or emitted[-1] != drafts[i]:
                return emitted
        return emitted

    def sample(self, seq: Sequence, logits: torch.Tensor) -> int:
        """One token for `seq` from its raw last logits (V,), with its processors, penalties and generator."""
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
