"""Chat-template rendering: a checkpoint's own Jinja template, run the way HF transformers runs it.

Owns the Jinja environment (sandboxed, configured like transformers' `apply_chat_template` so the
same template renders the same string), the compiled-template cache, `render_chat`, and the
ChatML fallback for checkpoints that ship no template. Message validation lives in
`chat.messages`; tokenization of the rendered string does not live here.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from qwen25.chat.messages import normalize_messages

DEFAULT_SYSTEM_PROMPT = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."

# Used only when a checkpoint has no `tokenizer.chat_template` (e.g. one we pretrained ourselves).
# Plain ChatML with Qwen2.5-Instruct's conventions, so its output matches the Qwen2.5 template
# byte for byte (tests check this): the default system prompt is injected when messages[0] is
# not a system message (SPEC §3.1); tools go into the system turn one JSON object per line;
# tool calls are `<tool_call>` blocks; consecutive tool results share one user turn (SPEC §3.2).
FALLBACK_CHAT_TEMPLATE = r"""
{%- if messages and messages[0].role == 'system' %}
    {%- set system_text = messages[0].content %}
    {%- set turns = messages[1:] %}
{%- else %}
    {%- set system_text = 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' %}
    {%- set turns = messages %}
{%- endif %}
{{- '<|im_start|>system\n' + system_text }}
{%- if tools %}
    {{- '\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n' }}
    {{- 'You are provided with function signatures within <tools></tools> XML tags:\n<tools>' }}
    {%- for tool in tools %}
        {{- '\n' + tool | tojson }}
    {%- endfor %}
    {{- '\n</tools>\n\nFor each function call, return a json object with function name and arguments' }}
    {{- ' within <tool_call></tool_call> XML tags:\n<tool_call>\n' }}
    {{- '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>' }}
{%- endif %}
{{- '<|im_end|>\n' }}
{%- for message in turns %}
    {%- if message.role == 'tool' %}
        {#- consecutive tool results share one user turn #}
        {%- if loop.first or loop.previtem.role != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}
        {{- '\n<tool_response>\n' + message.content + '\n</tool_response>' }}
        {%- if loop.last or loop.nextitem.role != 'tool' %}{{- '<|im_end|>\n' }}{%- endif %}
    {%- elif message.role == 'assistant' and message.tool_calls %}
        {{- '<|im_start|>assistant' }}
        {%- if message.content %}{{- '\n' + message.content }}{%- endif %}
        {%- for call in message.tool_calls %}
            {%- set fn = call.function if call.function is defined else call %}
            {{- '\n<tool_call>\n{"name": "' + fn.name + '", "arguments": ' + fn.arguments | tojson + '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}
"""


class ChatTemplateError(jinja2.TemplateError, ValueError):
    """The template refused the conversation (`raise_exception`) or failed to compile/render.

    A ValueError so callers (the server) can treat it as bad input; a jinja2.TemplateError so
    code written against transformers' behaviour still catches it.
    """


def render_chat(
    template: str | None,
    messages: Sequence[Mapping[str, Any]],
    tools: Sequence[Mapping[str, Any]] | None = None,
    add_generation_prompt: bool = True,
    **extra: Any,
) -> str:
    """Render `messages` (and `tools`) with a chat template; None/"" selects FALLBACK_CHAT_TEMPLATE.

    Messages go through `normalize_messages` first (validation, text-part joining, JSON-string
    tool arguments parsed to objects). `tools` are passed through unchanged, OpenAI-style
    `{"type": "function", "function": {...}}` dicts included. `extra` becomes template variables,
    e.g. `bos_token`/`eos_token`, which transformers always supplies from the tokenizer.
    """
    if tools is not None:
        if isinstance(tools, (str, bytes, Mapping)) or not isinstance(tools, Sequence):
            raise ValueError(f"tools must be a list of dicts, got {type(tools).__name__}")
        for i, tool in enumerate(tools):
            if not isinstance(tool, Mapping):
                raise ValueError(f"tools[{i}] must be a dict (a JSON schema), got {type(tool).__name__}")
        tools = list(tools)
    normalized = normalize_messages(messages)
    compiled = compile_template(chat_template_or_fallback(template))
    # transformers always defines `documents` (None unless given); mirror it for templates that test it.
    extra.setdefault("documents", None)
    try:
        return compiled.render(messages=normalized, tools=tools,
                               add_generation_prompt=add_generation_prompt, **extra)
    except (ChatTemplateError, jinja2.exceptions.SecurityError):
        raise  # already specific; a sandbox violation is the template's fault, not bad input
    except jinja2.TemplateError as e:  # e.g. UndefinedError from a message shape the template can't handle
        raise ChatTemplateError(f"chat template failed to render: {e}") from e


def chat_template_or_fallback(chat_template: str | None) -> str:
    """The checkpoint's template if it has one, else the ChatML fallback."""
    return chat_template if chat_template else FALLBACK_CHAT_TEMPLATE


@lru_cache(maxsize=16)
def compile_template(template: str) -> jinja2.Template:
    """Compile once per distinct template string (a fresh environment each, as transformers does)."""
    try:
        return _make_environment().from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise ChatTemplateError(f"chat template does not compile (line {e.lineno}): {e.message}") from e


# ---


def _make_environment() -> ImmutableSandboxedEnvironment:
    """A sandbox matching transformers' chat-template environment.

    Same options (trim_blocks, lstrip_blocks, loop controls, no keep_trailing_newline) and the same
    extra names (`tojson`, `raise_exception`, `strftime_now`, a restricted `dict` and `namespace`),
    because templates from the Hub are written against exactly that environment. The
    `{% generation %}` tag (assistant-mask tracking) is not supported; no Qwen2.5 template uses it.
    """
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _TemplateNamespace
    return env


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | str | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # Jinja's built-in tojson HTML-escapes <, >, & and ' (as \u003c ...) and only takes `indent`;
    # chat templates expect plain json.dumps output with non-ASCII kept as-is.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_exception(message: str) -> None:
    raise ChatTemplateError(message)


def _strftime_now(fmt: str) -> str:
    # Local time, like transformers; templates use it for "Today's date" lines.
    return datetime.now().strftime(fmt)


class _TemplateDict:
    """`dict(...)` and `dict.fromkeys(...)` for templates, without exposing the `dict` type itself."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any) -> dict:
        return dict.fromkeys(*args)


class _TemplateNamespace(jinja2.utils.Namespace):
    """Jinja's `namespace()` minus underscore-prefixed attributes (a route towards CPython internals)."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # noqa: N805 - jinja's own signature trick, keeps `self=` usable
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(
                f"chat templates may not set underscore-prefixed namespace attributes (got {name!r})")


__all__ = ["DEFAULT_SYSTEM_PROMPT", "FALLBACK_CHAT_TEMPLATE", "ChatTemplateError", "chat_template_or_fallback",
           "compile_template", "render_chat"]
