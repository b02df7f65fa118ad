"""Helpers for tests on tiny random Qwen2 models (imported by name: pytest puts tests/ on sys.path)."""

from __future__ import annotations

import torch
from torch import nn


def unit_scale_(model: nn.Module, norms: bool = False) -> nn.Module:
    """Re-initialize in place with unit-scale weights, so greedy continuations vary (a small init just repeats
    the last token): biases N(0, 0.5), embeddings N(0, 1), matrices N(0, 1/fan_in), and with `norms` the norm
    weights U(0.5, 1.5) instead of ones."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.5)
            elif p.dim() == 2:
                p.normal_(0, 1.0 if "embed" in name else p.shape[1] ** -0.5)
            elif norms:
                p.uniform_(0.5, 1.5)
    return model


def save_tiny_policy(path, tokenizer, seed: int = 0):  # noqa: ANN001, ANN201
    """A tiny random transformers Qwen2 (the real vocabulary, 2 layers of 32) with `tokenizer` saved into `path`:
    the RL tests' policy checkpoint. Returns path."""
    import transformers

    torch.manual_seed(seed)
    config = transformers.Qwen2Config(vocab_size=151936, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                      tie_word_embeddings=True, bos_token_id=151643, eos_token_id=151645)
    transformers.Qwen2ForCausalLM(config).save_pretrained(path)
    tokenizer.save(path)
    return path
