"""The syscall ABI: numbers, wire format v1, argument specs, errors, the table, server, client.

The client half (numbers, errors, wire, client) imports only zmq, msgpack and the stdlib.
The server half (args, specs, table, server) imports no torch and nothing of the kernel:
the kernel registers its handlers in a SyscallTable.
"""
from .errors import (CODES, E2BIG, EACCES, EAGAIN, EBUSY, ECANCELED, ECHILD, EDEAD, EINTR,
                     EINVAL, EIO, ENOMEM, ENOSYS, EPERM, EPROTO, ESRCH, ETIMEDOUT,
                     CallTimeout, KernelDead, SyscallError, WireError)
from .numbers import Sys, sys_name
from .client import Connection

__all__ = [
    "Sys", "sys_name", "Connection", "SyscallError", "KernelDead", "CallTimeout", "WireError",
    "CODES", "E2BIG", "EACCES", "EAGAIN", "EBUSY", "ECANCELED", "ECHILD", "EDEAD", "EINTR",
    "EINVAL", "EIO", "ENOMEM", "ENOSYS", "EPERM", "EPROTO", "ESRCH", "ETIMEDOUT",
    # server half, imported lazily so an agent never loads it:
    "Server", "SyscallTable", "Call", "ConnState", "PENDING", "Spec", "SPECS",
]

_LAZY = {"Server": "server", "SyscallTable": "table", "Call": "table", "ConnState": "table",
         "PENDING": "table", "Spec": "args", "SPECS": "specs"}


def __getattr__(name):
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
