"""Where a kernel's home keeps its socket, token, pid file and logs, and how a client
finds a running kernel there. The kernel's claim on a home (locking it, writing the
token) is kernel/home.py; this half is shared by both sides and needs no torch.

Layout (HOME is --home, else $LLMOS_HOME, else ~/.llmos):

    HOME/run/             0700, owned by the kernel's user: nobody else may look up the socket
                          (0711 with --agent-user: its agents may, without listing run/)
    HOME/run/kernel.sock  the syscall socket (0600; with --agent-user, 0660 and that user's group)
    HOME/run/kernel.pid   the kernel's pid, exclusively flock()ed for the kernel's life
    HOME/run/token        0600: the owner token, regenerated at every boot
    HOME/log/kernel.log   the kernel's own log (events: boot, spawn, signal, exit, reap),
                          rotated by size to kernel.log.1..3
    HOME/log/audit.log    security events, one JSON object a line (kernel/audit.py), 0600,
                          rotated by size to audit.log.1..3
    HOME/log/kernel.out   stdout and stderr of a kernel started with `llmos up -d`
    HOME/log/<pid>.log    stdout and stderr of spawned process <pid> (never overwritten)
    HOME/keys/            0700: CURVE keys for a kernel listening on TCP (syscalls/keys.py)
    HOME/kv/              0700: the KV pages the kernel moves to disk (llmos up --kv-disk)

The lock, not the file, says whether a kernel runs: a pid file left by a dead kernel is
unlocked and is taken over.
"""
from __future__ import annotations

import errno
import fcntl
import os
import stat
from pathlib import Path

ENV = "LLMOS_HOME"             # overrides the default home
DEFAULT = "~/.llmos"           # the home when neither --home nor $LLMOS_HOME is given
_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
_NOFOLLOW = os.O_CLOEXEC | os.O_NOFOLLOW


class HomeError(Exception):
    """The home cannot be used: another kernel holds it, or its permissions are unsafe."""


class NoKernel(HomeError):
    """No kernel is running on this home (no live lock on the pid file)."""


def resolve(path: str | os.PathLike | None = None) -> Path:
    """The home directory: path if given, else $LLMOS_HOME, else ~/.llmos (absolute)."""
    chosen = path if path not in (None, "") else os.environ.get(ENV) or DEFAULT
    return Path(chosen).expanduser().absolute()


class Home:
    """The paths of one home, and whether (and which) kernel runs there. Anyone may use it."""

    def __init__(self, path: str | os.PathLike | None = None):
        self.path = resolve(path)
        self.run_dir = self.path / "run"
        self.log_dir = self.path / "log"
        self.socket_path = self.run_dir / "kernel.sock"
        self.pid_path = self.run_dir / "kernel.pid"
        self.token_path = self.run_dir / "token"
        self.kernel_log = self.log_dir / "kernel.log"
        self.audit_log = self.log_dir / "audit.log"
        self.kernel_out = self.log_dir / "kernel.out"
        self.keys_dir = self.path / "keys"
        self.kv_dir = self.path / "kv"

    def __repr__(self):
        return f"Home({str(self.path)!r})"

    def proc_log(self, pid: int) -> Path:
        """The log file of spawned process pid."""
        return self.log_dir / f"{pid}.log"

    @property
    def socket_url(self) -> str:
        return f"ipc://{self.socket_path}"

    def running_pid(self) -> int | None:
        """The pid of the kernel holding this home, or None if none holds it."""
        try:
            fd = os.open(self.pid_path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as e:
            if e.errno == errno.ELOOP:       # a planted symlink is no kernel of ours
                return None
            raise
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise
            return read_pid(self.pid_path) or -1    # locked: alive, even if pid unreadable
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


def read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


# ---- opening the home's files safely (the kernel and `llmos keys`) -----------------------
def trusted_home(h: Home) -> int:
    """An fd of the home directory, checked: ours and writable by us alone. A symlinked
    home is followed (~/.llmos -> /data/llmos is fine); its target is what is checked."""
    fd = os.open(h.path, _DIR)
    st = os.fstat(fd)
    me, mode = os.getuid(), stat.S_IMODE(st.st_mode)
    problem = (f"owned by uid {st.st_uid}, not by us (uid {me})" if st.st_uid != me else
               f"mode {mode:04o} lets group or others write in it" if mode & 0o022 else None)
    if problem:
        os.close(fd)
        raise HomeError(f"{h.path}: {problem}; refusing to use it as a home")
    return fd


def private_dir(parent: int, name: str, path, create: bool = True) -> int:
    """Make parent/name a 0700 directory owned by us (create=False: it must exist, else
    FileNotFoundError) and return an fd of it; refuse a symlink or another user's
    directory (path names it in the error)."""
    if create:
        try:
            os.mkdir(name, 0o700, dir_fd=parent)
        except FileExistsError:
            pass
    try:
        fd = os.open(name, _DIR | os.O_NOFOLLOW, dir_fd=parent)
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENOTDIR):
            raise HomeError(f"{path}: exists and is not a directory") from None
        raise
    st = os.fstat(fd)
    if st.st_uid != os.getuid():
        os.close(fd)
        raise HomeError(f"{path}: owned by uid {st.st_uid}, not by us (uid {os.getuid()}); "
                        f"refusing to use it")
    if stat.S_IMODE(st.st_mode) != 0o700:
        os.fchmod(fd, 0o700)
    return fd


def open_in(dir_fd: int, path, flags: int, mode: int) -> int:
    """Open path's name in dir_fd, never through a symlink (HomeError naming path)."""
    try:
        return os.open(path.name, flags | _NOFOLLOW, mode, dir_fd=dir_fd)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise HomeError(f"{path}: is a symlink; refusing to use this home") from None
        raise
