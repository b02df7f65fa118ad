"""Run untrusted model-written Python in a separate, resource-limited process.

Every call gets a fresh process and a fresh temporary working directory (removed afterwards). Limits:
- wall clock: the process group is SIGKILLed at `timeout` seconds (and with a PID namespace, every process
  the program started dies with it);
- RLIMIT_CPU (CPU seconds), RLIMIT_AS (address space: a memory hog gets MemoryError, not the machine),
  RLIMIT_NPROC (a fork bomb gets EAGAIN), RLIMIT_FSIZE (no multi-GB files; stdout/stderr go to files in
  the working directory, so they are capped by it too), RLIMIT_CORE 0;
- no network: the program runs in a new network namespace (`unshare -n`, only a down loopback device)
  when the kernel allows it; `network_isolation()` says whether it does. Where it does not (unprivileged
  containers), the program *has* network access: the limits above still hold;
- when the harness runs as root the program runs as `nobody` (via util-linux `setpriv`): RLIMIT_NPROC is not
  enforced for root, and `nobody` cannot write the user's files.
A crashing, hanging or resource-exhausting program is reported as a failed `SandboxResult`; the caller never
hangs and never sees an exception from the program.
"""

from __future__ import annotations

import functools
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

NOBODY_UID = 65534
OUTPUT_CAP = 64 * 1024  # characters of stdout/stderr kept in the result


@dataclass(frozen=True, slots=True)
class SandboxLimits:
    timeout: float = 10.0  # wall-clock seconds
    cpu_seconds: int | None = None  # default: ceil(timeout) + 1
    memory_mb: int = 2048  # address space
    max_processes: int = 64  # processes + threads of the sandbox user (in addition to existing ones)
    max_file_mb: int = 16
    site_packages: bool = False  # let the program import installed packages (numpy, sympy): program-of-thought


@dataclass(frozen=True, slots=True)
class SandboxResult:
    status: str  # "ok" | "error" (non-zero exit) | "timeout" | "killed" (by a signal, e.g. CPU limit)
    returncode: int | None
    stdout: str
    stderr: str
    seconds: float

    @property
    def ok(self) -> bool:
        return self.status == "ok"


@functools.lru_cache(maxsize=1)
def _isolation() -> tuple[tuple[str, ...], bool, bool]:
    """(command prefix, network isolated, runs as nobody), probed once per process."""
    prefix: list[str] = []
    net = False
    unshare = shutil.which("unshare")
    if unshare:
        for args in ([unshare, "--net", "--pid", "--fork", "--kill-child"], [unshare, "--net"],
                     [unshare, "--user", "--map-root-user", "--net"]):
            try:
                ok = subprocess.run([*args, "true"], capture_output=True, timeout=10).returncode == 0
            except (OSError, subprocess.TimeoutExpired):
                ok = False
            if ok:
                prefix, net = args, True
                break
    nobody = False
    setpriv = shutil.which("setpriv")
    if os.geteuid() == 0 and setpriv:
        drop = [setpriv, f"--reuid={NOBODY_UID}", f"--regid={NOBODY_UID}", "--clear-groups"]
        try:
            nobody = subprocess.run([*prefix, *drop, sys.executable, "-I", "-S", "-c", "pass"],
                                    capture_output=True, timeout=20).returncode == 0
        except (OSError, subprocess.TimeoutExpired):
            nobody = False
        if nobody:
            prefix += drop
    return tuple(prefix), net, nobody


def network_isolation() -> bool:
    """Whether sandboxed programs run without network access on this machine."""
    return _isolation()[1]


def _user_tasks(uid: int) -> int:
    """Processes + threads currently owned by `uid` (RLIMIT_NPROC counts both)."""
    count = 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/status", encoding="ascii", errors="replace") as f:
                status = f.read()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        if fields.get("Uid", "").split()[:1] == [str(uid)]:
            count += int(fields.get("Threads", "1").strip() or 1)
    return count


def run_python(code: str, limits: SandboxLimits = SandboxLimits(), stdin: str = "") -> SandboxResult:
    """Run `code` as a Python program under `limits`; return its exit status and (capped) output."""
    prefix, _, as_nobody = _isolation()
    uid = NOBODY_UID if as_nobody else os.getuid()
    # RLIMIT_NPROC counts every task of the user, not just ours: allow the ones that already exist.
    nproc = limits.max_processes + _user_tasks(uid)
    cpu = limits.cpu_seconds if limits.cpu_seconds is not None else int(limits.timeout) + 1
    workdir = Path(tempfile.mkdtemp(prefix="qwen25-sandbox-"))
    try:
        if as_nobody:
            os.chown(workdir, NOBODY_UID, NOBODY_UID)
        (workdir / "main.py").write_text(code, encoding="utf-8")
        flags = ["-I"] if limits.site_packages else ["-I", "-S"]
        argv = [*prefix, sys.executable, *flags, "main.py"]
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(workdir), "LANG": "C.UTF-8",
               "PYTHONHASHSEED": "0", "PYTHONDONTWRITEBYTECODE": "1", "OMP_NUM_THREADS": "1",
               "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TMPDIR": str(workdir)}

        def set_limits() -> None:  # runs in the child between fork and exec: async-signal-safe calls only
            resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
            resource.setrlimit(resource.RLIMIT_AS, (limits.memory_mb << 20,) * 2)
            resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))
            resource.setrlimit(resource.RLIMIT_FSIZE, (limits.max_file_mb << 20,) * 2)
            resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

        start = time.perf_counter()
        with open(workdir / "stdout", "wb") as out, open(workdir / "stderr", "wb") as err, \
                open(workdir / "stdin", "w+b") as inp:
            inp.write(stdin.encode())
            inp.seek(0)
            if as_nobody:
                for f in (out, err):
                    os.fchown(f.fileno(), NOBODY_UID, NOBODY_UID)
            try:
                proc = subprocess.Popen(argv, cwd=workdir, env=env, stdin=inp, stdout=out, stderr=err,
                                        preexec_fn=set_limits, start_new_session=True, close_fds=True)
            except OSError as e:
                return SandboxResult("error", None, "", f"could not start the sandbox: {e}", 0.0)
            try:
                returncode = proc.wait(timeout=limits.timeout)
                status = "ok" if returncode == 0 else ("killed" if returncode < 0 else "error")
            except subprocess.TimeoutExpired:
                returncode, status = None, "timeout"
            finally:
                _kill_group(proc)
        seconds = time.perf_counter() - start
        stdout = _read_capped(workdir / "stdout")
        stderr = _read_capped(workdir / "stderr")
        if status == "ok" and proc.returncode not in (0, None):
            status = "error"
        return SandboxResult(status, returncode, stdout, stderr, seconds)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the program's whole process group (it was started in its own session), then reap it."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL cannot be ignored
        pass


def _read_capped(path: Path) -> str:
    try:
        with open(path, "rb") as f:
            data = f.read(OUTPUT_CAP + 1)
    except OSError:
        return ""
    text = data[:OUTPUT_CAP].decode("utf-8", errors="replace")
    return text + ("\n[... output truncated]" if len(data) > OUTPUT_CAP else "")
