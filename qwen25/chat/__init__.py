"""Chat formatting: message normalisation and rendering with the checkpoint's own Jinja template."""

from qwen25.chat.messages import ROLES, normalize_messages
from qwen25.chat.template import (
    DEFAULT_SYSTEM_PROMPT,
    FALLBACK_CHAT_TEMPLATE,
    ChatTemplateError,
    chat_template_or_fallback,
    compile_template,
    render_chat,
)

__all__ = ["DEFAULT_SYSTEM_PROMPT", "FALLBACK_CHAT_TEMPLATE", "ROLES", "ChatTemplateError",
           "chat_template_or_fallback", "compile_template", "normalize_messages", "render_chat"]
