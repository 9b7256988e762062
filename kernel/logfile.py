"""A log file in the home's log/ that rotates by size: the kernel's log and the audit log.

Unit: bytes. A write that would take the file past max_bytes first moves it aside
(name -> name.1 -> ... -> name.<keep>, the oldest dropped), so one log takes at most
about (keep + 1) x max_bytes on disk, however much is logged.

Trust (as the home's other files, syscalls/home.py): the directory is opened once,
without following a symlink, and held open; the file is opened relative to that fd with
O_NOFOLLOW, O_APPEND and 0600. A log/ swapped after boot, or a symlink planted at the
file's name, cannot redirect a write (the open fails: HomeError). Renames never follow
symlinks.

Threads: any thread may write; a lock serializes writes and rotation.
"""
from __future__ import annotations

import logging
import os
import sys
import threading
from pathlib import Path

from llmos.syscalls.home import open_in

_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_APPEND = os.O_WRONLY | os.O_CREAT | os.O_APPEND


class LogFile:
    """directory/name, appended to and rotated at max_bytes, keeping `keep` older files.
    Opening raises OSError, or HomeError if the name is a symlink."""

    def __init__(self, directory: str | os.PathLike, name: str, max_bytes: int, keep: int):
        self.path = Path(directory) / name
        self.max_bytes, self.keep = max_bytes, keep
        self._lock = threading.Lock()
        # Guarded by _lock: the directory, the file (None after a failed open: the next
        # write opens it again) and its size.
        self._dir: int | None = os.open(directory, _DIR)
        self._fd: int | None = None
        self._size = 0
        try:
            self._open()
        except BaseException:
            os.close(self._dir)
            raise

    def write(self, data: bytes) -> None:
        """Append data (whole lines), rotating first if it would not fit. Raises OSError,
        or HomeError for a symlink at the name; the next write tries anew."""
        with self._lock:
            if self._dir is None:
                raise OSError(f"{self.path}: closed")
            if self._fd is None:
                self._open()
            if self._size and self._size + len(data) > self.max_bytes:
                self._rotate()
                self._open()
            os.write(self._fd, data)
            self._size += len(data)

    def _open(self) -> None:
        self._fd = open_in(self._dir, self.path, _APPEND, 0o600)
        st = os.fstat(self._fd)
        if st.st_mode & 0o077:                  # made before llmos made its logs private
            os.fchmod(self._fd, 0o600)
        self._size = st.st_size

    def _rotate(self) -> None:
        os.close(self._fd)
        self._fd = None
        name = self.path.name
        for i in range(self.keep - 1, 0, -1):
            try:
                os.replace(f"{name}.{i}", f"{name}.{i + 1}", src_dir_fd=self._dir,
                           dst_dir_fd=self._dir)
            except FileNotFoundError:
                pass
        if self.keep > 0:
            os.replace(name, f"{name}.1", src_dir_fd=self._dir, dst_dir_fd=self._dir)
        else:
            os.unlink(name, dir_fd=self._dir)

    def close(self) -> None:
        """Close the file and the directory. Idempotent; later writes raise OSError."""
        with self._lock:
            for fd in (self._fd, self._dir):
                if fd is not None:
                    os.close(fd)
            self._fd = self._dir = None


class LogHandler(logging.Handler):
    """A logging handler onto a LogFile. A failed write is told once on stderr (which a
    detached kernel sends to log/kernel.out), not once per record."""

    def __init__(self, file: LogFile):
        super().__init__()
        self.file = file
        self._failing = False

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.file.write((self.format(record) + "\n").encode(errors="replace"))
            self._failing = False
        except Exception as e:
            if not self._failing:
                self._failing = True
                print(f"llmos kernel: cannot write {self.file.path}: {e}", file=sys.stderr,
                      flush=True)

    def close(self) -> None:
        self.file.close()
        super().close()
