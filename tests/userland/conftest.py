"""Fixtures for userland tests: a real kernel on the embedded `tiny` model, in a subprocess."""
from __future__ import annotations

import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BOOT_TIMEOUT = 60       # seconds a kernel may take to boot (a busy 2-core box: ~10 s)
STOP_TIMEOUT = 30       # seconds a kernel may take to shut down after SIGTERM


def short_home() -> str:
    """A fresh home with a short path (a unix socket path is limited to 107 bytes)."""
    return tempfile.mkdtemp(prefix="llmos-", dir="/tmp")


def start_kernel(home: str) -> subprocess.Popen:
    """A kernel on `tiny` with a 16 MiB KV pool; returns once it listens on home.
    Raises AssertionError (with what it printed) if it does not within BOOT_TIMEOUT."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLMOS_")}
    proc = subprocess.Popen([sys.executable, "-m", "llmos.kernel", "--home", home,
                             "--kv-memory", "16M"], cwd=ROOT, env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
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
    proc.stdout.close()


@pytest.fixture(scope="module")
def kernel_home():
    """The home of a real kernel running for the whole module."""
    home = short_home()
    proc = start_kernel(home)
    yield home
    stop_kernel(proc)
    shutil.rmtree(home, ignore_errors=True)


@pytest.fixture
def own_kernel():
    """(home, Popen) of a kernel of this test alone, for tests that kill it."""
    home = short_home()
    proc = start_kernel(home)
    yield home, proc
    stop_kernel(proc)
    shutil.rmtree(home, ignore_errors=True)


@pytest.fixture
def no_agent_env(monkeypatch):
    """Behave as a program started outside the kernel."""
    for var in ("LLMOS_SOCKET", "LLMOS_TOKEN", "LLMOS_PID", "LLMOS_HOME"):
        monkeypatch.delenv(var, raising=False)
