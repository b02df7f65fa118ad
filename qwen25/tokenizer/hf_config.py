"""The `tokenizer_config.json` that `Tokenizer.save` writes next to tokenizer.json, in the form
`transformers.AutoTokenizer` reads as a Qwen2 tokenizer with the same ids, special flags and chat template."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from qwen25.tokenizer.bpe import Tokenizer


def tokenizer_config(tok: Tokenizer) -> dict[str, Any]:
    """The tokenizer_config.json contents for `tok` (no chat_template key when it has none)."""
    added = tok.backend.get_added_tokens_decoder()

    def name(token_id: int | None) -> str | None:
        return None if token_id is None else tok.id_to_token(token_id)

    config = {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": {
            str(i): {"content": t.content, "lstrip": t.lstrip, "normalized": t.normalized, "rstrip": t.rstrip,
                     "single_word": t.single_word, "special": t.special}
            for i, t in sorted(added.items())
        },
        "additional_special_tokens": [added[i].content for i in sorted(tok.special_ids)
                                      if i not in (tok.eos_token_id, tok.pad_token_id, tok.bos_token_id)],
        "bos_token": name(tok.bos_token_id),
        "chat_template": tok.chat_template,
        "clean_up_tokenization_spaces": False,
        "eos_token": name(tok.eos_token_id),
        "errors": "replace",
        "pad_token": name(tok.pad_token_id),
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }
    if tok.chat_template is None:
        del config["chat_template"]
    return config


__all__ = ["tokenizer_config"]
