"""The kernel's home directory: where a running kernel can be found and who may talk to it.

Layout (HOME is --home, else $LLMOS_HOME, else ~/.llmos):

    HOME/run/             0700, owned by us: nobody else may even look up the socket
    HOME/run/kernel.sock  the syscall socket (the server binds it; release() removes it)
    HOME/run/kernel.pid   the kernel's pid, exclusively flock()ed for the kernel's life
    HOME/run/token        0600: the owner token, regenerated at every boot
    HOME/log/kernel.log   the kernel's own log
    HOME/log/<pid>.log    stdout and stderr of spawned process <pid>

The lock, not the file, says whether a kernel runs: a pid file left by a dead kernel is
unlocked and is taken over. No torch, no engine: clients import this to find the token.
"""
from __future__ import annotations

import errno
import fcntl
import os
import secrets
import stat
from pathlib import Path

ENV = "LLMOS_HOME"             # overrides the default home
DEFAULT = "~/.llmos"           # the home when neither --home nor $LLMOS_HOME is given
SUN_PATH_MAX = 107             # bytes of a unix socket path (sun_path is 108 with the NUL)


class HomeError(Exception):
    """The home cannot be used: another kernel holds it, or its permissions are unsafe."""


class NoKernel(HomeError):
    """No kernel is running on this home (no live lock on the pid file)."""


def resolve(path: str | os.PathLike | None = None) -> Path:
    """The home directory: path if given, else $LLMOS_HOME, else ~/.llmos (absolute)."""
    chosen = path if path not in (None, "") else os.environ.get(ENV) or DEFAULT
    return Path(chosen).expanduser().absolute()


class Home:
    """Paths of one home, and the kernel's claim on it (acquire / release).

    Only the kernel calls acquire() and release(), from its boot thread; the path
    attributes and running_pid() may be used by anyone.
    """

    def __init__(self, path: str | os.PathLike | None = None):
        self.path = resolve(path)
        self.run_dir = self.path / "run"
        self.log_dir = self.path / "log"
        self.socket_path = self.run_dir / "kernel.sock"
        self.pid_path = self.run_dir / "kernel.pid"
        self.token_path = self.run_dir / "token"
        self.kernel_log = self.log_dir / "kernel.log"
        self._lock_fd: int | None = None   # the locked pid file; None when not acquired

    def __repr__(self):
        return f"Home({str(self.path)!r})"

    def proc_log(self, pid: int) -> Path:
        """The log file of spawned process pid."""
        return self.log_dir / f"{pid}.log"

    @property
    def socket_url(self) -> str:
        return f"ipc://{self.socket_path}"

    # ---- the kernel's side --------------------------------------------------------------

    def acquire(self) -> str:
        """Claim this home for the calling process; return the fresh owner token.

        Raises HomeError if another kernel holds the home (naming its pid), if run/ is
        not a directory owned by us, or if the socket path is too long for AF_UNIX.
        """
        if self._lock_fd is not None:
            raise HomeError(f"{self.path}: already acquired by this process")
        if len(os.fsencode(self.socket_path)) > SUN_PATH_MAX:
            raise HomeError(f"{self.socket_path}: longer than {SUN_PATH_MAX} bytes, "
                            f"too long for a unix socket; choose a shorter --home")
        self.path.mkdir(mode=0o700, parents=True, exist_ok=True)
        _private_dir(self.run_dir)
        _private_dir(self.log_dir)
        self._lock_fd = self._lock_pid_file()
        try:
            os.ftruncate(self._lock_fd, 0)
            os.pwrite(self._lock_fd, f"{os.getpid()}\n".encode(), 0)
            _unlink(self.socket_path)            # left by a dead kernel: bind would fail
            token = secrets.token_hex(32)
            _write_private(self.token_path, token + "\n")
        except BaseException:
            self.release()
            raise
        return token

    def release(self) -> None:
        """Remove the socket, the token and the pid file, then drop the lock. Idempotent."""
        if self._lock_fd is None:
            return
        # Unlink while still holding the lock, so no one takes over a file being removed.
        for p in (self.socket_path, self.token_path, self.pid_path):
            _unlink(p)
        os.close(self._lock_fd)
        self._lock_fd = None

    def _lock_pid_file(self) -> int:
        """Open and flock the pid file; retry if a releasing kernel unlinked it under us."""
        for _ in range(10):
            fd = os.open(self.pid_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                os.close(fd)
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise
                pid = _read_pid(self.pid_path)
                who = f"pid {pid}" if pid else "another process"
                raise HomeError(f"a kernel is already running on {self.path} ({who}); "
                                f"stop it or choose another --home") from None
            try:
                same = os.fstat(fd).st_ino == os.stat(self.pid_path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                return fd
            os.close(fd)                         # we locked an unlinked file: try again
        raise HomeError(f"{self.pid_path}: could not be locked (keeps being replaced)")

    # ---- anyone's side --------------------------------------------------------------

    def running_pid(self) -> int | None:
        """The pid of the kernel holding this home, or None if none holds it."""
        if self._lock_fd is not None:
            return os.getpid()
        try:
            fd = os.open(self.pid_path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise
            return _read_pid(self.pid_path) or -1   # locked: alive, even if pid unreadable
        finally:
            os.close(fd)                            # also drops our shared lock, if taken
        return None


def read_token(home: Home | str | os.PathLike | None = None) -> str:
    """The owner token of the kernel running on home (a Home, a path, or None for the default).

    Raises NoKernel if no kernel holds the home, HomeError if the token cannot be read.
    """
    h = home if isinstance(home, Home) else Home(home)
    if h.running_pid() is None:
        raise NoKernel(f"no llmos kernel is running on {h.path} "
                       f"(no live lock on {h.pid_path})")
    try:
        token = h.token_path.read_text().strip()
    except FileNotFoundError:
        raise NoKernel(f"the kernel on {h.path} has not written its token yet "
                       f"({h.token_path} is missing)") from None
    except PermissionError:
        raise HomeError(f"{h.token_path}: permission denied; only the kernel's owner "
                        f"may connect with the owner token") from None
    if not token:
        raise NoKernel(f"{h.token_path} is empty: the kernel is still booting")
    return token


def _private_dir(path: Path) -> None:
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


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _unlink(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
