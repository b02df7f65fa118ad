"""Process-wide runtime settings: torch's thread count and the OpenMP wait policy.

Nothing happens on import. Entry points (the `qwen25` command, `qwen25 eval`, benchmarks) call
`configure_runtime` once, before any model work; library code never does.
"""

from __future__ import annotations

import os

MAX_DEFAULT_THREADS = 8


def default_threads() -> int:
    """All cores, at most MAX_DEFAULT_THREADS (more rarely helps memory-bound decoding)."""
    return min(os.cpu_count() or 1, MAX_DEFAULT_THREADS)


def configure_runtime(threads: int | None = None) -> int:
    """Set the OpenMP wait policy (unless the environment chose one) and torch's intra-op threads; returns
    the thread count used."""
    # Spin-waiting OpenMP workers stall for milliseconds whenever another process holds a core (2-core
    # machines): passive waiting is measurably faster there. Must be set before torch starts its pool.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import torch

    threads = threads or default_threads()
    torch.set_num_threads(threads)
    return threads
