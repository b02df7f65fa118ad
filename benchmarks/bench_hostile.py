"""Hostile-request stall check: an unrelated 8-token request's latency while a stalling request is in flight, against
its idle latency (goal: at most 2x). Issue 13's classes: a 10 MB body, 16 stop strings of 100 KB each, a 200-prompt
list whose client left, and a full-context request.

  python benchmarks/bench_hostile.py [--model M --threads 2 --repeats 3 --classes body,stops,list,full]
  python benchmarks/bench_hostile.py --url http://127.0.0.1:8000   # an already running server (its own limits)
  python benchmarks/bench_hostile.py --classes full --full-seconds 1800  # probe through the whole 32K prefill
  python benchmarks/bench_hostile.py --full-warmup 240   # the full-context prompt prefills alone 240 s first (deep)

It starts `qwen25 serve` on a free loopback port with the limits raised far enough for every class to reach the
engine (--max-body-size 16 MiB, --max-stop-length 200000, --max-queue 512; with the defaults the first two are
refused at once with 413/400). The probe: a chat request, "Count from 1 to 20.", temperature 0, max_tokens 8,
ignore_eos. Idle latency: the median of --repeats probes on the idle server after one warm-up. For each class the
stalling request runs in a background thread (the 10 MB body is re-sent in a loop; the stop-string and
full-context requests stream until told to stop, then close the connection; the 200-prompt list is sent with a
2 s client timeout, so its client is gone before the probes); --repeats probes run one after another while it is
in flight, and the median is reported with the engine queue (sequences running/waiting, from /health) when the
probes began. The full-context request is a token-id prompt of max_model_len - 16 tokens;
its probes start once /health shows it running. Between classes the server is left to drain (bounded waits).
Standard library only; all traffic stays on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

NAME = "bench"
PROBE = {"model": NAME, "messages": [{"role": "user", "content": "Count from 1 to 20."}], "max_tokens": 8,
         "temperature": 0, "ignore_eos": True}
CLASSES = {"body": "10 MB body", "stops": "16 x 100 KB stop strings", "list": "200-prompt list, client gone",
           "full": "full-context request"}


class Server:
    def __init__(self, url: str) -> None:
        parsed = urlparse(url)
        self.url, self.host, self.port = url, parsed.hostname or "127.0.0.1", parsed.port or 80

    def conn(self, timeout: float) -> http.client.HTTPConnection:
        return http.client.HTTPConnection(self.host, self.port, timeout=timeout)

    def request(self, method: str, path: str, body: Any = None, timeout: float = 600) -> tuple[int, bytes]:
        conn = self.conn(timeout)
        try:
            data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
            conn.request(method, path, body=data, headers={"content-type": "application/json"})
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()

    def health(self) -> dict[str, Any]:
        try:
            return json.loads(self.request("GET", "/health", timeout=30)[1])
        except (OSError, ValueError):
            return {}

    def probe(self) -> float:
        start = time.perf_counter()
        status, body = self.request("POST", "/v1/chat/completions", PROBE)
        if status != 200:
            raise RuntimeError(f"probe failed: {status} {body[:200]!r}")
        return time.perf_counter() - start

    def drain(self, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            queue = self.health().get("queue", {})
            if queue and queue.get("running", 1) + queue.get("waiting", 1) == 0:
                return
            time.sleep(0.5)
        print(f"  (server still busy after {timeout:.0f} s)", file=sys.stderr)


def streaming(server: Server, path: str, body: dict[str, Any], stop: threading.Event) -> None:
    """POST a streamed request and read (and drop) what comes until `stop`, then close the socket: the client
    goes away. A raw socket, so that waiting in short timeouts cannot upset an HTTP client's chunk parser."""
    data = json.dumps({**body, "stream": True}).encode()
    head = (f"POST {path} HTTP/1.1\r\nHost: {server.host}:{server.port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n").encode()
    with socket.create_connection((server.host, server.port), timeout=30) as sock:
        sock.sendall(head + data)
        sock.settimeout(0.5)
        while not stop.is_set():
            try:
                if not sock.recv(65536):
                    return  # the server finished (or refused) it
            except (TimeoutError, socket.timeout):
                continue
            except OSError:
                return


def in_background(fn: Callable[[threading.Event], None]) -> tuple[threading.Event, threading.Thread]:
    stop = threading.Event()
    thread = threading.Thread(target=fn, args=(stop,), daemon=True)
    thread.start()
    return stop, thread


def probe_through(server: Server, thread: threading.Thread | None, seconds: float) -> list[float]:
    """Probe back to back while the full-context request is in flight (its stream ends after its 8 tokens), for
    at most `seconds`: latencies from the start of its prefill to its end, each printed with its time offset."""
    times: list[float] = []
    start = time.monotonic()
    while time.monotonic() - start < seconds and thread is not None and thread.is_alive():
        times.append(server.probe())
        print(f"    t={time.monotonic() - start:6.1f} s  probe {times[-1]:.2f} s", file=sys.stderr)
    return times or [server.probe()]


