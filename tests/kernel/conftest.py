"""Fixtures of the kernel's server and syscall table tests: the syscall layer's test
handlers and server (tests/syscalls/conftest.py)."""
from tests.syscalls.conftest import handlers, raw, server, sockdir  # noqa: F401 (fixtures)
