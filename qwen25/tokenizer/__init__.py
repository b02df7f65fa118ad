"""Tokenizer package: byte-level BPE (`bpe.Tokenizer`), streaming detokenization (`stream.StreamDecoder`) and the
tokenizer_config.json `Tokenizer.save` writes (`hf_config`)."""

from qwen25.tokenizer.bpe import Tokenizer
from qwen25.tokenizer.stream import StreamDecoder

__all__ = ["Tokenizer", "StreamDecoder"]