def run_class(server: Server, name: str, repeats: int, max_model_len: int,
              full_seconds: float = 0, full_warmup: float = 0) -> tuple[list[float], str]:
    """The probe latencies with `name` in flight, and the engine queue (running/waiting) when probing began.
    With full_seconds > 0 the full-context class probes through its whole prefill (up to that many seconds)."""
    if name == "body":
        body = json.dumps({"model": NAME, "messages": [{"role": "user", "content": "word " * (2 << 20)}]}).encode()

        def flood(stop: threading.Event) -> None:
            while not stop.is_set():
                server.request("POST", "/v1/chat/completions", body)

        stop, thread = in_background(flood)
        time.sleep(0.5)
    elif name == "stops":
        rng = random.Random(0)
        stops = ["".join(rng.choice("abcdefghij") for _ in range(100_000)) for _ in range(16)]
        body = {"model": NAME, "messages": [{"role": "user", "content": "Write a long story."}], "max_tokens": 4000,
                "ignore_eos": True, "stop": stops}
        stop, thread = in_background(lambda ev: streaming(server, "/v1/chat/completions", body, ev))
        time.sleep(2.0)
    elif name == "list":
        body = {"model": NAME, "prompt": [f"Story number {i}: once upon a time" for i in range(200)],
                "max_tokens": 2000, "ignore_eos": True}
        try:
            server.request("POST", "/v1/completions", body, timeout=2.0)
        except (TimeoutError, socket.timeout):
            pass  # the client is gone
        stop, thread = threading.Event(), None
    elif name == "full":
        body = {"model": NAME, "prompt": [int(t) for t in random.Random(1).choices(range(1000, 20000),
                                                                                    k=max_model_len - 16)],
                "max_tokens": 8, "ignore_eos": True}
        stop, thread = in_background(lambda ev: streaming(server, "/v1/completions", body, ev))
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # in flight (prefilling counts as waiting until its first token)
            queue = server.health().get("queue", {})
            if queue.get("running", 0) + queue.get("waiting", 0) >= 1:
                break
            time.sleep(0.2)
        time.sleep(max(2.0, full_warmup))  # into its prefill (alone: as deep as the warm-up lets it get)
    else:
        raise ValueError(name)
    queue = server.health().get("queue", {})
    state = f"{queue.get('running', '?')}/{queue.get('waiting', '?')}"
    try:
        if name == "full" and full_seconds > 0:
            return probe_through(server, thread, full_seconds), state
        return [server.probe() for _ in range(repeats)], state
    finally:
        stop.set()
        if thread is not None:
            thread.join(120)


def start_server(args: argparse.Namespace) -> tuple[subprocess.Popen, str, Path]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = Path(args.log)
    cmd = [sys.executable, "-m", "qwen25.cli", "serve", "--model", args.model, "--port", str(port),
           "--served-model-name", NAME, "--log-level", "warning", "--max-body-size", str(16 << 20),
           "--max-stop-length", "200000", "--max-queue", "512"]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    env.pop("QWEN25_API_KEY", None)
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while Server(url).health().get("status") != "ok":
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise SystemExit(f"qwen25 serve did not start; see {log}:\n{log.read_text()[-2000:]}")
        time.sleep(0.5)
    return proc, url, log


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--classes", default=",".join(CLASSES), help="comma-separated: " + ", ".join(CLASSES))
    parser.add_argument("--url", default=None, help="use this running server (served as 'bench')")
    parser.add_argument("--log", default="bench_hostile_serve.log")
    parser.add_argument("--full-seconds", type=float, default=0,
                        help="full class: probe back to back through its whole prefill, up to this many seconds "
                             "(default 0: --repeats probes ~2 s into it); reports the median and the worst probe")
    parser.add_argument("--full-warmup", type=float, default=0,
                        help="full class: let the full-context prompt prefill alone this many seconds before the "
                             "probes, so they meet its deep (slowest) chunks (default: 2 s)")
    args = parser.parse_args()
    classes = [c for c in args.classes.split(",") if c]
    unknown = [c for c in classes if c not in CLASSES]
    if unknown:
        parser.error(f"unknown classes {unknown}; choose from {list(CLASSES)}")
    proc = None
    if args.url is None:
        proc, url, log = start_server(args)
        print(f"qwen25 serve {args.model} at {url} (log: {log})", file=sys.stderr)
    else:
        url = args.url
    server = Server(url)
    try:
        models = json.loads(server.request("GET", "/v1/models")[1])
        max_model_len = int(models["data"][0]["max_model_len"])
        server.probe()  # warm-up
        idle = statistics.median(server.probe() for _ in range(args.repeats))
        rows = []
        for name in classes:
            print(f"  {CLASSES[name]} ...", file=sys.stderr)
            times, queue = run_class(server, name, args.repeats, max_model_len, args.full_seconds,
                                     args.full_warmup)
            rows.append((CLASSES[name], statistics.median(times), queue))
            if name == "full" and args.full_seconds > 0:
                rows.append((f"  worst of {len(times)} probes", max(times), queue))
            server.drain()
        after = statistics.median(server.probe() for _ in range(args.repeats))
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
    print(f"\n8-token probe latency, median of {args.repeats} (idle {idle:.2f} s; idle again at the end "
          f"{after:.2f} s; context {max_model_len} tokens)\n")
    print(f"| {'stalling request in flight':<30} | {'queue run/wait':>14} | {'probe (s)':>9} | {'vs idle':>7} | "
          f"{'<= 2x':>5} |")
    print(f"|{'-' * 32}|{'-' * 16}|{'-' * 11}|{'-' * 9}|{'-' * 7}|")
    for label, loaded, queue in rows:
        ratio = loaded / idle
        print(f"| {label:<30} | {queue:>14} | {loaded:9.2f} | {ratio:6.2f}x | {'yes' if ratio <= 2 else 'NO':>5} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
