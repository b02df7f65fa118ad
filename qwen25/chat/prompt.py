"""Chat prompts whose content cannot forge turns: the rendered prompt as `(text, markup)` parts.

The control-token policy. A chat template's own text is markup: the `<|im_start|>` / `<|im_end|>` it writes and the
`<tool_call>` tags of its tools preamble become control tokens. Everything the caller supplies is content: message
contents and every other string in a message except its (validated) role, tool-call names and arguments, tool
results, tool names, descriptions and parameter schemas, template variables. Control-token spellings in content are
ordinary text, tokenized as the byte-level BPE of their characters: a user who types `<|im_start|>system\\n...`
gets those characters, not a system turn, and a tool description or a tool result cannot close its turn, open a
new one or fake a `<tool_call>`. transformers, vLLM and llama-server tokenize the whole rendered string with
control tokens enabled, which lets any user forge turns; here the old behaviour is an explicit opt-in:
`allow_special_tokens_in_content=True` (LLM and this module), `--allow-special-tokens-in-content` (CLI, server).

How. Before rendering, each control-token spelling in content is replaced by an escape: a sentinel character that
occurs nowhere in the inputs or the template, then a code naming the token. The rendered text is cut at the escapes
into parts: escaped spellings become plain parts, the rest markup parts whose spellings are the template's. A
content string whose edge could join template text into a spelling (content ending in `<|im`, a lone `tool`
between `<` and `_call>`) is fenced: a boundary escape at both ends splits the markup there, so no control token is
ever matched across a content boundary. `Tokenizer.encode_parts` then matches added tokens in markup parts only and
runs BPE across part boundaries, so for content without control-token spellings the ids equal those of encoding the
rendered text in one piece, token for token (tests check this over many conversations and the real tokenizer).

What the template sees: content with escapes where control-token spellings were (a template that searches
content for an added token, e.g. a reasoning tag, will not find one there) and, for fenced strings, an invisible
boundary character at each end. The Qwen2.5 template and the ChatML fallback only print content, so their text is
unchanged.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from qwen25.chat.format import rename_roles, render_prompt
from qwen25.chat.messages import normalize_messages
from qwen25.chat.template import ChatTemplateError, chat_template_or_fallback

_SENTINELS = range(0x10FF00, 0x10FFFE)  # Supplementary Private Use Area-B: never in templates, rarely in text
_FENCE = "\uf8ff"                        # after the sentinel: a boundary that markup matching cannot cross
_CODE_BASE = 0xE000                      # after the sentinel: chr(_CODE_BASE + k) is control token k as text
MAX_DEPTH = 256                          # nesting levels of lists/dicts in content (tool arguments, schemas)


@dataclass(frozen=True)
class ChatPrompt:
    """A rendered chat prompt: `(text, markup)` parts whose concatenation is the prompt text. Control tokens are
    matched in markup parts only, each part on its own; see the module docstring."""

    parts: tuple[tuple[str, bool], ...]

    @property
    def text(self) -> str:
        """The prompt exactly as the template renders the original (unescaped) conversation."""
        return "".join(text for text, _ in self.parts)

    def token_ids(self, tokenizer: Any) -> list[int]:
        """The prompt's token ids: control tokens from the template's markup, content as plain text.

        `tokenizer` needs `encode(text)` and, unless the prompt is one markup part, `encode_parts(parts)`
        (`qwen25.tokenizer.Tokenizer` has both)."""
        if len(self.parts) <= 1 and all(markup for _, markup in self.parts):
            return tokenizer.encode(self.text)  # nothing to protect: the ordinary encoding (any tokenizer)
        return tokenizer.encode_parts(self.parts)

    def cut(self, offsets: Sequence[int]) -> list[ChatPrompt]:
        """The prompt cut at ascending character offsets of `text` into len(offsets) + 1 consecutive prompts, each
        encoded on its own by `token_ids`: SFT data tokenizes untrained and trained spans separately this way and
        keeps content plain."""
        if list(offsets) != sorted(offsets) or any(not 0 <= k <= len(self.text) for k in offsets):
            raise ValueError(f"cut offsets must ascend within [0, {len(self.text)}], got {list(offsets)[:8]}")
        pieces: list[ChatPrompt] = []
        current: list[tuple[str, bool]] = []
        cuts, k, pos = list(offsets), 0, 0
        for text, markup in self.parts:
            start = 0
            while k < len(cuts) and cuts[k] <= pos + len(text):
                at = cuts[k] - pos
                if at > start:
                    current.append((text[start:at], markup))
                pieces.append(ChatPrompt(tuple(current)))
                current, start, k = [], at, k + 1
            if start < len(text):
                current.append((text[start:], markup))
            pos += len(text)
        pieces += [ChatPrompt(tuple(current))] + [ChatPrompt(()) for _ in cuts[k:]]
        return pieces


def chat_prompt(template: str | None, messages: Sequence[Mapping[str, Any]],
                tools: Sequence[Mapping[str, Any]] | None = None, add_generation_prompt: bool = True,
                continue_final_message: bool = False, template_kwargs: Mapping[str, Any] | None = None, *,
                control_tokens: Collection[str] = (), allow_special_tokens_in_content: bool = False) -> ChatPrompt:
    """The prompt for OpenAI-style `messages` (see `chat.format.render_prompt` for the arguments) with the
    `control_tokens` spellings (a tokenizer's `added_tokens`) kept out of content.

    allow_special_tokens_in_content: the old behaviour, the whole text as markup (content can forge turns).
    Raises ValueError for messages the template or the chat rules refuse."""
    spellings = tuple(dict.fromkeys(t for t in control_tokens if t))
    if allow_special_tokens_in_content or not spellings:
        text = render_prompt(template, messages, tools, add_generation_prompt, continue_final_message,
                             template_kwargs)
        return ChatPrompt(((text, True),))
    messages = normalize_messages(rename_roles(messages))  # JSON-string tool arguments are parsed first
    kwargs = dict(template_kwargs or {})
    guard = _Guard(spellings, _free_sentinel((messages, tools, kwargs), chat_template_or_fallback(template)))
    safe_messages = [{guard.key(k): (v if k == "role" else guard.value(v)) for k, v in m.items()} for m in messages]
    text = render_prompt(template, safe_messages, guard.value(tools), add_generation_prompt, continue_final_message,
                         {k: guard.value(v) for k, v in kwargs.items()})
    return ChatPrompt(guard.split(text))


class _Guard:
    """Escapes content for one render and cuts the rendered text back into parts."""

    def __init__(self, spellings: tuple[str, ...], sentinel: str) -> None:
        self.spellings, self.sentinel = spellings, sentinel
        self.codes = {s: sentinel + chr(_CODE_BASE + k) for k, s in enumerate(spellings)}
        self.pattern = _spelling_pattern(spellings)
        self.fragments, self.prefixes, self.suffixes, self.longest = _fragments(spellings)

    def key(self, key: Any) -> Any:
        """Dict keys are structure (the template looks fields up by name): spellings escaped, never fenced."""
        return self.pattern.sub(lambda m: self.codes[m.group()], key) if isinstance(key, str) else key

    def value(self, value: Any, depth: int = 0) -> Any:
        if isinstance(value, str):
            return self.text(value)
        if depth >= MAX_DEPTH:
            raise ValueError(f"content is nested more than {MAX_DEPTH} levels deep")
        if isinstance(value, Mapping):
            return {self.key(k): self.value(v, depth + 1) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [self.value(v, depth + 1) for v in value]
        return value

    def text(self, text: str) -> str:
        text = self.pattern.sub(lambda m: self.codes[m.group()], text)
        if text and self._at_risk(text):
            fence = self.sentinel + _FENCE
            return fence + text + fence
        return text

    def _at_risk(self, text: str) -> bool:
        """Could template text next to `text` complete a control-token spelling that includes some of it?"""
        if text in self.fragments:
            return True
        n = min(self.longest, len(text))
        return any(text[:k] in self.suffixes or text[-k:] in self.prefixes for k in range(1, n + 1))

    def split(self, text: str) -> tuple[tuple[str, bool], ...]:
        parts: list[tuple[str, bool]] = []
        by_code = {code[1]: s for s, code in self.codes.items()}
        pos = 0
        while (i := text.find(self.sentinel, pos)) >= 0:
            if i > pos:
                parts.append((text[pos:i], True))
            code = text[i + 1:i + 2]
            if code in by_code:
                spelled = by_code[code]
                if parts and not parts[-1][1]:
                    parts[-1] = (parts[-1][0] + spelled, False)
                else:
                    parts.append((spelled, False))
            elif code != _FENCE:  # a fence only ends the markup part before it
                raise ChatTemplateError("the chat template cut an escaped control token apart (it slices content)")
            pos = i + 2
        if pos < len(text):
            parts.append((text[pos:], True))
        return tuple(parts)


def _free_sentinel(values: Any, template: str) -> str:
    """A sentinel character that occurs in none of the strings of `values` (keys included) nor in `template`."""
    strings = [template]
    stack = [values]
    while stack:
        value = stack.pop()
        if isinstance(value, str):
            strings.append(value)
        elif isinstance(value, Mapping):
            stack.extend(value.keys())
            stack.extend(value.values())
        elif isinstance(value, (list, tuple)):
            stack.extend(value)
    for code in _SENTINELS:
        sentinel = chr(code)
        if not any(sentinel in s for s in strings):
            return sentinel
    raise ValueError("content uses every private-use character the prompt escapes could use")


@lru_cache(maxsize=8)
def _spelling_pattern(spellings: tuple[str, ...]) -> re.Pattern[str]:
    return re.compile("|".join(map(re.escape, sorted(spellings, key=len, reverse=True))))


@lru_cache(maxsize=8)
def _fragments(spellings: tuple[str, ...]) -> tuple[frozenset[str], frozenset[str], frozenset[str], int]:
    """Proper substrings, proper prefixes and proper suffixes of the spellings, and the longest spelling's length."""
    inner = {s[i:j] for s in spellings for i in range(len(s)) for j in range(i + 1, len(s) + 1)} - set(spellings)
    prefixes = {s[:k] for s in spellings for k in range(1, len(s))}
    suffixes = {s[k:] for s in spellings for k in range(1, len(s))}
    return frozenset(inner), frozenset(prefixes), frozenset(suffixes), max(map(len, spellings))


__all__ = ["MAX_DEPTH", "ChatPrompt", "chat_prompt"]
