"""The kernel's claim on its home: lock the pid file, make run/ and log/ private, write
a fresh owner token; undo it all at shutdown. The layout and the client's side (finding a
running kernel, reading its token) are in syscalls/home.py.
"""
from __future__ import annotations

import errno
import fcntl
import os
import secrets
import stat
from pathlib import Path

from llmos.syscalls.home import Home, HomeError, read_pid

SUN_PATH_MAX = 107             # bytes of a unix socket path (sun_path is 108 with the NUL)


class HomeLock:
    """This process's claim on `home`. Only the kernel uses it, from its boot thread."""

    def __init__(self, home: Home):
        self.home = home
        self._fd: int | None = None        # the locked pid file; None when not held

    def acquire(self) -> str:
        """Claim the home for the calling process; return the fresh owner token.

        Raises HomeError if another kernel holds it (naming its pid), if run/ or log/ is
        not a directory owned by us, or if the socket path is too long for AF_UNIX.
        """
        h = self.home
        if self._fd is not None:
            raise HomeError(f"{h.path}: already acquired by this process")
        if len(os.fsencode(h.socket_path)) > SUN_PATH_MAX:
            raise HomeError(f"{h.socket_path}: longer than {SUN_PATH_MAX} bytes, "
                            f"too long for a unix socket; choose a shorter --home")
        h.path.mkdir(mode=0o700, parents=True, exist_ok=True)
        private_dir(h.run_dir)
        private_dir(h.log_dir)
        self._fd = self._lock_pid_file()
        try:
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, f"{os.getpid()}\n".encode(), 0)
            _unlink(h.socket_path)            # left by a dead kernel: bind would fail
            token = secrets.token_hex(32)
            _write_private(h.token_path, token + "\n")
        except BaseException:
            self.release()
            raise
        return token

    def release(self) -> None:
        """Remove the socket, the token and the pid file, then drop the lock. Idempotent."""
        if self._fd is None:
            return
        # Unlink while still holding the lock, so no one takes over a file being removed.
        for p in (self.home.socket_path, self.home.token_path, self.home.pid_path):
            _unlink(p)
        os.close(self._fd)
        self._fd = None

    def _lock_pid_file(self) -> int:
        """Open and flock the pid file; retry if a releasing kernel unlinked it under us."""
        path = self.home.pid_path
        for _ in range(10):
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                os.close(fd)
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise
                pid = read_pid(path)
                who = f"pid {pid}" if pid else "another process"
                raise HomeError(f"a kernel is already running on {self.home.path} ({who}); "
                                f"stop it or choose another --home") from None
            try:
                same = os.fstat(fd).st_ino == os.stat(path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                return fd
            os.close(fd)                         # we locked an unlinked file: try again
        raise HomeError(f"{path}: could not be locked (keeps being replaced)")


def private_dir(path: Path) -> None:
    """Make path a 0700 directory owned by us; refuse a symlink or another user's directory."""
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise HomeError(f"{path}: exists and is not a directory")
    if st.st_uid != os.getuid():
        raise HomeError(f"{path}: owned by uid {st.st_uid}, not by us (uid {os.getuid()}); "
                        f"refusing to use it")
    if stat.S_IMODE(st.st_mode) != 0o700:
        os.chmod(path, 0o700)


def _write_private(path: Path, text: str) -> None:
    """Write text to path atomically, readable by the owner only (0600) from its first byte."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    _unlink(tmp)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, text.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _unlink(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
