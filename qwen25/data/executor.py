"""Where the per-shard stages run: in this process (`LocalExecutor`) or as Ray tasks (`RayExecutor`).

`map(fn, shards, *args)` calls `fn(work_dir, shard, *args)` for every shard and `on_done(shard)` in the driver
as each finishes (progress bars, the resume count). The local executor runs them in order. The Ray executor
sends groups of shards to tasks (about two per CPU of the cluster, so a task's setup, such as loading the
language-ID model, is paid per group, not per shard), with `args` put in the object store once; it needs the
work directory on a file system every node sees (one machine, or a shared mount). Results are files, so the two
executors produce identical outputs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

__all__ = ["Executor", "LocalExecutor", "RayExecutor", "make_executor"]

OnDone = Callable[[int], None]


class Executor:
    name = "executor"

    def map(self, fn: Callable[..., None], work: Path, shards: Sequence[int], *args: Any,
            on_done: OnDone = lambda s: None) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


class LocalExecutor(Executor):
    name = "local"

    def map(self, fn: Callable[..., None], work: Path, shards: Sequence[int], *args: Any,
            on_done: OnDone = lambda s: None) -> None:
        for shard in shards:
            fn(work, shard, *args)
            on_done(shard)


def _run_group(fn: Callable[..., None], work: str, shards: list[int], *args: Any) -> list[int]:
    for shard in shards:
        fn(Path(work), shard, *args)
    return shards


class RayExecutor(Executor):
    """Ray tasks on the cluster at `address`, or on a local Ray started here with `num_cpus` ("local")."""

    name = "ray"

    def __init__(self, address: str = "local", num_cpus: int | None = None):
        try:
            import ray
        except ImportError:
            raise ValueError("--ray needs Ray: pip install 'qwen25[ray]'") from None
        self.ray = ray
        self.started = not ray.is_initialized()
        if self.started:
            kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
            if address == "local":
                ray.init(num_cpus=num_cpus, **kwargs)
            else:
                ray.init(address=address, **kwargs)
        self.cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
        self._task = ray.remote(num_cpus=1)(_run_group)

    def map(self, fn: Callable[..., None], work: Path, shards: Sequence[int], *args: Any,
            on_done: OnDone = lambda s: None) -> None:
        shards = list(shards)
        if not shards:
            return
        groups = max(1, min(len(shards), 2 * self.cpus))
        refs = [self.ray.put(a) for a in args]
        pending = [self._task.remote(fn, str(work), shards[g::groups], *refs) for g in range(groups)]
        while pending:
            done, pending = self.ray.wait(pending, num_returns=1)
            for shard in self.ray.get(done[0]):
                on_done(shard)

    def close(self) -> None:
        if self.started:
            self.ray.shutdown()


def make_executor(ray_address: str | None, num_cpus: int | None = None) -> Executor:
    return LocalExecutor() if ray_address is None else RayExecutor(ray_address, num_cpus)
