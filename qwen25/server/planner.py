"""The request planner: an OpenAI chat or text-completion request in, a `Plan` of engine work out.

Owns everything decided before the engine sees a request: rendering the chat (via `qwen25.chat`), tokenization
(off the event loop for long texts), context-length checks, the request's `SamplingParams` (n, seed), logit_bias,
tool_choice, and the structured-output constraint compiled to an llguidance grammar. Every refusal is a 400
`APIError` naming the field. It does not submit anything to the engine or format responses (`server.pipeline`).
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from qwen25.chat.format import FIM_PREFIX, fim_prompt
from qwen25.chat.prompt import ChatPrompt, chat_prompt
from qwen25.sampling_params import SamplingParams
from qwen25.server import structured as so
from qwen25.server.config import ServerConfig
from qwen25.server.errors import bad_request
from qwen25.server.limits import check_chat, check_completion
from qwen25.server.protocol import ChatCompletionRequest, CompletionRequest, SamplingFields

LONG_TEXT = 20_000  # characters; longer prompts are tokenized off the event loop
PREFIX_CHARS_PER_TOKEN = 8  # a text this many times the context in characters is first measured by a prefix


@dataclass
class Plan:
    """Everything decided about a generation request before it reaches the engine."""

    prompt_ids: list[list[int]]      # one entry per prompt (chat: exactly one)
    params: SamplingParams           # for every prompt; params.n choices each (the engine seeds sample k seed+k)
    grammar: str | None
    logit_bias: dict[int, float] | None
    tool_names: list[str] | None     # parse tool calls when set
    echo_texts: list[str] | None = None  # completions with echo: each prompt's text, sent before its output
    grammar_tokens: tuple[str, ...] = ()  # control tokens the grammar names itself (the tool-call grammar's)

    @property
    def n(self) -> int:
        """Choices per prompt."""
        return self.params.n

    @property
    def num_choices(self) -> int:
        """Every prompt times every sample, prompt-major (choice index = prompt * n + sample)."""
        return len(self.prompt_ids) * self.params.n

    @property
    def want_logprobs(self) -> bool:
        return self.params.logprobs is not None


class RequestPlanner:
    def __init__(self, tokenizer: Any, config: ServerConfig, structured: so.StructuredOutputs) -> None:
        self.tokenizer, self.config, self.structured = tokenizer, config, structured

    # --- the two plans -------------------------------------------------------------------------------
    async def chat(self, req: ChatCompletionRequest) -> Plan:
        check_chat(req, self.config.limits, self.config.max_pending)
        tools = [t.model_dump(exclude_none=True) for t in req.tools] if req.tools else None
        choice = req.tool_choice if req.tool_choice is not None else ("auto" if tools else "none")
        named = None if isinstance(choice, str) else choice.function.name
        if choice != "none" and not tools:
            raise bad_request(f"tool_choice {choice if isinstance(choice, str) else named!r} needs tools",
                              "tool_choice")
        if named is not None and named not in {t["function"]["name"] for t in tools or []}:
            raise bad_request(f"tool_choice names function {named!r}, which is not in tools", "tool_choice")
        prompt_tools = tools if choice != "none" else None
        messages = [m.model_dump(exclude_none=True) for m in req.messages]
        text = await asyncio.to_thread(self.render, messages, prompt_tools, req.add_generation_prompt,
                                       req.continue_final_message, req.chat_template_kwargs)
        await self.check_length(text, "messages")
        prompt_ids = await self.encode(text)
        max_tokens = self.check_context(len(prompt_ids), req.max_completion_tokens or req.max_tokens)
        top = (req.top_logprobs or 0) if req.logprobs else None
        if req.top_logprobs and not req.logprobs:
            raise bad_request("top_logprobs needs logprobs: true", "top_logprobs")
        grammar = await self.constraint(req, req.response_format)
        grammar_tokens: tuple[str, ...] = ()
        if choice == "required" or named is not None:
            if grammar is not None:
                raise bad_request("tool_choice 'required' or a named function cannot be combined with another "
                                  "output constraint", "tool_choice")
            grammar = await self.compile("tool_choice", lambda: so.tool_call_grammar(
                tools or [], named, req.parallel_tool_calls), so.TOOL_CALL_TOKENS)
            grammar_tokens = so.TOOL_CALL_TOKENS
        return Plan([prompt_ids], self.sampling_params(req, max_tokens, top), grammar, self.logit_bias(req),
                    [t["function"]["name"] for t in tools] if tools and choice != "none" else None,
                    grammar_tokens=grammar_tokens)

    async def completion(self, req: CompletionRequest) -> Plan:
        check_completion(req, self.config.limits, self.config.max_pending)
        if req.best_of is not None and req.best_of != req.n:
            raise bad_request("best_of other than n is not supported", "best_of")
        if req.echo and req.logprobs is not None:
            raise bad_request("echo together with logprobs (prompt logprobs) is not supported", "echo")
        prompts = await self.completion_prompts(req)
        if req.suffix is not None and len(prompts) != 1:
            raise bad_request("suffix works with a single text prompt", "suffix")
        max_new = min(self.check_context(len(ids), req.max_tokens, "prompt") for _, ids in prompts)
        grammar = await self.constraint(req, req.response_format)
        return Plan([ids for _, ids in prompts], self.sampling_params(req, max_new, req.logprobs), grammar,
                    self.logit_bias(req), None, [t or "" for t, _ in prompts] if req.echo else None)

    # --- prompts -------------------------------------------------------------------------------------
    async def encode(self, text: str | ChatPrompt) -> list[int]:
        """Ids of a text prompt (control tokens as written) or of a chat prompt (content as plain text)."""
        if isinstance(text, ChatPrompt):
            return await asyncio.to_thread(text.token_ids, self.tokenizer)
        if len(text) > LONG_TEXT:
            return await asyncio.to_thread(self.tokenizer.encode, text)
        return self.tokenizer.encode(text)

    async def check_length(self, prompt: str | ChatPrompt, what: str) -> None:
        """A 400 for a text far too long for the context, without tokenizing all of it (a few MB take seconds):
        the tokens of a prefix cut at a space after a non-space (a pre-token boundary of byte-level BPE, so the
        whole text has at least as many; a chat prompt's content, encoded as plain text, has more) already reach
        the limit."""
        text = prompt if isinstance(prompt, str) else prompt.text
        limit = self.config.max_model_len
        cut = text.rfind(" ", 0, PREFIX_CHARS_PER_TOKEN * limit) if len(text) > PREFIX_CHARS_PER_TOKEN * limit else -1
        for _ in range(64):
            if cut <= 0 or not text[cut - 1].isspace():
                break
            cut = text.rfind(" ", 0, cut - 1)
        if cut <= 0 or text[cut - 1].isspace():
            return
        prefix = text[:cut]
        batch = getattr(self.tokenizer, "encode_batch", None)  # lets go of the GIL while it works
        count = len((await asyncio.to_thread(batch, [prefix]))[0]) if batch else len(await self.encode(prefix))
        if count >= limit:
            raise bad_request(f"This model's maximum context length is {limit} tokens. However, your {what} "
                              f"resulted in more than {count} tokens. Please reduce the length of the {what}.",
                              what, "context_length_exceeded")

    def render(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None,
               add_generation_prompt: bool = True, continue_final: bool = False,
               extra: dict[str, Any] | None = None) -> ChatPrompt:
        """The chat prompt, control-token spellings in content kept plain text (`qwen25.chat.prompt`) unless
        config.allow_special_tokens_in_content; a 400 on `messages` when the template or the chat rules refuse it."""
        try:
            return chat_prompt(getattr(self.tokenizer, "chat_template", None), messages, tools,
                               add_generation_prompt, continue_final, extra,
                               control_tokens=getattr(self.tokenizer, "added_tokens", ()),
                               allow_special_tokens_in_content=self.config.allow_special_tokens_in_content)
        except ValueError as e:
            raise bad_request(str(e), "messages") from None

    async def completion_prompts(self, req: CompletionRequest) -> list[tuple[str | None, list[int]]]:
        """(text or None, token ids) per prompt; text prompts are encoded, id prompts range-checked."""
        p = req.prompt
        if isinstance(p, str):
            texts: list[str] | None = [p]
        elif p and all(isinstance(x, str) for x in p):
            texts = list(p)  # type: ignore[arg-type]
        else:
            texts = None
        if texts is not None:
            if not texts:
                raise bad_request("prompt is empty", "prompt")
            if req.suffix is not None:
                if len(texts) != 1:
                    raise bad_request("suffix works with a single text prompt", "suffix")
                return [(texts[0], await self.encode(self.fim_prompt(texts[0], req.suffix)))]
            for t in texts:
                await self.check_length(t, "prompt")
            out = [(t, await self.encode(t)) for t in texts]
        else:
            lists = [p] if p and isinstance(p[0], int) else p
            out = [(None, list(ids)) for ids in lists]  # type: ignore[union-attr]
            for _, ids in out:
                bad = [t for t in ids if not 0 <= t < self.config.vocab_size]
                if bad:
                    raise bad_request(f"prompt token ids out of range [0, {self.config.vocab_size}): {bad[:5]}",
                                      "prompt")
            if req.echo:
                out = [(self.tokenizer.decode(ids), ids) for _, ids in out]
        if not out or any(not ids for _, ids in out):
            raise bad_request("prompt is empty: nothing to condition on", "prompt")
        return out

    def fim_prompt(self, prefix: str, suffix: str) -> str:
        if self.tokenizer.token_to_id(FIM_PREFIX) is None:
            raise bad_request("suffix (fill-in-the-middle) needs a model with FIM tokens", "suffix")
        return fim_prompt(prefix, suffix)

    # --- limits and sampling -------------------------------------------------------------------------
    def check_context(self, n_prompt: int, max_tokens: int | None, what: str = "messages") -> int:
        """The number of tokens to generate at most; 400 naming both counts when they do not fit."""
        limit = self.config.max_model_len
        if n_prompt >= limit:
            raise bad_request(f"This model's maximum context length is {limit} tokens. However, your {what} "
                              f"resulted in {n_prompt} tokens (at least 1 must remain for the completion). Please "
                              f"reduce the length of the {what}.", what, "context_length_exceeded")
        if max_tokens is None:
            return limit - n_prompt
        if n_prompt + max_tokens > limit:
            raise bad_request(f"This model's maximum context length is {limit} tokens. However, you requested "
                              f"{n_prompt + max_tokens} tokens ({n_prompt} in the {what}, {max_tokens} in the "
                              f"completion). Please reduce the length of the {what} or completion.", "max_tokens",
                              "context_length_exceeded")
        return max_tokens

    def sampling_params(self, req: SamplingFields, max_tokens: int, logprobs: int | None) -> SamplingParams:
        """The request's SamplingParams: the checkpoint defaults overridden by the request, n samples per prompt
        (with a seed, the engine seeds sample k with seed + k so the choices differ but stay reproducible)."""
        fields = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty",
                  "frequency_penalty")
        overrides: dict[str, Any] = {k: getattr(req, k) for k in fields if getattr(req, k) is not None}
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        try:
            return dataclasses.replace(
                self.config.default_params, **overrides, n=req.n, max_tokens=max_tokens, stop=stop,
                stop_token_ids=list(req.stop_token_ids or []), ignore_eos=req.ignore_eos,
                include_stop_str_in_output=req.include_stop_str_in_output,
                skip_special_tokens=req.skip_special_tokens, logprobs=logprobs, seed=req.seed)
        except ValueError as e:
            raise bad_request(str(e)) from None

    def logit_bias(self, req: SamplingFields) -> dict[int, float] | None:
        if not req.logit_bias:
            return None
        bias = {int(k): float(v) for k, v in req.logit_bias.items()}
        bad = [k for k in bias if not 0 <= k < self.config.vocab_size]
        if bad:
            raise bad_request(f"logit_bias has token ids outside [0, {self.config.vocab_size}): {bad[:5]}",
                              "logit_bias")
        return bias

    # --- structured output ---------------------------------------------------------------------------
    async def constraint(self, req: SamplingFields, response_format: Any) -> str | None:
        """The grammar a request asks for through response_format / guided_* / structured_outputs, if any."""
        so_req = req.structured_outputs
        specs: list[tuple[str, Callable[[], str]]] = []
        if response_format is not None and response_format.type == "json_object":
            specs.append(("response_format", so.json_object_grammar))
        elif response_format is not None and response_format.type == "json_schema":
            js = response_format.json_schema
            if js is None or js.json_schema is None:
                raise bad_request("response_format json_schema needs json_schema.schema", "response_format")
            specs.append(("response_format", lambda: so.json_schema_grammar(js.json_schema)))
        if req.guided_json is not None:
            specs.append(("guided_json", lambda: so.json_schema_grammar(req.guided_json)))
        if req.guided_regex is not None:
            specs.append(("guided_regex", lambda: so.regex_grammar(req.guided_regex)))
        if req.guided_choice is not None:
            specs.append(("guided_choice", lambda: so.choice_grammar(req.guided_choice)))
        if req.guided_grammar is not None:
            specs.append(("guided_grammar", lambda: so.lark_grammar(req.guided_grammar)))
        if so_req is not None:
            if so_req.json_ is not None:
                specs.append(("structured_outputs.json", lambda: so.json_schema_grammar(so_req.json_)))
            if so_req.regex is not None:
                specs.append(("structured_outputs.regex", lambda: so.regex_grammar(so_req.regex)))
            if so_req.choice is not None:
                specs.append(("structured_outputs.choice", lambda: so.choice_grammar(so_req.choice)))
            if so_req.grammar is not None:
                specs.append(("structured_outputs.grammar", lambda: so.lark_grammar(so_req.grammar)))
        if not specs:
            return None
        if len(specs) > 1:
            raise bad_request(f"give at most one output constraint, got {', '.join(s[0] for s in specs)}",
                              specs[1][0])
        name, build = specs[0]
        return await self.compile(name, build)

    async def compile(self, name: str, build: Callable[[], str], allow: tuple[str, ...] = ()) -> str:
        """Build and validate a grammar off the event loop; a 400 `invalid_grammar` if llguidance rejects it."""
        def run() -> str:
            grammar = build()
            self.structured.validate(grammar, name, allow)
            return grammar

        try:
            return await asyncio.to_thread(run)
        except (so.StructuredOutputError, RecursionError) as e:
            raise bad_request(str(e) if not isinstance(e, RecursionError) else f"{name} nests too deeply",
                              name.split(".")[0], "invalid_grammar") from None


__all__ = ["LONG_TEXT", "Plan", "RequestPlanner"]
