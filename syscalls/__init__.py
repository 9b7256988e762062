"""The syscall ABI, the contract the kernel and every program share (xv6's syscall.h and
user.h): numbers, argument specs, wire format v1, error codes, the result type of every
syscall, the client connection, and where a home keeps its socket and token.

It imports only zmq, msgpack and the standard library: nothing of the kernel, the
drivers or torch. The kernel's side of the table (number -> sys_* function), its server
and the functions themselves live in kernel/.
"""
from .errors import (CODES, E2BIG, EACCES, EAGAIN, EBUSY, ECANCELED, ECHILD, EDEAD, EINTR,
                     EINVAL, EIO, ENOENT, ENOMEM, ENOSYS, EPERM, EPROTO, ESRCH, ETIMEDOUT,
                     CallTimeout, KernelDead, SyscallError, WireError)
from .numbers import Sys, sys_name
from .client import Connection

__all__ = [
    "Sys", "sys_name", "Connection", "SyscallError", "KernelDead", "CallTimeout", "WireError",
    "CODES", "E2BIG", "EACCES", "EAGAIN", "EBUSY", "ECANCELED", "ECHILD", "EDEAD", "EINTR",
    "EINVAL", "EIO", "ENOENT", "ENOMEM", "ENOSYS", "EPERM", "EPROTO", "ESRCH", "ETIMEDOUT",
]
