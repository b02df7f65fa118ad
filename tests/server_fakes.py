"""Test doubles for the server tests: a byte-level tokenizer and a scripted engine with the `LLMEngine` step API.

`byte_tokenizer()` is a real `qwen25.tokenizer.Tokenizer` over 256 byte tokens plus the Qwen control tokens the
server relies on (<|im_start|>, <|im_end|>, <tool_call>, ...), so chat templates, streaming detokenization and
llguidance all work on it. `ScriptedEngine` "generates" a scripted reply for each prompt: its logits strongly
favour the next token of the reply, with seeded noise elsewhere, and then go through the request's logits
processors and the real sampler, so grammars, logit_bias, seeds, stop strings and logprobs behave as they would
with a model. Like `LLMEngine`, a request with params.n > 1 is n samples (sample k seeded seed + k, outputs tagged
with `index`, all sharing the request's SamplingParams) and aborting it ends every sample with an "abort" output.
Imported by name as `server_fakes` (pytest puts tests/ on sys.path) by tests/test_server*.py; it is not part of
the installed package.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from tokenizers import AddedToken, models

from qwen25.engine.engine import StepOutput
from qwen25.engine.sampler import sample_next
from qwen25.engine.stop import StopMatcher
from qwen25.engine.errors import ContextLengthError
from qwen25.sampling_params import SamplingParams
from qwen25.tokenizer import StreamDecoder, Tokenizer
from qwen25.tokenizer.bpe import BYTE_TO_CHAR, _build_backend

CONTROL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<tool_call>", "</tool_call>",
                  "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>"]
NON_SPECIAL = {"<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>"}


def byte_tokenizer() -> Tokenizer:
    """256 byte tokens (id = byte value) + the control tokens at ids 256.. (no merges: one token per byte)."""
    vocab = {BYTE_TO_CHAR[b]: b for b in range(256)}
    backend = _build_backend(models.BPE(vocab, [], dropout=None, unk_token=None, continuing_subword_prefix="",
                                        end_of_word_suffix="", fuse_unk=False, byte_fallback=False))
    backend.add_tokens([AddedToken(t, special=t not in NON_SPECIAL, normalized=False) for t in CONTROL_TOKENS])
    return Tokenizer(backend, eos_token_id=backend.token_to_id("<|im_end|>"))


def echo_script(prompt: str) -> str:
    """Default script: repeat the last user turn of a ChatML prompt (or the raw prompt's tail)."""
    marker = "<|im_start|>user\n"
    if marker in prompt:
        last = prompt.rsplit(marker, 1)[1].split("<|im_end|>", 1)[0]
        return f"You said: {last}"
    return " and so on." if prompt else ""


@dataclass
class _Seq:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    target: list[int]
    max_new: int
    decoder: StreamDecoder
    matcher: StopMatcher
    generator: torch.Generator
    stop_ids: frozenset[int]
    index: int = 0
    output_ids: list[int] = field(default_factory=list)


class ScriptedEngine:
    """The LLMEngine API over a scripted "model": reply = script(prompt text), `tokens_per_step` tokens per step
    per request (default one)."""

    def __init__(self, tokenizer: Tokenizer, script: Callable[[str], str] = echo_script, *,
                 max_num_seqs: int = 8, max_model_len: int = 4096, step_delay: float = 0.0,
                 stop_token_ids: Any = None, confidence: float = 30.0, tokens_per_step: int = 1) -> None:
        self.tokenizer = tokenizer
        self.script = script
        self.max_num_seqs = max_num_seqs
        self.max_model_len = max_model_len
        self.step_delay = step_delay
        self.confidence = confidence  # the scripted token's logit; noise is in [0, 2)
        self.tokens_per_step = tokens_per_step  # >1: each output carries several tokens, as speculative decoding's do
        self.vocab_size = tokenizer.vocab_size
        self.stop_token_ids = frozenset(stop_token_ids if stop_token_ids is not None else tokenizer.stop_token_ids)
        self.eos = tokenizer.token_to_id("<|im_end|>")
        self.waiting: deque[_Seq] = deque()
        self.running: list[_Seq] = []
        self.aborted: list[str] = []
        self.added: list[tuple[str, list[int], SamplingParams]] = []  # one entry per request (not per sample)
        self._pending: list[StepOutput] = []  # abort outputs, delivered by the next step()
        self.fail_next_step: Exception | None = None
        self.steps = 0

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> None:
        n = len(prompt_token_ids)
        if n >= self.max_model_len:
            raise ContextLengthError(f"prompt has {n} tokens; the model's context window is {self.max_model_len}")
        self.added.append((request_id, list(prompt_token_ids), params))
        reply = self.script(self.tokenizer.decode(prompt_token_ids))
        target = self.tokenizer.encode(reply) + [self.eos]
        budget = self.max_model_len - n
        stop_ids = frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos else self.stop_token_ids)
        for k in range(params.n):
            g = torch.Generator()
            g.manual_seed(params.seed + k if params.seed is not None else int(torch.randint(0, 2**62, (1,))))
            self.waiting.append(_Seq(request_id, list(prompt_token_ids), params, target,
                                     min(params.max_tokens or budget, budget),
                                     StreamDecoder(self.tokenizer, params.skip_special_tokens),
                                     StopMatcher(params.stop, params.include_stop_str_in_output), g, stop_ids, k))

    def abort_request(self, request_id: str) -> None:
        self.aborted.append(request_id)
        for s in [*self.waiting, *self.running]:
            if s.request_id == request_id:
                self._pending.append(StepOutput(request_id, [], "", "abort", None, len(s.prompt_ids),
                                                len(s.output_ids), s.index))
        self.waiting = deque(s for s in self.waiting if s.request_id != request_id)
        self.running = [s for s in self.running if s.request_id != request_id]

    def has_unfinished_requests(self) -> bool:
        return bool(self.waiting or self.running or self._pending)

    def stats(self) -> dict[str, float]:
        return {"num_running": len(self.running), "num_waiting": len(self.waiting), "steps": self.steps}

    def step(self) -> list[StepOutput]:
        if self.fail_next_step is not None:
            error, self.fail_next_step = self.fail_next_step, None
            raise error
        if self.step_delay:
            time.sleep(self.step_delay)
        while self.waiting and len(self.running) < self.max_num_seqs:
            self.running.append(self.waiting.popleft())
        outputs = [self._advance_many(s) for s in self.running]
        self.running = [s for s, o in zip(self.running, outputs) if o.finish_reason is None]
        self.steps += 1
        pending, self._pending = self._pending, []
        return pending + outputs

    def _logits(self, seq: _Seq) -> torch.Tensor:
        noise = torch.Generator()
        noise.manual_seed(len(seq.output_ids) * 7919 + sum(seq.prompt_ids[-8:]))
        logits = torch.rand(self.vocab_size, generator=noise) * 2.0
        k = len(seq.output_ids)
        logits[seq.target[k] if k < len(seq.target) else self.eos] = self.confidence
        return logits

    def _advance_many(self, seq: _Seq) -> StepOutput:
        """Up to `tokens_per_step` tokens of one sequence, merged into one output (stopping at its finish)."""
        out = self._advance(seq)
        for _ in range(self.tokens_per_step - 1):
            if out.finish_reason is not None:
                break
            nxt = self._advance(seq)
            logprobs = (out.logprobs or []) + (nxt.logprobs or []) if seq.params.logprobs is not None else None
            out = StepOutput(seq.request_id, out.new_token_ids + nxt.new_token_ids, out.new_text + nxt.new_text,
                             nxt.finish_reason, logprobs, nxt.num_prompt_tokens, nxt.num_output_tokens, seq.index)
        return out

    def _advance(self, seq: _Seq) -> StepOutput:
        raw = self._logits(seq)
        logits = raw
        for proc in getattr(seq.params, "logits_processors", None) or ():
            logits = proc(seq.output_ids, logits)
        token = sample_next(logits, seq.params, torch.tensor(seq.prompt_ids),
                            torch.tensor(seq.output_ids, dtype=torch.long), seq.generator)
        n_prompt = len(seq.prompt_ids)
        if token in seq.stop_ids:
            text, _ = seq.matcher.feed(seq.decoder.flush(), final=True)
            return StepOutput(seq.request_id, [], text, "stop", None, n_prompt, len(seq.output_ids), seq.index)
        seq.output_ids.append(token)
        lp = None
        if seq.params.logprobs is not None:
            logp = raw.log_softmax(-1)
            top = torch.topk(logp, seq.params.logprobs) if seq.params.logprobs else None
            pairs = list(zip(top.indices.tolist(), top.values.tolist())) if top is not None else []
            lp = [(float(logp[token]), pairs)]
        reason = "length" if len(seq.output_ids) >= seq.max_new else None
        text = seq.decoder.push(token)
        if reason is not None:
            text += seq.decoder.flush()
        text, hit = seq.matcher.feed(text, final=reason is not None)
        if hit:
            reason = "stop"
        return StepOutput(seq.request_id, [token], text, reason, lp, n_prompt, len(seq.output_ids), seq.index)


__all__ = ["ScriptedEngine", "byte_tokenizer", "echo_script"]
