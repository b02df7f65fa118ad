"""`LLM`: the offline Python API (vLLM-shaped). Loads a checkpoint, renders chats, generates text.

A thin face over the model, tokenizer, chat template and the generation loop: it owns the text-level parts
of generation (incremental detokenizing, stop strings, outputs), not the math.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence as Seq
from contextlib import closing
from dataclasses import dataclass, field
from itertools import count
from typing import TYPE_CHECKING, Any

import torch

from qwen25.checkpoint import QWEN25_INSTRUCT_DEFAULTS, default_sampling_params, is_instruct, load as load_checkpoint, stop_token_ids
from qwen25.engine.errors import ContextLengthError
from qwen25.sampling_params import SamplingParams
from qwen25.weights.registry import DEFAULT_MODEL, resolve_model

if TYPE_CHECKING:
    from qwen25.engine.engine import LLMEngine, StepOutput
    from qwen25.engine.speculative import SpeculativeConfig

Message = dict[str, Any]
_calls = count()  # request-id namespace per generate/stream call


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None
    logprobs: list[tuple[float, list[tuple[int, float]]]] | None = None


@dataclass
class RequestOutput:
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class TextDelta:
    """Streaming event: new text for request `request` / sample `index`; `finish_reason` set on the last one."""

    request: int
    index: int
    text: str
    finish_reason: str | None


class LLM:
    """Load a Qwen2.5 checkpoint and generate.

    model: a known name (`qwen25 models`), a .gguf file, an HF model directory, or an HF repo id (online only).
    dtype: "float32" (default; fastest on CPUs without native bf16) or "bfloat16".
    quantization: "auto" (default: "q8" for GGUF files, whose weights are quantized already, else "none"),
    "q8" (int8 weights with fp32 activations: the fast CPU path, perplexity within 0.2% of fp32 on Qwen2.5),
    "q4" (int4 layer weights, int8 tables: ~60% of q8's layer bytes, perplexity ~0.4% above fp32 on the 0.5B;
    `qwen25 quantize` prebuilds its cache) or "none" (dequantized `dtype` weights: the bit-faithful reference
    path). A .safetensors file written by `qwen25 quantize --output` loads as the format it holds, and
    `self.quantization` then reports that format.
    engine_kwargs: settings for the `LLMEngine` that generation runs on (max_num_seqs, max_num_batched_tokens,
    enable_prefix_caching, kv_cache_memory, ...).
    speculative_config: speculative decoding for plain greedy requests (temperature 0, n=1, no penalties,
    logprobs or logits processors), vLLM's keys: {"method": "ngram", "num_speculative_tokens": 4,
    "prompt_lookup_max": 3, "prompt_lookup_min": 1} or {"model": DRAFT, "num_speculative_tokens": 4} (a draft
    checkpoint with the same tokenizer, e.g. the 0.5B for the 1.5B). Output is identical to plain greedy
    decoding; other requests run on the engine as usual. `speculative_stats` holds the last call's counters."""

    def __init__(self, model: str = DEFAULT_MODEL, dtype: str | torch.dtype = "float32", download: bool = True,
                 quantization: str = "auto", engine_kwargs: dict[str, Any] | None = None,
                 speculative_config: dict[str, Any] | None = None) -> None:
        self.engine_kwargs = dict(engine_kwargs or {})
        torch_dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        if not isinstance(torch_dtype, torch.dtype) or not torch_dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating torch dtype such as 'float32' or 'bfloat16', got {dtype!r}")
        self.path = resolve_model(model, download=download)
        if quantization == "auto":
            quantization = "q8" if self.path.is_file() else "none"
        self.quantization = quantization
        checkpoint = self.checkpoint = load_checkpoint(self.path, torch_dtype, quantization)
        if checkpoint.quantization:  # what the weights actually are (a `qwen25 quantize --output` file decides)
            self.quantization = checkpoint.quantization
        self.model = checkpoint.model
        self.config = checkpoint.config
        self.tokenizer = checkpoint.tokenizer
        self.generation_defaults = checkpoint.generation_defaults
        self.name = str(model)
        self.speculative, self._draft_model = self._load_speculation(speculative_config, torch_dtype, download)
        self.speculative_stats = None

    def _load_speculation(self, settings: dict[str, Any] | None, dtype: torch.dtype,
                          download: bool) -> tuple[SpeculativeConfig | None, torch.nn.Module | None]:
        if settings is None:
            return None, None
        from qwen25.engine.speculative import SpeculativeConfig

        spec = SpeculativeConfig.from_dict(dict(settings))
        if spec.method != "draft_model":
            return spec, None
        path = resolve_model(spec.model, download=download)
        draft = load_checkpoint(path, dtype, self.quantization if path.is_file() == self.path.is_file() else
                                ("q8" if path.is_file() else "none"))
        if draft.tokenizer.vocab_size != self.tokenizer.vocab_size:
            raise ValueError(f"the draft model {spec.model} has a different tokenizer ({draft.tokenizer.vocab_size} "
                             f"tokens) from the target's ({self.tokenizer.vocab_size})")
        return spec, draft.model

    # --- settings ----------------------------------------------------------------------------------
    @property
    def max_context(self) -> int:
        return self.config.max_position_embeddings

    @property
    def is_instruct(self) -> bool:
        return is_instruct(self.checkpoint)

    def get_default_sampling_params(self) -> SamplingParams:
        """The checkpoint's generation_config defaults; Qwen2.5-Instruct's for instruct GGUFs; else neutral."""
        return default_sampling_params(self.checkpoint)

    def stop_token_ids(self) -> set[int]:
        return stop_token_ids(self.checkpoint)

    # --- chat --------------------------------------------------------------------------------------
    def apply_chat_template(self, messages: list[Message], tools: list[dict] | None = None,
                            add_generation_prompt: bool = True, **extra: Any) -> str:
        from qwen25.chat import render_chat

        return render_chat(self.tokenizer.chat_template, messages, tools=tools,
                           add_generation_prompt=add_generation_prompt, **extra)

    def chat(self, messages: list[Message] | list[list[Message]], sampling_params: SamplingParams | None = None,
             tools: list[dict] | None = None, use_tqdm: bool = False) -> list[RequestOutput]:
        """Generate the assistant's reply to one conversation or to a list of conversations."""
        conversations = _as_conversations(messages)
        prompts = [self.apply_chat_template(c, tools=tools) for c in conversations]
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    def chat_stream(self, messages: list[Message], sampling_params: SamplingParams | None = None,
                    tools: list[dict] | None = None) -> Iterator[TextDelta]:
        return self.stream([self.apply_chat_template(messages, tools=tools)], sampling_params)

    # --- generation --------------------------------------------------------------------------------
    @property
    def engine(self) -> LLMEngine:
        """The continuous-batching engine that generate/stream run on (created on first use; its prefix cache
        persists across calls, so a chat's history is not recomputed every turn)."""
        engine = self.__dict__.get("_engine")
        if engine is None:
            from qwen25.engine.engine import LLMEngine

            engine = self.__dict__["_engine"] = LLMEngine.from_checkpoint(self.checkpoint, **self.engine_kwargs)
        return engine

    def generate(self, prompts: str | Seq[str] | Seq[Seq[int]], sampling_params: SamplingParams | None = None,
                 use_tqdm: bool = False) -> list[RequestOutput]:
        """Complete each prompt (text, or token ids). Returns one RequestOutput per prompt, in order."""
        texts, id_lists = self._encode_prompts(prompts)
        params = sampling_params or self.get_default_sampling_params()
        logprobs = [] if params.logprobs is not None else None
        outputs = [RequestOutput(t, ids, [CompletionOutput(k, "", [], None, None if logprobs is None else [])
                                          for k in range(params.n)]) for t, ids in zip(texts, id_lists)]
        progress = None
        if use_tqdm:
            from tqdm import tqdm

            progress = tqdm(total=len(id_lists) * params.n, desc="generating", unit="seq")
        for (r, k), step in self._run(id_lists, params):
            out = outputs[r].outputs[k]
            out.text += step.new_text
            out.token_ids += step.new_token_ids
            if step.logprobs and out.logprobs is not None:
                out.logprobs += step.logprobs
            if step.finish_reason is not None:
                out.finish_reason = step.finish_reason
                if progress is not None:
                    progress.update(1)
        if progress is not None:
            progress.close()
        return outputs

    def stream(self, prompts: str | Seq[str] | Seq[Seq[int]],
               sampling_params: SamplingParams | None = None) -> Iterator[TextDelta]:
        """Yield text deltas as tokens are generated (never a broken UTF-8 character)."""
        _, id_lists = self._encode_prompts(prompts)
        params = sampling_params or self.get_default_sampling_params()
        return self._deltas(self._run(id_lists, params))

    @staticmethod
    def _deltas(steps: Iterator[tuple[tuple[int, int], StepOutput]]) -> Iterator[TextDelta]:
        with closing(steps):  # closing the stream early aborts its requests
            for (r, k), step in steps:
                if step.new_text or step.finish_reason is not None:
                    yield TextDelta(r, k, step.new_text, step.finish_reason)

    def _encode_prompts(self, prompts: str | Seq[str] | Seq[Seq[int]]) -> tuple[list[str | None], list[list[int]]]:
        if isinstance(prompts, str):
            prompts = [prompts]
        if not prompts:
            raise ValueError("no prompts given")
        texts: list[str | None] = []
        id_lists: list[list[int]] = []
        for p in prompts:
            if isinstance(p, str):
                texts.append(p)
                id_lists.append(self.tokenizer.encode(p))
            else:
                texts.append(None)
                id_lists.append([int(t) for t in p])
        for ids in id_lists:
            if not ids:
                raise ValueError("empty prompt: nothing to condition on")
            if len(ids) >= self.max_context:
                raise ContextLengthError(f"prompt has {len(ids)} tokens; the model's context window is "
                                         f"{self.max_context} tokens (at least 1 must remain for the output)")
        return texts, id_lists

    def _run(self, id_lists: list[list[int]], params: SamplingParams) -> Iterator[tuple[tuple[int, int], StepOutput]]:
        """Submit one engine request per (prompt, sample k, seeded seed+k) and yield ((prompt, k), output) as the
        engine produces them. Closing the iterator early aborts what is left. Several iterators may be live at
        once: each routes the others' outputs to them through `_inbox`."""
        if self.speculative is not None and _speculation_applies(params):
            yield from self._run_speculative(id_lists, params)
            return
        engine = self.engine
        inbox: dict[str, list[StepOutput]] = self.__dict__.setdefault("_inbox", {})
        call = next(_calls)
        owners: dict[str, tuple[int, int]] = {}
        try:
            for r, ids in enumerate(id_lists):
                for k in range(params.n):
                    seed = None if params.seed is None else params.seed + k
                    request_id = f"llm-{call}-{r}-{k}"
                    engine.add_request(request_id, ids, params if seed == params.seed else _with_seed(params, seed))
                    owners[request_id] = (r, k)
                    inbox[request_id] = []
            live = list(owners)
            while live:
                mine = [out for rid in live for out in inbox[rid]]
                if not mine:
                    for out in engine.step():
                        if out.request_id in inbox:  # outputs of abandoned requests are dropped
                            inbox[out.request_id].append(out)
                    continue
                for rid in live:
                    inbox[rid] = []
                for out in mine:
                    if out.finish_reason is not None:
                        del inbox[out.request_id]
                    yield owners[out.request_id], out
                live = [rid for rid in live if rid in inbox]
        finally:
            for request_id in owners:
                if inbox.pop(request_id, None) is not None:
                    engine.abort_request(request_id)


    def _run_speculative(self, id_lists: list[list[int]],
                         params: SamplingParams) -> Iterator[tuple[tuple[int, int], StepOutput]]:
        """Greedy generation with speculative decoding, one prompt after another; the same outputs (token ids,
        text, stop strings, finish reasons) as the engine gives."""
        from qwen25.engine.engine import StepOutput
        from qwen25.engine.speculative import DraftModelProposer, NgramProposer, SpeculativeStats, speculative_greedy
        from qwen25.engine.stop import StopMatcher
        from qwen25.tokenizer.stream import StreamDecoder

        spec = self.speculative
        assert spec is not None
        stats = self.speculative_stats = SpeculativeStats()
        stop_ids = frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos else self.stop_token_ids())
        for r, ids in enumerate(id_lists):
            budget = self.max_context - len(ids)
            proposer = (DraftModelProposer(self._draft_model) if self._draft_model is not None else
                        NgramProposer(spec.prompt_lookup_max, spec.prompt_lookup_min))
            decoder = StreamDecoder(self.tokenizer, skip_special_tokens=params.skip_special_tokens)
            matcher = StopMatcher(params.stop, params.include_stop_str_in_output)
            produced = 0
            events = speculative_greedy(self.model, ids, min(params.max_tokens or budget, budget), stop_ids,
                                        proposer, spec.num_speculative_tokens, stats)
            with closing(events):
                for event in events:
                    token, reason = event.token_id, event.finish_reason
                    produced += token is not None
                    text = decoder.push(token) if token is not None else ""
                    if reason is not None:
                        text += decoder.flush()
                    text, hit = matcher.feed(text, final=reason is not None)
                    if hit and reason is None:
                        reason = "stop"
                    yield (r, 0), StepOutput(f"spec-{r}", [token] if token is not None else [], text, reason, None,
                                             len(ids), produced)
                    if reason is not None:
                        break


def _speculation_applies(params: SamplingParams) -> bool:
    """Speculation reproduces plain greedy decoding of the raw logits: no sampling, penalties or processors."""
    return (params.is_greedy and params.n == 1 and params.logprobs is None and not params.logits_processors
            and params.repetition_penalty == 1.0 and params.presence_penalty == 0.0
            and params.frequency_penalty == 0.0)


def _with_seed(params: SamplingParams, seed: int | None) -> SamplingParams:
    from dataclasses import replace

    return replace(params, seed=seed)


def _as_conversations(messages: list[Message] | list[list[Message]]) -> list[list[Message]]:
    if not messages:
        raise ValueError("messages is empty")
    return [messages] if isinstance(messages[0], dict) else messages  # type: ignore[list-item]
