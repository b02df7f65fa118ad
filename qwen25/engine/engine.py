"""`LLMEngine`: the serving engine's API: add requests, step, get token and text deltas (nano-vllm / vLLM shape).

Wires the pure-Python scheduler and block manager to the tensor-side runner and paged cache, and owns the
text side of each request (UTF-8-safe incremental detokenizing, stop strings). Not thread-safe: one caller
(the server's engine loop, or `LLM`) calls add_request / abort_request / step in turn. `n` > 1 is the
caller's job: submit n requests (seeds seed+k).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from itertools import count
from typing import Any

import torch

from qwen25.engine.block_manager import BlockManager
from qwen25.engine.errors import ContextLengthError
from qwen25.engine.paged_cache import PagedKVCache
from qwen25.engine.runner import Logprob, ModelRunner
from qwen25.engine.scheduler import Scheduler
from qwen25.engine.sequence import Sequence
from qwen25.engine.stop import StopMatcher
from qwen25.model.qwen2 import Qwen2ForCausalLM
from qwen25.sampling_params import SamplingParams
from qwen25.tokenizer.stream import StreamDecoder


def activation_dtype(model: Qwen2ForCausalLM) -> torch.dtype:
    """The dtype of the hidden states, hence of the KV cache (quantized modules may hold int8 weights)."""
    with torch.inference_mode():
        return model.model.embed_tokens(torch.zeros(1, dtype=torch.long)).dtype


@dataclass
class StepOutput:
    request_id: str
    new_token_ids: list[int]
    new_text: str  # detokenized (UTF-8 safe), stop strings applied
    finish_reason: str | None  # None while running; "stop" | "length" | "abort"
    logprobs: list[Logprob] | None  # for the new tokens, if params.logprobs is not None
    num_prompt_tokens: int
    num_output_tokens: int


@dataclass
class GenerationResult:
    """One finished request from `LLMEngine.generate`."""

    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    logprobs: list[Logprob] | None = None


@dataclass
class _Request:
    seq: Sequence
    decoder: StreamDecoder
    matcher: StopMatcher


class LLMEngine:
    def __init__(self, model: Qwen2ForCausalLM, tokenizer: Any, *, max_num_seqs: int = 8,
                 max_num_batched_tokens: int = 512, block_size: int = 16, num_blocks: int | None = None,
                 kv_cache_memory: int = 512 << 20, enable_prefix_caching: bool = True,
                 stop_token_ids: Iterable[int] = (), max_model_len: int | None = None) -> None:
        config = model.config
        dtype = activation_dtype(model)
        if num_blocks is None:
            num_blocks = kv_cache_memory // PagedKVCache.bytes_per_block(config, block_size, dtype)
        if num_blocks < 1:
            raise ValueError(f"kv_cache_memory={kv_cache_memory} bytes holds no {block_size}-token block")
        self.model = model
        self.tokenizer = tokenizer
        self.cache_capacity = num_blocks * block_size
        self.max_model_len = min(max_model_len or config.max_position_embeddings, self.cache_capacity)
        self.block_manager = BlockManager(num_blocks, block_size, enable_prefix_caching)
        self.scheduler = Scheduler(max_num_seqs, max_num_batched_tokens, self.block_manager)
        self.runner = ModelRunner(model, num_blocks, block_size, dtype)
        self.stop_token_ids = frozenset(int(t) for t in stop_token_ids)
        self._requests: dict[str, _Request] = {}
        self._pending: list[StepOutput] = []  # abort outputs, delivered by the next step()
        self._ids = count()

    @classmethod
    def from_checkpoint(cls, checkpoint: Any, **settings: Any) -> LLMEngine:
        """An engine for a loaded `qwen25.checkpoint.Checkpoint` (model + tokenizer + defaults) and plain settings
        (the keyword arguments of `LLMEngine`). Unless sized explicitly, the KV pool holds at least one
        full-context sequence (a prompt up to the context window must fit; the pool's pages are committed as
        used)."""
        from qwen25.checkpoint import stop_token_ids

        settings.setdefault("stop_token_ids", stop_token_ids(checkpoint))
        settings.setdefault("max_model_len", checkpoint.config.max_position_embeddings)
        if "num_blocks" not in settings and "kv_cache_memory" not in settings:
            block_size = settings.get("block_size", 16)
            per_block = PagedKVCache.bytes_per_block(checkpoint.model.config, block_size,
                                                     activation_dtype(checkpoint.model))
            settings["kv_cache_memory"] = max(512 << 20, per_block * (settings["max_model_len"] // block_size + 1))
        return cls(checkpoint.model, checkpoint.tokenizer, **settings)

    # --- requests ----------------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> None:
        if request_id in self._requests:
            raise ValueError(f"request id {request_id!r} is already running")
        prompt = [int(t) for t in prompt_token_ids]
        if not prompt:
            raise ValueError("empty prompt: nothing to condition on")
        if len(prompt) >= self.max_model_len:
            limit = (f"the model's context window is {self.max_model_len} tokens"
                     if self.max_model_len < self.cache_capacity else
                     f"the KV cache holds {self.max_model_len} tokens (raise kv_cache_memory or num_blocks)")
            raise ContextLengthError(f"prompt has {len(prompt)} tokens; {limit} (at least 1 must remain for the "
                                     "output)")
        budget = self.max_model_len - len(prompt)
        stop_ids = frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos else self.stop_token_ids)
        seq = Sequence(request_id, prompt, params, stop_ids, min(params.max_tokens or budget, budget))
        self._requests[request_id] = _Request(
            seq, StreamDecoder(self.tokenizer, skip_special_tokens=params.skip_special_tokens),
            StopMatcher(params.stop, params.include_stop_str_in_output))
        self.scheduler.add(seq)

    def abort_request(self, request_id: str) -> None:
        """Stop a request and free its blocks; its final StepOutput (finish_reason "abort") comes from the next
        step(). Unknown or already finished ids are ignored."""
        request = self._requests.pop(request_id, None)
        if request is None:
            return
        seq = request.seq
        self.scheduler.abort(seq)
        self.runner.release(seq)
        self._pending.append(StepOutput(request_id, [], "", "abort", [] if seq.params.logprobs is not None else None,
                                        seq.num_prompt_tokens, seq.num_output_tokens))

    def has_unfinished_requests(self) -> bool:
        return bool(self._pending) or self.scheduler.has_unfinished()

    # --- stepping ----------------------------------------------------------------------------------
    def step(self) -> list[StepOutput]:
        """One scheduling step; outputs for requests that produced a token or finished."""
        outputs, self._pending = self._pending, []
        batch = self.scheduler.schedule()
        if not len(batch):
            return outputs
        tokens, logprobs = self.runner.run(batch)
        row_logprobs = {seq.seq_id: lp for seq, lp in zip(batch.seqs, logprobs)}
        for seq, token in self.scheduler.postprocess(batch, tokens):
            outputs.append(self._text_output(seq, token, row_logprobs[seq.seq_id]))
        return outputs

    def _text_output(self, seq: Sequence, token: int | None, logprob: Logprob | None) -> StepOutput:
        request = self._requests[seq.request_id]
        text = request.decoder.push(token) if token is not None else ""
        reason = seq.finish_reason
        if reason is not None:
            text += request.decoder.flush()
        text, hit = request.matcher.feed(text, final=reason is not None)
        if hit and reason is None:
            self.scheduler.finish(seq, "stop")
            reason = "stop"
        if reason is not None:
            self.runner.release(seq)
            del self._requests[seq.request_id]
        new_ids = [token] if token is not None else []
        lps = None if seq.params.logprobs is None else ([logprob] if token is not None and logprob is not None else [])
        return StepOutput(seq.request_id, new_ids, text, reason, lps, seq.num_prompt_tokens, seq.num_output_tokens)

    def stats(self) -> dict[str, float]:
        bm = self.block_manager
        return {
            "num_running": len(self.scheduler.running),
            "num_waiting": len(self.scheduler.waiting),
            "kv_blocks_used": bm.num_used_blocks,
            "kv_blocks_total": bm.num_blocks,
            "kv_cache_usage": bm.num_used_blocks / bm.num_blocks,
            "prefix_cache_hit_tokens": bm.hit_tokens,
            "prefix_cache_queried_tokens": bm.queried_tokens,
            "num_preemptions": self.scheduler.num_preemptions,
        }

    def generate(self, prompts: list[list[int]],
                 params: SamplingParams | list[SamplingParams]) -> list[GenerationResult]:
        """Run the prompts to completion (offline convenience; drives the engine until they all finish, and
        drops outputs of requests added by someone else meanwhile)."""
        params_list = params if isinstance(params, list) else [params] * len(prompts)
        if len(params_list) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params_list)} SamplingParams")
        results: dict[str, GenerationResult] = {}
        for prompt, p in zip(prompts, params_list):
            rid = f"generate-{next(self._ids)}"
            self.add_request(rid, prompt, p)
            results[rid] = GenerationResult(rid, list(prompt), logprobs=[] if p.logprobs is not None else None)
        unfinished = set(results)
        while unfinished:
            for out in self.step():
                result = results.get(out.request_id)
                if result is None:
                    continue
                result.token_ids += out.new_token_ids
                result.text += out.new_text
                if out.logprobs and result.logprobs is not None:
                    result.logprobs += out.logprobs
                if out.finish_reason is not None:
                    result.finish_reason = out.finish_reason
                    unfinished.discard(out.request_id)
        return list(results.values())
