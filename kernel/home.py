"""The kernel's claim on its home: check that the home is ours alone, lock the pid file,
make run/ and log/ private, write a fresh owner token; undo it all at shutdown. The layout
and the client's side (finding a running kernel, reading its token) are in syscalls/home.py.

Trust: the home must be a directory owned by our uid that no one else may write in, and
run/ and log/ real 0700 directories of ours; anything else is refused (HomeError), since
a kernel (perhaps root) writes there. The pid file and the token are opened relative to
a directory fd of run/, never following a symlink, so swapping run/ or planting a link
after the checks cannot redirect a write.
"""
from __future__ import annotations

import errno
import fcntl
import os
import secrets
import stat

from llmos.syscalls.home import Home, HomeError, open_in, private_dir, read_pid, trusted_home

SUN_PATH_MAX = 107             # bytes of a unix socket path (sun_path is 108 with the NUL)


class HomeLock:
    """This process's claim on `home`. Only the kernel uses it, from its boot thread."""

    def __init__(self, home: Home):
        self.home = home
        self._fd: int | None = None        # the locked pid file; None when not held
        self._run: int | None = None       # run/, held open while the lock is

    def acquire(self) -> str:
        """Claim the home for the calling process; return the fresh owner token.

        Raises HomeError if another kernel holds it (naming its pid), if the home is not
        ours alone (owner, group- or world-writable), if run/ or log/ is not a directory
        owned by us, if the pid file or the token is a symlink, or if the socket path is
        too long for AF_UNIX.
        """
        h = self.home
        if self._fd is not None:
            raise HomeError(f"{h.path}: already acquired by this process")
        if len(os.fsencode(h.socket_path)) > SUN_PATH_MAX:
            raise HomeError(f"{h.socket_path}: longer than {SUN_PATH_MAX} bytes, "
                            f"too long for a unix socket; choose a shorter --home")
        h.path.mkdir(mode=0o700, parents=True, exist_ok=True)
        home = trusted_home(h)
        try:
            os.close(private_dir(home, h.log_dir.name, h.log_dir))
            self._run = private_dir(home, h.run_dir.name, h.run_dir)
        finally:
            os.close(home)
        try:
            self._fd = self._lock_pid_file()
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, f"{os.getpid()}\n".encode(), 0)
            _unlink(h.socket_path.name, self._run)    # left by a dead kernel: bind would fail
            token = secrets.token_hex(32)
            self._write_token(token + "\n")
        except BaseException:
            self.release()
            raise
        return token

    def share_socket(self, gid: int) -> None:
        """After the socket is bound: let the group gid (the agent user's, kernel/agentuser.py)
        connect to it. The home and run/ become searchable by all (run/ 0711: its names
        cannot be listed), the socket group gid and 0660; the token stays 0600, log/ 0700.
        A later boot without an agent user makes run/ 0700 again."""
        home = trusted_home(self.home)
        try:
            os.fchmod(home, stat.S_IMODE(os.fstat(home).st_mode) | 0o011)
        finally:
            os.close(home)
        os.fchmod(self._run, 0o711)
        name = self.home.socket_path.name   # run/ is ours alone: no link can be planted there
        os.chown(name, -1, gid, dir_fd=self._run, follow_symlinks=False)
        os.chmod(name, 0o660, dir_fd=self._run)

    def private_dir(self, path) -> None:
        """Make path, a directory right in the home (kv/), private as run/ and log/ are:
        0700 and ours, never a symlink or another user's (HomeError). The home is checked
        again first: ours alone, so nobody else can swap the directory afterwards."""
        home = trusted_home(self.home)
        try:
            os.close(private_dir(home, path.name, path))
        finally:
            os.close(home)

    def release(self) -> None:
        """Remove the socket, the token and the pid file, then drop the lock. Idempotent."""
        if self._run is None:
            return
        if self._fd is not None:
            # Unlink while still holding the lock, so no one takes over a file being removed.
            for p in (self.home.socket_path, self.home.token_path, self.home.pid_path):
                _unlink(p.name, self._run)
            os.close(self._fd)
            self._fd = None
        os.close(self._run)
        self._run = None

    def _lock_pid_file(self) -> int:
        """Open and flock the pid file; retry if a releasing kernel unlinked it under us."""
        path, name = self.home.pid_path, self.home.pid_path.name
        for _ in range(10):
            fd = open_in(self._run, path, os.O_RDWR | os.O_CREAT, 0o644)
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
                same = os.fstat(fd).st_ino == os.stat(name, dir_fd=self._run,
                                                      follow_symlinks=False).st_ino
            except FileNotFoundError:
                same = False
            if same:
                return fd
            os.close(fd)                         # we locked an unlinked file: try again
        raise HomeError(f"{path}: could not be locked (keeps being replaced)")

    def _write_token(self, text: str) -> None:
        """Replace run/token atomically, readable by the owner only (0600) from its first
        byte. A symlink there is refused: nothing of ours makes one."""
        path = self.home.token_path
        try:
            if stat.S_ISLNK(os.stat(path.name, dir_fd=self._run, follow_symlinks=False).st_mode):
                raise HomeError(f"{path}: is a symlink; refusing to use this home")
        except FileNotFoundError:
            pass
        tmp = f".{path.name}.{os.getpid()}"
        _unlink(tmp, self._run)
        fd = open_in(self._run, path.with_name(tmp), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, text.encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path.name, src_dir_fd=self._run, dst_dir_fd=self._run)


def _unlink(name: str, dir_fd: int) -> None:
    try:
        os.unlink(name, dir_fd=dir_fd)
    except FileNotFoundError:
        pass
