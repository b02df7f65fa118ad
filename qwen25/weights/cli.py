"""`qwen25 models` and `qwen25 download`: the commands that manage the model cache (`qwen25 quantize`, which needs
a tokenizer, is `qwen25.quantize_cli`).

Each is a config dataclass (its fields are the flags, see `qwen25.cli_args`) and a `main_*(cfg)` that
prints for a person and returns the exit status. `qwen25.cli` registers them.
"""

from __future__ import annotations

from dataclasses import dataclass

from qwen25.cli_args import arg


@dataclass
class ModelsConfig:
    """List known models, their sizes and whether they are cached."""

    paths: bool = False
    """also print the paths of cached files, and the CPU's features and the native kernels that run on it"""


@dataclass
class DownloadConfig:
    """Fetch a known model (or resolve a path/repo id) into the cache."""

    name: str = arg(positional=True)
    """a known model name (see `qwen25 models`)"""


def main_models(cfg: ModelsConfig) -> int:
    from qwen25.weights.registry import DEFAULT_MODEL, KNOWN_MODELS, cache_dir, cached_path, is_cached

    print(f"{'name':32} {'size':>9}  {'cached':6}  description")
    for name, m in KNOWN_MODELS.items():
        mark = "yes" if is_cached(m) else "no"
        default = " (default)" if name == DEFAULT_MODEL else ""
        print(f"{name:32} {m.size / 1e6:7.0f}MB  {mark:6}  {m.description}{default}")
    print(f"\ncache: {cache_dir()}")
    if cfg.paths:
        from qwen25.kernels import kernels_line

        for m in KNOWN_MODELS.values():
            if is_cached(m):
                print(f"  {cached_path(m)}")
        print(kernels_line())
    return 0


def main_download(cfg: DownloadConfig) -> int:
    from qwen25.weights.registry import resolve_model

    print(resolve_model(cfg.name))
    return 0
