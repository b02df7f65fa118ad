"""Incremental detokenization for streaming output.

Owns turning a stream of token ids into text pieces whose concatenation equals `Tokenizer.decode(all_ids)`.
Qwen's decoder is pure byte-level, so each token maps to a fixed byte string independent of its neighbours;
feeding those bytes through an incremental UTF-8 decoder is O(1) per token, holds back exactly the bytes of an
unfinished multi-byte character (an emoji split over several tokens), and still emits U+FFFD for bytes that can
never become valid, just as the one-shot decode does. It knows nothing about stop strings or the engine.
"""

from __future__ import annotations

import codecs
from collections.abc import Iterable

from qwen25.tokenizer.bpe import Tokenizer


class StreamDecoder:
    """Feed ids with `push`; each call returns only newly completed text. `flush` returns the remainder."""

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        """Add one token; return the text it completes ('' while a character is still partial)."""
        token_id = int(token_id)  # a 0-d tensor would hash by identity in the special-id and byte caches
        if self.skip_special_tokens and token_id in self.tokenizer.special_ids:
            return ""
        return self._utf8.decode(self.tokenizer.token_bytes(token_id))

    def push_many(self, token_ids: Iterable[int]) -> str:
        """Add several tokens at once (e.g. a speculative-decoding burst)."""
        return "".join(self.push(t) for t in token_ids)

    def flush(self) -> str:
        """End of stream: return held-back bytes (as U+FFFD if they never formed a character) and reset."""
        tail = self._utf8.decode(b"", final=True)
        self._utf8.reset()
        return tail

    @property
    def has_pending(self) -> bool:
        """True while bytes of an unfinished character are held back."""
        return bool(self._utf8.getstate()[0])


__all__ = ["StreamDecoder"]
