"""Errors the engine raises for requests it cannot take; every face (LLM, CLI, server) maps them to its own form."""

from __future__ import annotations


class ContextLengthError(ValueError):
    """A prompt does not fit the model's context window or the KV cache."""
