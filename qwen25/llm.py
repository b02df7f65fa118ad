"""`LLM`: the offline Python API (vLLM-shaped). Loads a checkpoint, renders chats, generates text.

A thin face over the model, tokenizer, chat template and the generation loop: it owns the text-level parts
of generation (incremental detokenizing, stop strings, outputs), not the math.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence as Seq
from contextlib import closing
from dataclasses import dataclass, field
from itertools import count
from typing import TYPE_CHECKING, Any

import torch

from qwen25.chat.prompt import ChatPrompt, chat_prompt
from qwen25.checkpoint import default_sampling_params, is_instruct, stop_token_ids
from qwen25.checkpoint import load as load_checkpoint
from qwen25.engine.engine import LLMEngine, StepOutput, accumulate
from qwen25.engine.kv_quant import resolve_kv_cache_dtype
from qwen25.config import ModelConfig
from qwen25.engine.speculative import SpeculativeConfig
from qwen25.model.long_context import LongContextSetting, set_long_context
from qwen25.model.sparse_prefill import SparsePrefillConfig, SparsePrefillSetting, enable_sparse_prefill
from qwen25.sampling_params import SamplingParams
from qwen25.weights.loader import default_quantization
from qwen25.weights.registry import DEFAULT_MODEL, resolve_model

if TYPE_CHECKING:
    from qwen25.engine.speculative import SpeculativeStats

Message = dict[str, Any]
Prompts = str | ChatPrompt | Seq[str | ChatPrompt] | Seq[Seq[int]]
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
    quantization: "auto" (default: "gguf" for GGUF files, "q8" for them with a LoRA adapter, "none" for HF
    directories; "none" wherever the block kernels cannot run: no C compiler or no AVX2), "gguf" (a GGUF file's
    own Q4_K/Q6_K/Q5_0/Q8_0 blocks, memory-mapped: no requantization, no copy; greedy text equal to llama.cpp's),
    "q8" (every matrix quantized at load to Q8_0 blocks, one fp16 scale per 32 int8 weights: 1.06 bytes per weight,
    perplexity within ~0.1% of fp32 on Qwen2.5, run by the same kernels as "gguf"), "q4" (layer projections Q4_K, or
    Q5_0 where a row is not a multiple of 256 weights; v_proj, the last layer and the tables Q8_0: fewer bytes than
    q8 at a small perplexity cost, README) or "none" (dequantized `dtype` weights: the bit-faithful reference path).
    README lists what each costs.
    engine_kwargs: settings for the `LLMEngine` that generation runs on (max_num_seqs, max_num_batched_tokens,
    enable_prefix_caching, kv_cache_memory, ...).
    kv_cache_dtype: the KV cache's storage, as vLLM's keyword: "auto" (float16 for quantized weights, half an
    fp32 cache; else the compute dtype), "float32"/"fp32", "float16"/"fp16", "bfloat16"/"bf16" (half the memory)
    or "int8" (27%); int8 runs attention on the PyTorch path rather than the fused native forward
    (`qwen25.engine.kv_quant`; engine_kwargs may set it too).
    speculative_config: speculative decoding in the engine for plain greedy requests (temperature 0, no
    penalties, logprobs or logits processors), vLLM's keys: {"method": "ngram", "num_speculative_tokens": 4,
    "prompt_lookup_max": 3, "prompt_lookup_min": 1} or {"model": DRAFT, "num_speculative_tokens": 4} (a draft
    checkpoint with the same tokenizer, e.g. the 0.5B for the 1.5B). Output is identical to plain greedy
    decoding; other requests run on the engine as usual. `speculative_stats` holds the engine's counters.
    lora: a LoRA adapter directory in peft's format (what qwen25's LoRA training and peft write) for this
    base model. The base is loaded in fp32, the adapter merged into its weights, and the merged model then
    quantized or cast as `quantization`/`dtype` say (see `qwen25.train.lora.load_merged`): the same speed as
    the base, one adapter per LLM.
    allow_special_tokens_in_content: chat prompts (chat, chat_stream, chat_prompt) tokenize control-token spellings
    in message contents, tools and tool results as plain text, so a message cannot forge a turn or a tool call
    (`qwen25.chat.prompt`); True restores the transformers/vLLM behaviour of matching them as control tokens.
    rope_scaling, dual_chunk_attention_config: long context (see `set_long_context`); None keeps the checkpoint's.
    sparse_prefill: MInference's vertical-slash sparse attention for long prefill chunks (True, "on", a dict or
    JSON text of `qwen25.model.sparse_prefill.SparsePrefillConfig` fields; None/False/"off": dense); default RoPE
    or static YaRN only. Such chunks run in the fused native forward where it runs the model (the PyTorch path
    otherwise); with it on, a long prompt prefills in chunks of the whole step budget.
    engine_kwargs["max_model_len"] caps prompt + output per request (default: the model's max_position_embeddings,
    which a YaRN rope_scaling lengthens to factor x its native window)."""

    def __init__(self, model: str = DEFAULT_MODEL, dtype: str | torch.dtype = "float32", download: bool = True,
                 quantization: str = "auto", engine_kwargs: dict[str, Any] | None = None,
                 speculative_config: dict[str, Any] | None = None, lora: str | os.PathLike | None = None,
                 allow_special_tokens_in_content: bool = False, rope_scaling: LongContextSetting = None,
                 dual_chunk_attention_config: LongContextSetting = None, kv_cache_dtype: str | None = None,
                 sparse_prefill: SparsePrefillSetting = None) -> None:
        self.engine_kwargs = dict(engine_kwargs or {})
        self.sparse_prefill = SparsePrefillConfig.from_setting(sparse_prefill)  # a bad setting fails before the load
        if kv_cache_dtype is not None:
            resolve_kv_cache_dtype(kv_cache_dtype, torch.float32)  # a bad name fails before the (slow) load
            self.engine_kwargs["kv_cache_dtype"] = kv_cache_dtype
        self.allow_special_tokens_in_content = allow_special_tokens_in_content
        torch_dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        if not isinstance(torch_dtype, torch.dtype) or not torch_dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating torch dtype such as 'float32' or 'bfloat16', got {dtype!r}")
        self.path = resolve_model(model, download=download)
        if quantization == "auto":
            quantization = default_quantization(self.path, lora is not None)
        self.quantization = quantization
        if lora is None:
            checkpoint = self.checkpoint = load_checkpoint(self.path, torch_dtype, quantization)
        else:
            from qwen25.train.lora import load_merged

            checkpoint = self.checkpoint = load_merged(self.path, lora, torch_dtype, quantization)
        self.lora = lora
        self.model = checkpoint.model
        self.config = checkpoint.config
        self.tokenizer = checkpoint.tokenizer
        self.generation_defaults = checkpoint.generation_defaults
        self.name = str(model)
        if speculative_config is not None:  # validated now, the draft checkpoint loaded with the engine
            self.engine_kwargs["speculative_config"] = SpeculativeConfig.from_dict(dict(speculative_config))
        if rope_scaling is not None or dual_chunk_attention_config is not None:
            self.set_long_context(rope_scaling, dual_chunk_attention_config)
        elif self.sparse_prefill is not None:
            enable_sparse_prefill(self.model, self.sparse_prefill)

    # --- settings ----------------------------------------------------------------------------------
    def set_long_context(self, rope_scaling: LongContextSetting = None,
                         dual_chunk_attention_config: LongContextSetting = None) -> ModelConfig:
        """Switch the model to YaRN (static, or "dynamic": true) and/or Dual Chunk Attention, before the first
        generation. Each setting is None (keep), a dict (vLLM's `rope_scaling` JSON shape; a config.json's
        `dual_chunk_attention_config`), {} (remove), or a flag's text ("none"; "on"/"off" for DCA). Returns the
        new config; the engine, created afterwards, admits prompts up to its max_position_embeddings."""
        if "_engine" in self.__dict__:
            raise RuntimeError("set_long_context after the engine was created: set it when constructing the LLM")
        self.config = self.checkpoint.config = set_long_context(self.model, rope_scaling, dual_chunk_attention_config)
        if self.__dict__.get("sparse_prefill") is not None:  # the new config's backend, made sparse again
            enable_sparse_prefill(self.model, self.sparse_prefill)
        return self.config

    @property
    def speculative_stats(self) -> SpeculativeStats | None:
        """The engine's speculative-decoding counters (None without a speculative_config)."""
        return self.engine.speculative_stats if "speculative_config" in self.engine_kwargs else None

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
        """The prompt text (to show or log). Generating from this string matches control-token spellings in the
        content as control tokens; `chat_prompt` (what chat/chat_stream use) keeps them plain text."""
        from qwen25.chat import render_chat

        return render_chat(self.tokenizer.chat_template, messages, tools=tools,
                           add_generation_prompt=add_generation_prompt, **extra)

    def chat_prompt(self, messages: list[Message], tools: list[dict] | None = None,
                    add_generation_prompt: bool = True, **extra: Any) -> ChatPrompt:
        """The conversation as a `ChatPrompt` (its `.text` is apply_chat_template's string) that generate/stream
        accept: control-token spellings in content stay plain text unless allow_special_tokens_in_content."""
        return chat_prompt(self.tokenizer.chat_template, messages, tools, add_generation_prompt,
                           template_kwargs=extra, control_tokens=self.tokenizer.added_tokens,
                           allow_special_tokens_in_content=self.allow_special_tokens_in_content)

    def chat(self, messages: list[Message] | list[list[Message]], sampling_params: SamplingParams | None = None,
             tools: list[dict] | None = None, use_tqdm: bool = False) -> list[RequestOutput]:
        """Generate the assistant's reply to one conversation or to a list of conversations."""
        conversations = _as_conversations(messages)
        prompts = [self.chat_prompt(c, tools=tools) for c in conversations]
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    def chat_stream(self, messages: list[Message], sampling_params: SamplingParams | None = None,
                    tools: list[dict] | None = None) -> Iterator[TextDelta]:
        return self.stream([self.chat_prompt(messages, tools=tools)], sampling_params)

    # --- generation --------------------------------------------------------------------------------
    @property
    def engine(self) -> LLMEngine:
        """The continuous-batching engine that generate/stream run on (created on first use; its prefix cache
        persists across calls, so a chat's history is not recomputed every turn)."""
        engine = self.__dict__.get("_engine")
        if engine is None:
            engine = self.__dict__["_engine"] = LLMEngine.from_checkpoint(self.checkpoint, **self.engine_kwargs)
        return engine

    def generate(self, prompts: Prompts, sampling_params: SamplingParams | None = None,
                 use_tqdm: bool = False) -> list[RequestOutput]:
        """Complete each prompt (text, token ids, or a `chat_prompt`). Returns one RequestOutput per prompt, in
        order. Control tokens written in a text prompt are control tokens (it is raw model input)."""
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
            accumulate(outputs[r].outputs[k], step)
            if step.finish_reason is not None and progress is not None:
                progress.update(1)
        if progress is not None:
            progress.close()
        return outputs

    def stream(self, prompts: Prompts, sampling_params: SamplingParams | None = None) -> Iterator[TextDelta]:
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

    def _encode_prompts(self, prompts: Prompts) -> tuple[list[str | None], list[list[int]]]:
        if isinstance(prompts, (str, ChatPrompt)):
            prompts = [prompts]
        if not prompts:
            raise ValueError("no prompts given")
        texts: list[str | None] = []
        id_lists: list[list[int]] = []
        for p in prompts:
            if isinstance(p, ChatPrompt):
                texts.append(p.text)
                id_lists.append(p.token_ids(self.tokenizer))
            elif isinstance(p, str):
                texts.append(p)
                id_lists.append(self.tokenizer.encode(p))
            else:
                texts.append(None)
                id_lists.append([int(t) for t in p])
        for ids in id_lists:
            self.engine.check_prompt(ids)
        return texts, id_lists

    def _run(self, id_lists: list[list[int]], params: SamplingParams) -> Iterator[tuple[tuple[int, int], StepOutput]]:
        """Submit one engine request per prompt (its n samples share the prefill) and yield ((prompt, sample),
        output) as the engine produces them. Closing the iterator early aborts what is left. Several iterators
        may be live at once: each routes the others' outputs to them through `_inbox`."""
        engine = self.engine
        inbox: dict[tuple[str, int], list[StepOutput]] = self.__dict__.setdefault("_inbox", {})
        call = next(_calls)
        owners: dict[str, int] = {}
        try:
            for r, ids in enumerate(id_lists):
                request_id = f"llm-{call}-{r}"
                engine.add_request(request_id, ids, params)
                owners[request_id] = r
                for k in range(params.n):
                    inbox[request_id, k] = []
            live = [(rid, k) for rid in owners for k in range(params.n)]
            while live:
                mine = [out for key in live for out in inbox[key]]
                if not mine:
                    for out in engine.step():
                        if (out.request_id, out.index) in inbox:  # outputs of abandoned requests are dropped
                            inbox[out.request_id, out.index].append(out)
                    continue
                for key in live:
                    inbox[key] = []
                for out in mine:
                    if out.finish_reason is not None:
                        del inbox[out.request_id, out.index]
                    yield (owners[out.request_id], out.index), out
                live = [key for key in live if key in inbox]
        finally:
            for request_id in owners:
                if any(inbox.pop((request_id, k), None) is not None for k in range(params.n)):
                    engine.abort_request(request_id)


def _as_conversations(messages: list[Message] | list[list[Message]]) -> list[list[Message]]:
    if not messages:
        raise ValueError("messages is empty")
    return [messages] if isinstance(messages[0], dict) else messages  # type: ignore[list-item]
