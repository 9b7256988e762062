"""Fixtures for userland tests: a stub kernel (tests/userland/stub_kernel.py) in a subprocess."""
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
READY_TIMEOUT = 30


def start_stub(home: str) -> subprocess.Popen:
    """Start a stub kernel on home; return once it serves (raises after READY_TIMEOUT)."""
    proc = subprocess.Popen([sys.executable, "-m", "tests.userland.stub_kernel", home], cwd=ROOT,
                            stdout=subprocess.PIPE, text=True)
    ready, _, _ = select.select([proc.stdout], [], [], READY_TIMEOUT)
    if not ready or not proc.stdout.readline().startswith("ready"):
        stop_stub(proc)
        raise RuntimeError("stub kernel did not start")
    return proc


def stop_stub(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    proc.stdout.close()


def short_home() -> str:
    """A fresh home with a short path (a unix socket path is limited to 107 bytes)."""
    return tempfile.mkdtemp(prefix="llmos-", dir="/tmp")


@pytest.fixture(scope="module")
def stub_home():
    """The home of a stub kernel running for the whole module."""
    home = short_home()
    proc = start_stub(home)
    yield home
    stop_stub(proc)
    shutil.rmtree(home, ignore_errors=True)


@pytest.fixture
def no_agent_env(monkeypatch):
    """Behave as a program started outside the kernel."""
    for var in ("LLMOS_SOCKET", "LLMOS_TOKEN", "LLMOS_PID", "LLMOS_HOME"):
        monkeypatch.delenv(var, raising=False)
