"""How an agent's OS process is born: a new log file (log/<pid>.log, opened relative to
the log directory's fd, never through a symlink), its secret in an inherited pipe
(syscalls/secret.py), and its start through the subreaper (it dies with the kernel).
"""
from __future__ import annotations

import os
import subprocess

from llmos.syscalls.secret import TOKEN_FD_ENV, hand_over

from . import subreaper


def start(argv: list[str], env: dict, log_dir, log_name: str, secret: str,
           user=None) -> subprocess.Popen:
    """Start argv in a session of its own (as user, if given), stdout and stderr to the new
    log_dir/log_name, both opened relative to one directory fd (a log/ swapped meanwhile
    cannot redirect them), secret in a pipe it inherits (its fd in env TOKEN_FD_ENV). A
    start that fails leaves no log. Raises OSError, ValueError."""
    logs = os.open(log_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        fd, pipe = _new_log(logs, log_name), None
        try:
            pipe = hand_over(secret)
            return subreaper.popen(argv, user, stdin=subprocess.DEVNULL, stdout=fd,
                                   stderr=subprocess.STDOUT, env={**env, TOKEN_FD_ENV: str(pipe)},
                                   pass_fds=(pipe,), start_new_session=True, close_fds=True)
        except BaseException:
            os.unlink(log_name, dir_fd=logs)   # ours, new and empty: no clutter from a failure
            raise
        finally:
            os.close(fd)
            if pipe is not None:
                os.close(pipe)                 # the child's copy is the only one left
    finally:
        os.close(logs)


def _new_log(logs: int, name: str) -> int:
    """Open a new log file in the directory fd logs (0600, no symlink followed); an older
    one is moved aside to name.old."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW
    try:
        return os.open(name, flags, 0o600, dir_fd=logs)
    except FileExistsError:                 # the pid space wrapped: keep one older log
        os.replace(name, name + ".old", src_dir_fd=logs, dst_dir_fd=logs)
        return os.open(name, flags, 0o600, dir_fd=logs)
