"""Real kernel processes for tests: boot one on a short home, stop it. Every wait is bounded."""
from __future__ import annotations

import contextlib
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BOOT_TIMEOUT = 60       # seconds a kernel may take to boot (a busy 2-core box: ~10 s)
STOP_TIMEOUT = 30       # seconds a kernel may take to shut down after SIGTERM


def short_home() -> str:
    """A fresh home with a short path (a unix socket path is limited to 107 bytes)."""
    return tempfile.mkdtemp(prefix="llmos-", dir="/tmp")


def start_kernel(home, *extra: str, env: dict | None = None,
                 kv_memory: str | None = "16M") -> subprocess.Popen:
    """`python -m llmos.kernel --home HOME [--kv-memory 16M] EXTRA...` on the embedded tiny
    model, outside any agent's environment; returns once it listens. Raises AssertionError
    (with what it printed) if it does not within BOOT_TIMEOUT."""
    argv = [sys.executable, "-m", "llmos.kernel", "--home", str(home), *extra]
    if kv_memory is not None:
        argv += ["--kv-memory", kv_memory]
    clean = {k: v for k, v in os.environ.items() if not k.startswith("LLMOS_")}
    proc = subprocess.Popen(argv, cwd=ROOT, env={**clean, **(env or {})},
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    ready, _, _ = select.select([proc.stdout], [], [], BOOT_TIMEOUT)
    line = proc.stdout.readline() if ready else ""
    if "listening on" not in line:
        stop_kernel(proc)
        raise AssertionError(f"the kernel did not boot: {line!r}")
    return proc


def stop_kernel(proc: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL if it has not exited within STOP_TIMEOUT."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(STOP_TIMEOUT)
    if proc.stdout is not None:
        proc.stdout.close()


@contextlib.contextmanager
def running_kernel(*extra: str, **options):
    """(home, Popen) of a kernel on a fresh short home (see start_kernel), stopped and its
    home removed on leaving."""
    home = short_home()
    proc = start_kernel(home, *extra, **options)
    try:
        yield home, proc
    finally:
        stop_kernel(proc)
        shutil.rmtree(home, ignore_errors=True)


TGKILL = {"x86_64": 234, "aarch64": 131}      # the tgkill syscall's number, by machine


def signal_a_thread(pid: int, sig: int) -> int:
    """Send sig to one thread of process pid other than its main one, which does not block
    it (tgkill), as the kernel may when it delivers kill(pid, sig); that thread's id.
    A program whose main thread sleeps in a wait must still act on it. Skips the test
    where tgkill's number is not known; a thread that ends meanwhile is passed over."""
    import ctypes
    import errno
    import platform
    import re

    import pytest
    number = TGKILL.get(platform.machine())
    if number is None:
        pytest.skip(f"tgkill's syscall number on {platform.machine()} is not known here")
    libc = ctypes.CDLL(None, use_errno=True)
    for tid in sorted(int(t) for t in os.listdir(f"/proc/{pid}/task") if int(t) != pid):
        try:
            status = Path(f"/proc/{pid}/task/{tid}/status").read_text()
        except FileNotFoundError:
            continue
        blocked = int(re.search(r"SigBlk:\s*([0-9a-f]+)", status).group(1), 16)
        if blocked & (1 << (sig - 1)):
            continue
        if libc.syscall(number, pid, tid, sig) == 0:
            return tid
        assert ctypes.get_errno() == errno.ESRCH, os.strerror(ctypes.get_errno())
    raise AssertionError(f"pid {pid} has no thread but its main one that takes signal {sig}")


def until(fn, what: str, timeout: float = 60, every: float = 0.05):
    """Poll fn() until it returns something truthy; return that. Fails (AssertionError)
    after timeout seconds, naming what it waited for."""
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out after {timeout}s waiting for {what}"
        time.sleep(every)
