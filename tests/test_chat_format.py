"""ChatML prompt-format rules around the template (chat.format): OpenAI role aliases, continuing a final
assistant turn, and the Coder fill-in-the-middle prompt."""

from __future__ import annotations

import pytest

from qwen25.chat import render_chat
from qwen25.chat.format import fim_prompt, rename_roles, render_prompt, strip_end_of_turn


def test_developer_role_is_system_and_messages_are_not_mutated() -> None:
    messages = [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    renamed = rename_roles(messages)
    assert [m["role"] for m in renamed] == ["system", "user"]
    assert messages[0]["role"] == "developer"
    assert render_prompt(None, messages) == render_chat(None, renamed)
    assert render_prompt(None, messages).startswith("<|im_start|>system\nBe brief.<|im_end|>")


def test_strip_end_of_turn() -> None:
    assert strip_end_of_turn("<|im_start|>assistant\nPar<|im_end|>\n") == "<|im_start|>assistant\nPar"
    assert strip_end_of_turn("no end marker\n") == "no end marker\n"


def test_continue_final_message() -> None:
    messages = [{"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "The capital"}]
    text = render_prompt(None, messages, continue_final_message=True)
    assert text.endswith("<|im_start|>assistant\nThe capital")
    assert render_prompt(None, messages, add_generation_prompt=True, continue_final_message=True) == text
    with pytest.raises(ValueError, match="last message to be an assistant"):
        render_prompt(None, messages[:1], continue_final_message=True)


def test_template_kwargs_reach_the_template() -> None:
    template = "{{ greeting }} {{ messages[0].content }}"
    assert render_prompt(template, [{"role": "user", "content": "x"}], template_kwargs={"greeting": "hi"}) == "hi x"


def test_fim_prompt() -> None:
    assert fim_prompt("def f(", "):") == "<|fim_prefix|>def f(<|fim_suffix|>):<|fim_middle|>"
