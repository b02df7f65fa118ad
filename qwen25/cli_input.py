"""Text input for the `qwen25` command: stdin and text flags checked to be UTF-8, errors as one line.

Python hands command-line bytes that are not UTF-8 to the program as lone surrogates and reads stdin either
strictly or surrogate-escaped depending on the locale; either way the tokenizer cannot take such text. These
helpers turn it into a ValueError naming the input and the offending byte, which `qwen25.cli.main` prints as
one line. Used by the generate and chat commands.
"""

from __future__ import annotations

import sys


def check_text(what: str, text: str) -> str:
    """`text` if it is valid Unicode; a ValueError naming `what` when it holds lone surrogates."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        bad = ord(text[e.start])
        byte = f"byte 0x{bad - 0xDC00:02x}" if 0xDC80 <= bad <= 0xDCFF else f"lone surrogate U+{bad:04X}"
        raise ValueError(f"{what} is not valid UTF-8 text ({byte} at character {e.start})") from None
    return text


def read_stdin() -> str:
    """All of stdin as text; a ValueError (not a traceback) when it is not UTF-8."""
    buffer = getattr(sys.stdin, "buffer", None)
    if buffer is None:  # replaced by a text stream (tests, embedding)
        return check_text("stdin", sys.stdin.read())
    data = buffer.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"stdin is not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}); convert it "
                         "first, e.g. with iconv -t UTF-8") from None


def one_line(error: BaseException) -> str:
    """An error's message on one line (a KeyError's without its repr quotes)."""
    message = error.args[0] if isinstance(error, KeyError) and error.args else error
    return " ".join(str(message).split()) or type(error).__name__


__all__ = ["check_text", "one_line", "read_stdin"]
