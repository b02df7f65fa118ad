"""The two OpenAI output formats the generation pipeline renders: chat completions and text completions.

A renderer turns engine outputs into wire data for one request, in both modes: `opening` and `chunks` give the
SSE `choices` entries (stateful: the chat renderer runs one incremental tool-call parser per choice, the text
renderer tracks logprob text offsets), `response` gives the whole non-streamed body from the accumulated
`Choice`s. Outputs may carry any number of new tokens (speculative decoding adds several per step); logprobs are
paired with tokens one to one. Driving the engine, SSE framing, usage and metrics live in `server.pipeline`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from qwen25.chat.tool_parser import ToolCallDelta, ToolCallParser, collect
from qwen25.server.pipeline import Choice
from qwen25.server.planner import Plan
from qwen25.server.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatCompletionResponse,
    CompletionChoice,
    CompletionResponse,
    FunctionCall,
    ToolCall,
    Usage,
)

Logprobs = Sequence[tuple[float, list[tuple[int, float]]]]  # (chosen token's logprob, top (id, logprob) pairs)


class ChatRenderer:
    """chat.completion(.chunk): content and tool-call deltas, "tool_calls" as the finish reason after a call."""

    kind, object, id_prefix = "chat", "chat.completion.chunk", "chatcmpl"

    def __init__(self, tokenizer: Any, plan: Plan) -> None:
        self.tokenizer, self.plan = tokenizer, plan
        names = plan.tool_names
        self.parsers = [ToolCallParser(names) if names is not None else None for _ in range(plan.num_choices)]
        self.has_calls = [False] * plan.num_choices

    def opening(self, index: int) -> list[dict[str, Any]]:
        return [_chat_entry(index, {"role": "assistant", "content": ""})]

    def chunks(self, index: int, out: Any) -> list[dict[str, Any]]:
        parser = self.parsers[index]
        events: list[str | ToolCallDelta] = []
        if parser is not None:
            events = parser.feed(out.new_text)
            if out.finish_reason is not None:
                events += parser.finish()
        elif out.new_text:
            events = [out.new_text]
        delta = chat_delta(events)
        if any(isinstance(e, ToolCallDelta) for e in events):
            self.has_calls[index] = True
        lp = chat_logprobs(self.tokenizer, out.new_token_ids, out.logprobs or []) if self.plan.want_logprobs else None
        entries = []
        if delta or (lp and lp["content"]):
            entries.append(_chat_entry(index, delta, lp))
        if out.finish_reason is not None:
            reason = "tool_calls" if self.has_calls[index] and out.finish_reason == "stop" else out.finish_reason
            entries.append(_chat_entry(index, {}, None, reason))
        return entries

    def response(self, request_id: str, model: str, choices: Sequence[Choice], usage: Usage) -> ChatCompletionResponse:
        out = []
        for i, c in enumerate(choices):
            content, calls = c.text, []
            if self.plan.tool_names is not None:
                parser = ToolCallParser(self.plan.tool_names)
                content, parsed = collect(parser.feed(c.text) + parser.finish())
                calls = [ToolCall(id=p.id, function=FunctionCall(name=p.name, arguments=p.arguments)) for p in parsed]
            reason = "tool_calls" if calls and c.finish_reason == "stop" else c.finish_reason
            lp = chat_logprobs(self.tokenizer, c.token_ids, c.logprobs) if self.plan.want_logprobs else None
            out.append(ChatChoice(index=i, message=AssistantMessage(content=content, tool_calls=calls or None),
                                  logprobs=lp, finish_reason=reason))
        return ChatCompletionResponse(id=request_id, model=model, choices=out, usage=usage)


class CompletionRenderer:
    """text_completion: text deltas (after the echoed prompt, if asked), logprobs with running text offsets."""

    kind, object, id_prefix = "completion", "text_completion", "cmpl"

    def __init__(self, tokenizer: Any, plan: Plan) -> None:
        self.tokenizer, self.plan = tokenizer, plan
        self.offsets = [0] * plan.num_choices

    def echo(self, index: int) -> str:
        """The prompt text choice `index` starts with ("" without echo); choices are prompt-major."""
        return self.plan.echo_texts[index // self.plan.n] if self.plan.echo_texts else ""

    def opening(self, index: int) -> list[dict[str, Any]]:
        return [_text_entry(index, self.echo(index))] if self.plan.echo_texts else []

    def chunks(self, index: int, out: Any) -> list[dict[str, Any]]:
        lp = None
        if self.plan.want_logprobs:
            lp = completion_logprobs(self.tokenizer, out.new_token_ids, out.logprobs or [], self.offsets[index])
            self.offsets[index] += sum(len(t) for t in lp["tokens"])
        if out.new_text or lp or out.finish_reason is not None:
            return [_text_entry(index, out.new_text, lp, out.finish_reason)]
        return []

    def response(self, request_id: str, model: str, choices: Sequence[Choice], usage: Usage) -> CompletionResponse:
        out = []
        for i, c in enumerate(choices):
            lp = completion_logprobs(self.tokenizer, c.token_ids, c.logprobs, 0) if self.plan.want_logprobs else None
            out.append(CompletionChoice(index=i, text=self.echo(i) + c.text, logprobs=lp,
                                        finish_reason=c.finish_reason))
        return CompletionResponse(id=request_id, model=model, choices=out, usage=usage)


# --- wire pieces -----------------------------------------------------------------------------------
def _chat_entry(index: int, delta: dict[str, Any], logprobs: dict[str, Any] | None = None,
                finish: str | None = None) -> dict[str, Any]:
    return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}


def _text_entry(index: int, text: str, logprobs: dict[str, Any] | None = None,
                finish: str | None = None) -> dict[str, Any]:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}


def chat_delta(events: Sequence[str | ToolCallDelta]) -> dict[str, Any]:
    """Parser events -> one chat `delta`: joined content, and tool-call deltas merged per call index."""
    content = "".join(e for e in events if isinstance(e, str))
    calls: list[dict[str, Any]] = []
    for e in events:
        if not isinstance(e, ToolCallDelta):
            continue
        if e.id is not None:
            calls.append({"index": e.index, "id": e.id, "type": "function",
                          "function": {"name": e.name, "arguments": e.arguments}})
        elif calls and calls[-1]["index"] == e.index:
            calls[-1]["function"]["arguments"] += e.arguments
        else:
            calls.append({"index": e.index, "function": {"arguments": e.arguments}})
    delta: dict[str, Any] = {}
    if content:
        delta["content"] = content
    if calls:
        delta["tool_calls"] = calls
    return delta


def token_text(tokenizer: Any, token_id: int) -> str:
    return tokenizer.token_bytes(token_id).decode("utf-8", errors="replace")


def chat_logprobs(tokenizer: Any, token_ids: Sequence[int], logprobs: Logprobs) -> dict[str, Any]:
    """OpenAI chat logprobs: {"content": [{token, logprob, bytes, top_logprobs}, ...]}."""
    content = []
    for token_id, (lp, top) in zip(token_ids, logprobs):
        content.append({"token": token_text(tokenizer, token_id), "logprob": lp,
                        "bytes": list(tokenizer.token_bytes(token_id)),
                        "top_logprobs": [{"token": token_text(tokenizer, t), "logprob": v,
                                          "bytes": list(tokenizer.token_bytes(t))} for t, v in top]})
    return {"content": content}


def completion_logprobs(tokenizer: Any, token_ids: Sequence[int], logprobs: Logprobs, offset: int) -> dict[str, Any]:
    """Legacy completions logprobs: parallel lists, with each token's character offset from `offset` on."""
    tokens, values, tops, offsets = [], [], [], []
    for token_id, (lp, top) in zip(token_ids, logprobs):
        text = token_text(tokenizer, token_id)
        tokens.append(text)
        values.append(lp)
        tops.append({token_text(tokenizer, t): v for t, v in top})
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}


__all__ = ["ChatRenderer", "CompletionRenderer", "chat_delta", "chat_logprobs", "completion_logprobs"]
