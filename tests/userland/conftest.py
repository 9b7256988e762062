"""Fixtures for userland tests: a real kernel on the embedded `tiny` model, in a subprocess."""
from __future__ import annotations

import pytest

from tests.kernels import running_kernel


@pytest.fixture(scope="module")
def kernel_home():
    """The home of a real kernel running for the whole module."""
    with running_kernel() as (home, _):
        yield home


@pytest.fixture
def own_kernel():
    """(home, Popen) of a kernel of this test alone, for tests that kill it."""
    with running_kernel() as kernel:
        yield kernel
