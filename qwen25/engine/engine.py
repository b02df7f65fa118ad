"""`LLMEngine`: the one generation engine (nano-vllm / vLLM shape): add requests, step, get token and text deltas.

Wires the pure-Python scheduler and block manager to the tensor-side runner and paged cache, and owns the
text side of each request (UTF-8-safe incremental detokenizing, stop strings). Everything that generates runs
here: `LLM`, the CLI, the server and the trainers' rollouts. A request with `n` > 1 is n sequences (seeds
seed+k) that share one prefill: the first computes the prompt, the others are forked from its blocks and sample
their first token from the same logits. With a `speculative_config`, plain greedy requests decode with drafts
verified in the same pass as the other rows (see `qwen25.engine.speculative`). Not thread-safe: one caller
(the server's engine loop, or `LLM`) calls add_request / abort_request / step in turn.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from itertools import count
from typing import Any

import torch

from qwen25.engine.block_manager import BlockManager
from qwen25.engine.errors import ContextLengthError
from qwen25.engine.kv_cache import activation_dtype
from qwen25.engine.kv_quant import resolve_kv_cache_dtype
from qwen25.engine.paged_cache import PagedKVCache
from qwen25.engine.runner import Logprob, ModelRunner
from qwen25.engine.sampler import top_logprobs
from qwen25.engine.scheduler import Scheduler
from qwen25.engine.sequence import Sequence
from qwen25.engine.speculative import SpeculativeConfig, SpeculativeStats, speculation_applies
from qwen25.engine.stop import StopMatcher
from qwen25.kernels.native import NativeForward
from qwen25.model.long_context import needs_unrotated_keys
from qwen25.model.qwen2 import Qwen2ForCausalLM
from qwen25.model.sparse_prefill import sparse_prefill_config
from qwen25.sampling_params import SamplingParams
from qwen25.tokenizer.stream import StreamDecoder


def kv_cache_dtype_of(model: Qwen2ForCausalLM, name: str) -> torch.dtype:
    """The KV cache dtype an engine for `model` stores for the setting `name` ("auto": float16 when the native
    forward takes the model's quantized weights, else the activations' dtype; `kv_quant.auto_kv_cache_dtype`)."""
    return resolve_kv_cache_dtype(name, activation_dtype(model), quantized=NativeForward.takes(model))


@dataclass
class StepOutput:
    request_id: str
    new_token_ids: list[int]  # one per step, or 1..k+1 after a speculative step
    new_text: str  # detokenized (UTF-8 safe), stop strings applied
    finish_reason: str | None  # None while running; "stop" | "length" | "abort"
    logprobs: list[Logprob] | None  # for the new tokens, if params.logprobs is not None
    num_prompt_tokens: int
    num_output_tokens: int
    index: int = 0  # which of the request's n samples


@dataclass
class GenerationResult:
    """One finished sample of a request from `LLMEngine.generate`."""

    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    logprobs: list[Logprob] | None = None
    index: int = 0


@dataclass
class _Sample:
    """The text side of one sequence."""

    seq: Sequence
    decoder: StreamDecoder
    matcher: StopMatcher


class LLMEngine:
    def __init__(self, model: Qwen2ForCausalLM, tokenizer: Any, *, max_num_seqs: int = 8,
                 max_num_batched_tokens: int = 512, block_size: int = 16, num_blocks: int | None = None,
                 kv_cache_memory: int = 512 << 20, enable_prefix_caching: bool = True,
                 stop_token_ids: Iterable[int] = (), max_model_len: int | None = None, use_native: bool = True,
                 speculative_config: SpeculativeConfig | dict[str, Any] | None = None,
                 draft_model: Qwen2ForCausalLM | None = None, kv_cache_dtype: str = "auto") -> None:
        """speculative_config: vLLM's keys ({"method": "ngram", "num_speculative_tokens": 4, ...} or
        {"model": DRAFT, ...} with the loaded draft passed as `draft_model`); use_native: run the fused native
        forward where the model's weights and the pass allow it (an fp32, fp16 or bf16 KV cache); kv_cache_dtype:
        "auto" (float16 for quantized weights, else the activations' dtype: `kv_quant.auto_kv_cache_dtype`),
        "float32", "float16", "bfloat16" or "int8" (`qwen25.engine.kv_quant`)."""
        config = model.config
        dtype = kv_cache_dtype_of(model, kv_cache_dtype)
        if num_blocks is None:
            num_blocks = kv_cache_memory // PagedKVCache.bytes_per_block(config, block_size, dtype)
        if num_blocks < 1:
            raise ValueError(f"kv_cache_memory={kv_cache_memory} bytes holds no {block_size}-token block")
        spec = (SpeculativeConfig.from_dict(speculative_config) if isinstance(speculative_config, dict)
                else speculative_config)
        if spec is not None and spec.method == "draft_model" and draft_model is None:
            raise ValueError(f"speculative method 'draft_model' needs the loaded draft model ({spec.model})")
        self.model = model
        self.tokenizer = tokenizer
        self.cache_capacity = num_blocks * block_size
        if max_model_len is not None and not 2 <= max_model_len <= config.max_position_embeddings:
            raise ValueError(f"max_model_len={max_model_len} must be in [2, {config.max_position_embeddings}] (the "
                             "model's max_position_embeddings; a YaRN rope_scaling lengthens it)")
        self.max_model_len = min(max_model_len or config.max_position_embeddings, self.cache_capacity)
        self.block_manager = BlockManager(num_blocks, block_size, enable_prefix_caching)
        # Sparse prefill estimates a pattern per chunk from its last `last_q` queries: a chunk of only a few
        # queries would pay the estimate (dense attention for those queries) and save nothing; DCA and dynamic
        # YaRN rotate every cached key at each pass. So with either, a long prompt's chunks are the whole step
        # budget (not the fairness-bounded small ones).
        whole_chunks = sparse_prefill_config(model) is not None or needs_unrotated_keys(config)
        chunking = {} if not whole_chunks else {
            "long_prefill_chunk": max_num_batched_tokens,
            "long_prefill_pairs": max_num_batched_tokens * self.max_model_len}
        self.scheduler = Scheduler(max_num_seqs, max_num_batched_tokens, self.block_manager, **chunking)
        self.runner = ModelRunner(model, num_blocks, block_size, dtype, use_native=use_native, speculative=spec,
                                  draft_model=draft_model)
        self.speculative = spec
        self.speculative_stats = SpeculativeStats()
        self.stop_token_ids = frozenset(int(t) for t in stop_token_ids)
        self.num_computed_tokens = 0  # tokens whose keys/values the engine computed (prefill and decode)
        self._samples: dict[int, _Sample] = {}  # by seq_id
        self._request_seqs: dict[str, list[Sequence]] = {}
        self._forks: dict[int, list[Sequence]] = {}  # seq_id of a prompt's first sample -> the samples to fork
        self._pending: list[StepOutput] = []  # abort outputs, delivered by the next step()
        self._ids = count()

    @classmethod
    def from_checkpoint(cls, checkpoint: Any, **settings: Any) -> LLMEngine:
        """An engine for a loaded `qwen25.checkpoint.Checkpoint` (model + tokenizer + defaults) and plain settings
        (the keyword arguments of `LLMEngine`). Unless sized explicitly, the KV pool holds at least two
        full-context sequences (a prompt up to the context window must fit, and one such prompt must not lock
        every other request out of the cache; the pool's pages are committed as used). A draft-model `speculative_config` loads its draft checkpoint here unless `draft_model` is given."""
        from qwen25.checkpoint import load, stop_token_ids

        settings.setdefault("stop_token_ids", stop_token_ids(checkpoint))
        settings.setdefault("max_model_len", checkpoint.config.max_position_embeddings)
        if "num_blocks" not in settings and "kv_cache_memory" not in settings:
            block_size = settings.get("block_size", 16)
            kv_dtype = kv_cache_dtype_of(checkpoint.model, settings.get("kv_cache_dtype", "auto"))
            per_block = PagedKVCache.bytes_per_block(checkpoint.model.config, block_size, kv_dtype)
            full = settings["max_model_len"] // block_size + 1
            settings["kv_cache_memory"] = max(512 << 20, per_block * 2 * full)
        spec = settings.get("speculative_config")
        if isinstance(spec, dict):
            spec = settings["speculative_config"] = SpeculativeConfig.from_dict(spec)
        if spec is not None and spec.method == "draft_model" and settings.get("draft_model") is None:
            from qwen25.weights.registry import resolve_model

            path = resolve_model(spec.model)
            kind = checkpoint.quantization  # the target's kind of weights; "gguf" only runs a GGUF file's own
            draft = load(path, quantization="q8" if kind == "gguf" and path.suffix != ".gguf" else kind)
            if draft.tokenizer.vocab_size != checkpoint.tokenizer.vocab_size:
                raise ValueError(f"the draft model {spec.model} has a different tokenizer "
                                 f"({draft.tokenizer.vocab_size} tokens) from the target's "
                                 f"({checkpoint.tokenizer.vocab_size})")
            settings["draft_model"] = draft.model
        return cls(checkpoint.model, checkpoint.tokenizer, **settings)

    # --- requests ----------------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Queue a request; params.n > 1 samples n continuations of one prefill (sample k seeded seed+k)."""
        if request_id in self._request_seqs:
            raise ValueError(f"request id {request_id!r} is already running")
        prompt = [int(t) for t in prompt_token_ids]
        self.check_prompt(prompt)
        budget = self.max_model_len - len(prompt)
        stop_ids = frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos else self.stop_token_ids)
        seqs = []
        for k in range(params.n):
            sample_params = params if k == 0 or params.seed is None else replace(params, seed=params.seed + k)
            seq = Sequence(request_id, prompt, sample_params, stop_ids, min(params.max_tokens or budget, budget), k)
            self._samples[seq.seq_id] = _Sample(
                seq, StreamDecoder(self.tokenizer, skip_special_tokens=params.skip_special_tokens),
                StopMatcher(params.stop, params.include_stop_str_in_output))
            seqs.append(seq)
        self._request_seqs[request_id] = seqs
        self.scheduler.add(seqs[0])
        if len(seqs) > 1:
            self._forks[seqs[0].seq_id] = seqs[1:]

    def abort_request(self, request_id: str) -> None:
        """Stop a request (all its samples) and free its blocks; the final StepOutputs (finish_reason "abort")
        come from the next step(). Unknown or already finished ids are ignored."""
        for seq in self._request_seqs.pop(request_id, []):
            self._forks.pop(seq.seq_id, None)
            if self._samples.pop(seq.seq_id, None) is None:
                continue
            self.scheduler.abort(seq)
            self.runner.release(seq)
            self._pending.append(StepOutput(request_id, [], "", "abort",
                                            [] if seq.params.logprobs is not None else None,
                                            seq.num_prompt_tokens, seq.num_output_tokens, seq.index))

    def check_prompt(self, prompt_token_ids: list[int]) -> None:
        """The one context check: raise ContextLengthError unless the prompt leaves room for one output token
        in the model's window and the KV cache."""
        if not prompt_token_ids:
            raise ValueError("empty prompt: nothing to condition on")
        if len(prompt_token_ids) >= self.max_model_len:
            limit = (f"the model's context window is {self.max_model_len} tokens"
                     if self.max_model_len < self.cache_capacity else
                     f"the KV cache holds {self.max_model_len} tokens (raise kv_cache_memory or num_blocks, or "
                     "store it in fewer bytes: kv_cache_dtype float16 or int8)")
            raise ContextLengthError(f"prompt has {len(prompt_token_ids)} tokens; {limit} (at least 1 must remain "
                                     "for the output)")

    # --- weights -----------------------------------------------------------------------------------
    @torch.no_grad()
    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy new values into the model's parameters in place (HF names, e.g. from a trainer's
        `named_parameters()` or a merged LoRA state dict), then forget the prefix cache, whose keys/values the
        old weights computed. Only between generations: refused while requests run. Models of quantized blocks
        cannot take float updates in place: load the policy unquantized, or requantize it (`QuantizedCopy`)."""
        if self.scheduler.has_unfinished():
            raise RuntimeError("update_weights while requests are running would mix two policies in one output")
        params = dict(self.model.named_parameters())
        updates = list(named_tensors)
        for name, value in updates:
            target = params.get(name)
            if target is None:
                raise KeyError(f"the engine's model has no parameter {name!r} (quantized models take no updates)")
            if target.shape != value.shape:
                raise ValueError(f"{name}: shape {tuple(value.shape)} does not match {tuple(target.shape)}")
        for name, value in updates:
            params[name].copy_(value)
        self.reset_prefix_cache()

    def reset_prefix_cache(self) -> None:
        """Drop every cached prompt block (after a weight update; requests in flight keep their blocks)."""
        self.block_manager.reset_prefix_cache()

    def weights_updated(self) -> None:
        """The model's weights were overwritten in place (same tensors, new values; e.g. an RL trainer's sync):
        drop the prefix cache their old values computed (the native forward reads the weights where they lie, so
        it keeps nothing derived from them)."""
        self.reset_prefix_cache()

    def has_unfinished_requests(self) -> bool:
        return bool(self._pending) or self.scheduler.has_unfinished()

    # --- stepping ----------------------------------------------------------------------------------
    def step(self) -> list[StepOutput]:
        """One scheduling step; outputs for samples that produced tokens or finished."""
        outputs, self._pending = self._pending, []
        self.runner.propose(self.scheduler.running)
        batch = self.scheduler.schedule()
        if not len(batch):
            return outputs
        self.num_computed_tokens += batch.num_batched_tokens
        drafted = {seq.seq_id: len(seq.draft_ids) for seq in batch.seqs}
        tokens, logprobs, kept = self.runner.run(batch, frozenset(self._forks))
        for seq, sampled in zip(batch.seqs, tokens):
            if sampled and self.speculative is not None and speculation_applies(seq.params) and not seq.is_prefill:
                self.speculative_stats.record(drafted[seq.seq_id], len(sampled))
        forked = [(child, parent, kept[parent.seq_id]) for parent in batch.seqs if parent.seq_id in kept
                  for child in self._forks.pop(parent.seq_id)]
        forked = [(child, logits) for child, parent, logits in forked if self._fork(parent, child)]
        row_logprobs = {seq.seq_id: lp for seq, lp in zip(batch.seqs, logprobs)}
        for seq, appended in self.scheduler.postprocess(batch, tokens):
            outputs.append(self._text_output(seq, appended, row_logprobs[seq.seq_id]))
        for child, logits in forked:
            token = self.runner.sample(child, logits)
            lps = None
            if child.params.logprobs is not None:
                lps = [top_logprobs(logits, token, child.params.logprobs)]
            outputs.append(self._text_output(child, self.scheduler.append_tokens(child, [token]), lps))
        return outputs

    def _fork(self, parent: Sequence, child: Sequence) -> bool:
        """Start `child` on the parent's prompt blocks (True), or queue it as a sequence of its own (False)."""
        copy = self.scheduler.fork(parent, child)
        if copy is False:
            return False
        if copy is not None:
            self.runner.copy_block(*copy)
        return True

    def _text_output(self, seq: Sequence, tokens: list[int], logprobs: list[Logprob] | None) -> StepOutput:
        sample = self._samples[seq.seq_id]
        text = "".join(sample.decoder.push(token) for token in tokens)
        reason = seq.finish_reason
        if reason is not None:
            text += sample.decoder.flush()
        text, hit = sample.matcher.feed(text, final=reason is not None)
        if hit and reason is None:
            self.scheduler.finish(seq, "stop")
            reason = "stop"
        if reason is not None:
            self.runner.release(seq)
            del self._samples[seq.seq_id]
            siblings = self._request_seqs.get(seq.request_id, [])
            if all(s.seq_id not in self._samples for s in siblings):
                self._request_seqs.pop(seq.request_id, None)
        lps = None if seq.params.logprobs is None else (logprobs or [])[:len(tokens)]
        return StepOutput(seq.request_id, tokens, text, reason, lps, seq.num_prompt_tokens, seq.num_output_tokens,
                          seq.index)

    def stats(self) -> dict[str, float]:
        bm = self.block_manager
        return {
            "num_running": len(self.scheduler.running),
            "num_waiting": len(self.scheduler.waiting),
            "kv_blocks_used": bm.num_used_blocks,
            "kv_blocks_total": bm.num_blocks,
            "queue_blocked_on_kv_cache": float(self.scheduler.blocked_on == "kv_cache"),
            "queue_blocked_on_max_num_seqs": float(self.scheduler.blocked_on == "max_num_seqs"),
            "kv_cache_usage": bm.num_used_blocks / bm.num_blocks,
            "prefix_cache_hit_tokens": bm.hit_tokens,
            "prefix_cache_queried_tokens": bm.queried_tokens,
            "num_preemptions": self.scheduler.num_preemptions,
            "spec_drafted_tokens": self.speculative_stats.drafted,
            "spec_accepted_tokens": self.speculative_stats.accepted,
        }

    def generate(self, prompts: list[list[int]],
                 params: SamplingParams | list[SamplingParams]) -> list[GenerationResult]:
        """Run the prompts to completion (offline convenience; drives the engine until they all finish, and
        drops outputs of requests added by someone else meanwhile). One result per prompt and sample, in
        order."""
        params_list = params if isinstance(params, list) else [params] * len(prompts)
        if len(params_list) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params_list)} SamplingParams")
        results: dict[tuple[str, int], GenerationResult] = {}
        for prompt, p in zip(prompts, params_list):
            rid = f"generate-{next(self._ids)}"
            self.add_request(rid, prompt, p)
            for k in range(p.n):
                results[rid, k] = GenerationResult(rid, list(prompt), logprobs=[] if p.logprobs is not None else None,
                                                   index=k)
        for out in self.run_until_finished(set(results)):
            accumulate(results[out.request_id, out.index], out)
        return list(results.values())

    def run_until_finished(self, samples: set[tuple[str, int]]) -> Iterator[StepOutput]:
        """Step until the given (request id, index) samples finish, yielding their outputs only."""
        unfinished = set(samples)
        while unfinished:
            for out in self.step():
                key = (out.request_id, out.index)
                if key in unfinished:
                    if out.finish_reason is not None:
                        unfinished.discard(key)
                    yield out


def accumulate(result: Any, out: StepOutput) -> None:
    """Add one step's output to a sample's accumulated result: anything with token_ids, text, logprobs and
    finish_reason (`GenerationResult`, `LLM`'s `CompletionOutput`): the one place outputs are summed up."""
    result.token_ids += out.new_token_ids
    result.text += out.new_text
    if out.logprobs and result.logprobs is not None:
        result.logprobs += out.logprobs
    if out.finish_reason is not None:
        result.finish_reason = out.finish_reason
