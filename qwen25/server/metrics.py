"""Prometheus metrics for the server, rendered in the text exposition format (no client library needed).

Owns the counters, gauges and histograms and their rendering; the app decides what to record and when.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Sequence

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
TOKEN_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.2, 0.5, 1.0, 2.5)
MASK_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05)

Labels = tuple[tuple[str, str], ...]


def _fmt_labels(labels: Labels) -> str:
    if not labels:
        return ""
    inner = ",".join(f'{k}="{v.replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34))}"'
                     for k, v in labels)
    return "{" + inner + "}"


def _fmt(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value)) if not float(value).is_integer() else str(int(value))


class _Metric:
    kind = ""

    def __init__(self, name: str, help_text: str) -> None:
        self.name, self.help = name, help_text
        self._lock = threading.Lock()

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]


class Counter(_Metric):
    kind = "counter"

    def __init__(self, name: str, help_text: str) -> None:
        super().__init__(name, help_text)
        self.values: dict[Labels, float] = {}

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        with self._lock:
            self.values[key] = self.values.get(key, 0.0) + amount

    def render(self) -> list[str]:
        with self._lock:
            items = sorted(self.values.items()) or [((), 0.0)]
        return self.header() + [f"{self.name}{_fmt_labels(k)} {_fmt(v)}" for k, v in items]


class Gauge(_Metric):
    kind = "gauge"

    def __init__(self, name: str, help_text: str, getter: Callable[[], float]) -> None:
        super().__init__(name, help_text)
        self.getter = getter

    def render(self) -> list[str]:
        try:
            value = float(self.getter())
        except Exception:  # noqa: BLE001 - a metric must never break /metrics
            value = float("nan")
        return self.header() + [f"{self.name} {value if math.isnan(value) else _fmt(value)}"]


class Histogram(_Metric):
    kind = "histogram"

    def __init__(self, name: str, help_text: str, buckets: Sequence[float]) -> None:
        super().__init__(name, help_text)
        self.buckets = tuple(sorted(buckets)) + (float("inf"),)
        self.counts = [0] * len(self.buckets)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        with self._lock:
            for i, upper in enumerate(self.buckets):
                if value <= upper:
                    self.counts[i] += 1
                    break
            self.sum += value
            self.count += 1

    def render(self) -> list[str]:
        with self._lock:
            lines = self.header()
            cumulative = 0
            for upper, n in zip(self.buckets, self.counts):
                cumulative += n
                lines.append(f'{self.name}_bucket{{le="{_fmt(upper)}"}} {cumulative}')
            lines += [f"{self.name}_sum {_fmt(self.sum)}", f"{self.name}_count {self.count}"]
        return lines


class ServerMetrics:
    """Everything /metrics reports. Gauges read live values through the callables given."""

    def __init__(self, running: Callable[[], float], waiting: Callable[[], float],
                 engine_stats: Callable[[], dict[str, float]]) -> None:
        self.requests = Counter("qwen25_requests_total", "HTTP requests by endpoint and status code")
        self.prompt_tokens = Counter("qwen25_prompt_tokens_total", "prompt tokens processed")
        self.generation_tokens = Counter("qwen25_generation_tokens_total", "tokens generated")
        self.finished = Counter("qwen25_request_finished_total", "finished generations by finish_reason")
        self.aborted = Counter("qwen25_requests_aborted_total", "generations aborted (client disconnected)")
        self.e2e = Histogram("qwen25_request_latency_seconds", "end-to-end latency of generation requests",
                             LATENCY_BUCKETS)
        self.ttft = Histogram("qwen25_time_to_first_token_seconds", "time to first token", LATENCY_BUCKETS)
        self.tpot = Histogram("qwen25_time_per_output_token_seconds", "mean time per output token after the first",
                              TOKEN_LATENCY_BUCKETS)
        self.mask = Histogram("qwen25_structured_mask_seconds_per_token",
                              "grammar mask cost per generated token (structured output)", MASK_BUCKETS)
        self.gauges = [Gauge("qwen25_requests_running", "sequences in flight in the engine (n per request)", running),
                       Gauge("qwen25_requests_waiting", "sequences queued or in prefill (queue depth)", waiting)]
        self._engine_stats = engine_stats

    def render(self) -> str:
        lines: list[str] = []
        for m in (self.requests, self.prompt_tokens, self.generation_tokens, self.finished, self.aborted,
                  *self.gauges, self.e2e, self.ttft, self.tpot, self.mask):
            lines += m.render()
        try:
            stats = self._engine_stats() or {}
        except Exception:  # noqa: BLE001
            stats = {}
        for key, value in sorted(stats.items()):
            name = "qwen25_engine_" + "".join(c if c.isalnum() else "_" for c in key)
            try:
                lines += [f"# TYPE {name} gauge", f"{name} {_fmt(float(value))}"]
            except (TypeError, ValueError):
                continue
        return "\n".join(lines) + "\n"


__all__ = ["Counter", "Gauge", "Histogram", "ServerMetrics"]
