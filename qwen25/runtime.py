"""Process-wide runtime settings: torch's thread count, the OpenMP wait policy, (training) glibc's heap, and the
cyclic garbage collector's pause during a load.

Nothing happens on import. Entry points (the `qwen25` command, `qwen25 eval`, benchmarks) call
`configure_runtime` once, before any model work; library code never does. `restored_runtime` scopes what
`configure_runtime` changes, so a command run inside a longer-lived process (`qwen25.cli.main` called from a
test or a notebook) gives the caller back its thread count and environment: CPU results are only reproducible
at a fixed thread count (MKL's matmul rounds differently at another one). glibc's heap setting cannot be read back, so
`limit_heap_retention` stays in force for the rest of the process; it changes memory use and speed, not results.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import os
from collections.abc import Iterator
from typing import Any

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


@contextlib.contextmanager
def restored_runtime() -> Iterator[None]:
    """Run the block, then put back what `configure_runtime` may have changed in it: torch's intra-op thread
    count and OMP_WAIT_POLICY (restored, or removed when it was unset), also when the block raises."""
    import torch

    threads = torch.get_num_threads()
    wait_policy = os.environ.get("OMP_WAIT_POLICY")
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        if wait_policy is None:
            os.environ.pop("OMP_WAIT_POLICY", None)
        else:
            os.environ["OMP_WAIT_POLICY"] = wait_policy


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
# SFT/pretraining: blocks from 16 MB (an fp32 MLP activation of 1,024 tokens of the 0.5B is 20 MB) get their own
# mapping. Measured on a 0.5B LoRA step of 2 x 512 tokens: fp32 peak RSS 10.2 -> 7.8 GB against glibc's default,
# bf16 peak unchanged (6.1 GB); 1 MB (limit_heap_retention's default) cost +40-50% time per step.
TRAINING_MMAP_THRESHOLD = 16 << 20


def limit_heap_retention(mmap_threshold: int = 1 << 20) -> bool:
    """glibc only: serve every allocation of at least `mmap_threshold` bytes from its own mapping, which goes back
    to the OS when freed. Returns whether the setting was applied (not on other C libraries, nor when the
    environment already sets MALLOC_MMAP_THRESHOLD_).

    Why (training entry points call it): glibc raises its mmap threshold to 32 MB after freeing a large block, so
    the per-layer temporaries of a backward pass or of activation recomputation (tens of MB each) then come from
    the heap, fragment it and stay resident: a checkpointed LoRA forward of the 0.5B over 1,072 tokens grew RSS
    by 3 GB with the default and by 0.2 GB with a 1 MB threshold. The cost is a page fault per fresh page of
    those blocks: measured at +40-50% per step of a 0.5B LoRA fine-tune at 1 MB, which is why SFT and
    pretraining pass TRAINING_MMAP_THRESHOLD (DPO and reward-model training keep 1 MB, their memory-first
    choice)."""
    if os.environ.get("MALLOC_MMAP_THRESHOLD_"):
        return False
    mallopt = _libc_function("mallopt")
    return mallopt is not None and bool(mallopt(M_MMAP_THRESHOLD, int(mmap_threshold)))


@contextlib.contextmanager
def cyclic_gc_paused() -> Iterator[None]:
    """Python's cyclic garbage collector off inside the block, then as it was (on, unless the caller had turned it
    off). A GGUF load builds ~300k vocabulary objects (the merges' tuples are tracked containers), which would
    trigger full collections over every object the process holds (torch's included): the 0.5B's `LLM()` took
    383-414 ms with them, 357-379 without (5 loads in each of 3 alternating processes), and a fresh process's
    first one 0.438-0.516 s against 0.416-0.482 (5 alternating processes; AMD EPYC Zen 4: avx2 avx512f
    avx512_vnni avx512_bf16, 2 threads). Nothing is leaked: reference counting frees as usual,
    and cycles made meanwhile wait for the next collection."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def release_free_heap() -> bool:
    """glibc only: give the heap's free pages back to the OS (malloc_trim); returns whether it ran.

    The training loop calls it after each optimizer step: the step's freed temporaries then stop counting as
    resident between steps, while the allocator keeps reusing heap memory inside the next one."""
    trim = _libc_function("malloc_trim")
    if trim is None:
        return False
    trim(0)
    return True


@functools.lru_cache(maxsize=None)
def _libc_function(name: str) -> Any:
    """The C library's function `name`, or None (not glibc, or no such function). Looked up once: find_library
    runs ldconfig, too slow for a per-step call."""
    import ctypes
    import ctypes.util

    try:
        return getattr(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6"), name)
    except (OSError, AttributeError):
        return None
