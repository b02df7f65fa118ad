"""Tokenizer package: byte-level BPE (`bpe.Tokenizer`) and streaming detokenization (`stream.StreamDecoder`)."""

from qwen25.tokenizer.bpe import Tokenizer
from qwen25.tokenizer.stream import StreamDecoder

__all__ = ["Tokenizer", "StreamDecoder"]
