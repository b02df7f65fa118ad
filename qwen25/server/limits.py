"""Per-request bounds (`config.Limits`) on a validated request, checked before any tokenizing or compiling.

Owns the configurable limits (stop strings, n, logit_bias, tools, schema and grammar sizes, prompts, token ids),
the shape rules for tools (OpenAI's name pattern, `parameters` an object schema), reserved `chat_template_kwargs`
names, and the nesting of JSON carried inside strings (tool-call arguments, schemas given as text), which the body
check cannot see. Every refusal is a 400 naming the field; none of this touches the engine.
"""

from __future__ import annotations

import json
import re
from typing import Any

from qwen25.server.body import check_value
from qwen25.server.config import Limits
from qwen25.server.errors import bad_request
from qwen25.server.protocol import ChatCompletionRequest, CompletionRequest, SamplingFields

TOOL_NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")
IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
# Names the renderer passes to the template itself (or Python's own `self`): a request may not redefine them.
RESERVED_TEMPLATE_KWARGS = frozenset({"messages", "tools", "add_generation_prompt", "continue_final_message",
                                      "template", "self"})


def check_sampling(req: SamplingFields, limits: Limits, max_pending: int) -> None:
    stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stops) > limits.max_stop_strings:
        raise bad_request(f"at most {limits.max_stop_strings} stop strings, got {len(stops)}", "stop")
    long = [len(s) for s in stops if len(s) > limits.max_stop_chars]
    if long:
        raise bad_request(f"stop strings may be at most {limits.max_stop_chars} characters, got one of {long[0]}",
                          "stop")
    if req.n > limits.max_n:
        raise bad_request(f"n may be at most {limits.max_n}, got {req.n}", "n")
    if req.n > max_pending:
        raise bad_request(f"n={req.n} samples can never be admitted: this server runs at most {max_pending} "
                          "sequences at a time", "n")
    if req.logit_bias and len(req.logit_bias) > limits.max_logit_bias:
        raise bad_request(f"logit_bias may have at most {limits.max_logit_bias} entries, got "
                          f"{len(req.logit_bias)}", "logit_bias")
    if req.stop_token_ids and len(req.stop_token_ids) > limits.max_token_id_list:
        raise bad_request(f"at most {limits.max_token_id_list} stop_token_ids", "stop_token_ids")
    so = req.structured_outputs
    for name, value in (("guided_json", req.guided_json), ("guided_regex", req.guided_regex),
                        ("guided_choice", req.guided_choice), ("guided_grammar", req.guided_grammar),
                        ("structured_outputs", so.model_dump(by_alias=True, exclude_none=True) if so else None)):
        if value is not None:
            check_size(value, name, limits)
            if isinstance(value, str) and name == "guided_json":
                check_embedded_json(value, name, limits)
    if so is not None and isinstance(so.json_, str):
        check_embedded_json(so.json_, "structured_outputs", limits)


def check_chat(req: ChatCompletionRequest, limits: Limits, max_pending: int) -> None:
    check_sampling(req, limits, max_pending)
    tools = req.tools or []
    if len(tools) > limits.max_tools:
        raise bad_request(f"at most {limits.max_tools} tools, got {len(tools)}", "tools")
    for i, tool in enumerate(tools):
        check_tool(tool.function.name, tool.function.parameters, f"tools[{i}].function", limits)
    if req.response_format is not None and req.response_format.json_schema is not None:
        check_size(req.response_format.json_schema.json_schema, "response_format", limits)
    for key in req.chat_template_kwargs or {}:
        if key in RESERVED_TEMPLATE_KWARGS or not IDENTIFIER.fullmatch(key):
            raise bad_request(f"chat_template_kwargs may not set {key[:64]!r}: it is reserved or not a template "
                              "variable name (use the request's own fields for messages, tools and the "
                              "generation prompt)", "chat_template_kwargs")
    for i, message in enumerate(req.messages):
        for k, call in enumerate(message.tool_calls or []):
            function = call.get("function") if isinstance(call, dict) else None
            args = function.get("arguments") if isinstance(function, dict) else None
            if isinstance(args, str):
                check_embedded_json(args, f"messages[{i}].tool_calls[{k}].function.arguments", limits)


def check_tool(name: str, parameters: Any, where: str, limits: Limits) -> None:
    """OpenAI's rules for a function tool: a name of 1-64 letters, digits, '_' or '-'; parameters (if given) a JSON
    schema of type object (so that the model's arguments are a JSON object), within the schema size limit."""
    if not TOOL_NAME.fullmatch(name):
        raise bad_request(f"{where}.name must match ^[a-zA-Z0-9_-]{{1,64}}$, got {name[:80]!r}", "tools")
    if parameters is None or parameters == {}:
        return
    if parameters.get("type") != "object":
        raise bad_request(f"{where}.parameters must be a JSON schema with \"type\": \"object\", got type "
                          f"{json.dumps(parameters.get('type'))[:40]}", "tools")
    check_size(parameters, "tools", limits)


def check_completion(req: CompletionRequest, limits: Limits, max_pending: int) -> None:
    check_sampling(req, limits, max_pending)
    p = req.prompt
    prompts = 1 if isinstance(p, str) or (p and isinstance(p[0], int)) else len(p)
    if prompts > limits.max_prompts:
        raise bad_request(f"at most {limits.max_prompts} prompts in one request, got {prompts}", "prompt")
    if prompts * req.n > max_pending:
        raise bad_request(f"{prompts} prompts x n={req.n} samples can never be admitted: this server runs at most "
                          f"{max_pending} sequences at a time; send fewer prompts per request", "prompt")
    if isinstance(p, list) and p and isinstance(p[0], list):
        total = sum(len(ids) for ids in p)  # type: ignore[arg-type]
        if total > limits.max_token_id_list:
            raise bad_request(f"at most {limits.max_token_id_list} prompt token ids in one request", "prompt")


def check_size(value: Any, name: str, limits: Limits) -> None:
    size = len(value.encode("utf-8", "replace")) if isinstance(value, str) else len(json.dumps(value))
    if size > limits.max_schema_bytes:
        raise bad_request(f"{name} is {size} bytes; schemas, regexes and grammars may be at most "
                          f"{limits.max_schema_bytes} bytes", name.split("[")[0])


def check_embedded_json(text: str, where: str, limits: Limits) -> None:
    """JSON carried in a string (later parsed by the template or the grammar compiler): no deeper than the body
    may nest, no NaN, no lone surrogates. Text that is not JSON is left to whoever reads it."""
    if not text.lstrip()[:1] in ("{", "["):
        return
    try:
        value = json.loads(text)
    except RecursionError:
        raise bad_request(f"{where} nests deeper than {limits.max_json_depth} levels", where.split("[")[0],
                          "too_deep") from None
    except ValueError:
        return
    check_value(value, limits.max_json_depth, where)


__all__ = ["RESERVED_TEMPLATE_KWARGS", "TOOL_NAME", "check_chat", "check_completion", "check_embedded_json",
           "check_sampling", "check_size", "check_tool"]
