"""The code-execution sandbox: limits hold, and a bad program is a failure, never a stuck or crashed harness."""

from __future__ import annotations

import glob
import tempfile
import time

import pytest

from qwen25.eval.sandbox import SandboxLimits, network_isolation, run_python


def test_ok_program_output_and_exit_codes():
    r = run_python("import sys\nprint('hi')\nprint('err', file=sys.stderr)")
    assert r.ok and r.stdout == "hi\n" and "err" in r.stderr
    r = run_python("raise SystemExit(3)")
    assert not r.ok and r.status == "error" and r.returncode != 0
    r = run_python("assert 1 == 2")
    assert not r.ok and "AssertionError" in r.stderr


def test_infinite_loop_is_killed_at_the_timeout():
    start = time.perf_counter()
    r = run_python("while True:\n    pass", SandboxLimits(timeout=1.5))
    assert r.status == "timeout" and not r.ok
    assert time.perf_counter() - start < 6


def test_cpu_limit_kills_a_busy_program_before_the_wall_clock():
    r = run_python("while True:\n    pass", SandboxLimits(timeout=20, cpu_seconds=1))
    assert not r.ok and r.status in ("killed", "error") and r.seconds < 10


def test_sleeping_program_is_killed_at_the_timeout():
    r = run_python("import time\ntime.sleep(60)", SandboxLimits(timeout=1))
    assert r.status == "timeout" and r.seconds < 5


def test_fork_bomb_is_contained():
    code = (
        "import os, time\n"
        "n = 0\n"
        "try:\n"
        "    while True:\n"
        "        if os.fork() == 0:\n"
        "            time.sleep(30)\n"
        "            os._exit(0)\n"
        "        n += 1\n"
        "except OSError:\n"
        "    print('fork refused after', n)\n"
        "    raise SystemExit(1)\n"
    )
    start = time.perf_counter()
    r = run_python(code, SandboxLimits(timeout=10, max_processes=32))
    assert not r.ok
    assert "fork refused" in r.stdout
    assert time.perf_counter() - start < 15


def test_memory_hog_gets_memory_error():
    r = run_python("x = bytearray(4 << 30)\nprint('allocated')", SandboxLimits(memory_mb=512))
    assert not r.ok and "allocated" not in r.stdout and "MemoryError" in r.stderr


def test_file_size_limit():
    r = run_python("open('big', 'wb').write(b'x' * (64 << 20))", SandboxLimits(max_file_mb=4))
    assert not r.ok


def test_huge_output_is_capped_and_harmless():
    r = run_python("import sys\nwhile True:\n    sys.stdout.write('x' * 65536)", SandboxLimits(timeout=3,
                                                                                       max_file_mb=8))
    assert not r.ok and len(r.stdout) < 100_000


def test_working_directory_is_removed():
    before = set(glob.glob(f"{tempfile.gettempdir()}/qwen25-sandbox-*"))
    r = run_python("import os\nopen('f.txt', 'w').write('data')\nprint(os.getcwd())")
    assert r.ok
    workdir = r.stdout.strip()
    assert "qwen25-sandbox-" in workdir
    assert set(glob.glob(f"{tempfile.gettempdir()}/qwen25-sandbox-*")) <= before


@pytest.mark.skipif(not network_isolation(), reason="this kernel/container does not allow network namespaces")
def test_no_network():
    code = ("import socket\n"
            "s = socket.socket()\n"
            "s.settimeout(2)\n"
            "s.connect(('1.1.1.1', 53))\n"
            "print('connected')\n")
    r = run_python(code, SandboxLimits(timeout=5))
    assert not r.ok and "connected" not in r.stdout
