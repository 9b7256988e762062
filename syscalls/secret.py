"""A spawned process's own secret (the token it says hello with): how the kernel hands it
over, and how the process takes it. Shared by the kernel (kernel/proc.py) and the SDK.

The secret is never in the environment, where a sibling running as the same uid could
read it from /proc/<pid>/environ for the process's whole life. The kernel writes it into
a pipe, closes the write end, and starts the process with the read end open and its
number in LLMOS_TOKEN_FD. The first own_token() of the process reads it, closes the fd,
removes LLMOS_TOKEN_FD from os.environ and keeps the secret in memory: a program the
process starts itself does not inherit its identity (it is not an llmos process unless
spawned through the kernel). A program in another language reads the fd itself, once;
in a shell: `read -r token < /proc/self/fd/$LLMOS_TOKEN_FD` (dash takes no fd above 9
in `<&N`). A wrapper that does not read it (`sh -c 'python agent.py'`) passes it on:
the first SDK program below it takes the secret, a second one is told it was taken.

Limit: between its exec and its first own_token(), a sibling of the same uid may read
the pipe through /proc/<pid>/fd; the process then finds it empty and own_token() says
the secret was taken, rather than two processes sharing one identity unnoticed.
"""
from __future__ import annotations

import os
import stat
import sys
import threading

from .errors import EACCES, SyscallError

TOKEN_FD_ENV = "LLMOS_TOKEN_FD"   # names the inherited fd that holds a spawned process's secret
MAX_SECRET = 4096                 # bytes read from the fd; a secret is 64 hex digits
PR_SET_DUMPABLE = 4               # <linux/prctl.h>

_lock = threading.Lock()          # guards the two below: one reader of the fd per process
_secret: str | None = None        # the secret, once taken
_failure: str | None = None       # why taking it failed, said again by every later call


def hand_over(secret: str) -> int:
    """Kernel side: the read end of a new pipe that holds secret, its write end closed (the
    reader gets the secret, then EOF). Close-on-exec: pass it to the one child (pass_fds)."""
    r, w = os.pipe()
    try:
        os.write(w, secret.encode() + b"\n")     # far below PIPE_BUF: one write, never blocks
    except BaseException:
        os.close(r)
        raise
    finally:
        os.close(w)
    return r


def own_token() -> str | None:
    """This process's secret if the kernel spawned it, else None (no LLMOS_TOKEN_FD).

    Read from the fd on the first call (which closes it and removes LLMOS_TOKEN_FD from
    os.environ), from memory after. Thread-safe. Raises SyscallError EACCES if the fd
    holds no secret: a sibling read it first, or this process inherited the variable
    from an agent but not the pipe.
    """
    global _secret, _failure
    with _lock:
        if _secret is None and _failure is None and TOKEN_FD_ENV in os.environ:
            try:
                _secret = _take(os.environ.pop(TOKEN_FD_ENV))
            except SyscallError as e:
                _failure = e.msg
        if _failure is not None:
            raise SyscallError(EACCES, _failure)
        return _secret


def _take(name: str) -> str:
    """Read the secret from fd `name` and close it. Raises SyscallError EACCES."""
    _undumpable()
    try:
        fd = int(name)
        if not stat.S_ISFIFO(os.fstat(fd).st_mode):
            raise OSError("not a pipe")
    except (ValueError, OSError):
        raise SyscallError(EACCES, f"{TOKEN_FD_ENV}={name} names no pipe of the kernel: this "
                                   "process was not spawned by the kernel (it inherited the "
                                   "variable from one that was); start it with spawn() or "
                                   "`llmos run` to give it an identity of its own") from None
    try:
        os.set_blocking(fd, False)               # a pipe that is not ours must not hang us
        data = os.read(fd, MAX_SECRET)
    except BlockingIOError:
        data = b""
    finally:
        os.close(fd)
    secret = data.decode(errors="replace").strip()
    if not secret:
        raise SyscallError(EACCES, f"this process's secret was already taken from its "
                                   f"{TOKEN_FD_ENV} pipe (by another process, or by an "
                                   f"earlier read in this one): it cannot say hello as itself")
    return secret


def _undumpable() -> None:
    """Make this process non-dumpable before it holds its secret: then /proc/<pid>/environ,
    fd and mem of this process belong to root, and siblings running as the same uid can no
    longer open them (nor ptrace it) to copy the secret from its memory. Linux only; a
    failure is ignored (the secret is still out of the environment)."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)
    except (OSError, AttributeError):
        pass
