"""Fixtures for userland tests: a real kernel on the embedded `tiny` model, in a subprocess."""
from __future__ import annotations

import shutil

import pytest

from tests.kernels import ROOT, short_home, start_kernel, stop_kernel  # noqa: F401 (for tests and bench)


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
