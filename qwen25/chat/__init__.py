"""Chat formatting: message normalisation, rendering with the checkpoint's own Jinja template, the prompt-format
rules around it (role aliases, continuing a turn, FIM) and tool-call parsing of the model's replies.

Pure text in, text out: nothing here imports the engine or the server. `chat.tool_parser` is imported from its
module (it is not re-exported here). `chat_prompt` renders a prompt whose content cannot forge control tokens
(the policy is in `chat.prompt`'s docstring); `ChatPrompt.token_ids(tokenizer)` encodes it.
"""

from qwen25.chat.format import fim_prompt, rename_roles, render_prompt, strip_end_of_turn
from qwen25.chat.messages import ROLES, normalize_messages
from qwen25.chat.prompt import ChatPrompt, chat_prompt
from qwen25.chat.template import (
    DEFAULT_SYSTEM_PROMPT,
    FALLBACK_CHAT_TEMPLATE,
    ChatTemplateError,
    chat_template_or_fallback,
    compile_template,
    render_chat,
)

__all__ = ["DEFAULT_SYSTEM_PROMPT", "FALLBACK_CHAT_TEMPLATE", "ROLES", "ChatPrompt", "ChatTemplateError",
           "chat_prompt", "chat_template_or_fallback", "compile_template", "fim_prompt", "normalize_messages",
           "rename_roles", "render_chat", "render_prompt", "strip_end_of_turn"]
