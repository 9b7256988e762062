"""The reaper: sees a watched process die at once, without polling.

Used by the process table (kernel/proc.py): `watch(proc, child)` takes any object with
an `os_pid`, and `died(proc, None)` is called on the reaper thread when it exits.
"""
from __future__ import annotations

import os
import selectors
import threading
from typing import Any, Callable


class Reaper:
    """Sees a watched process die at once and calls died(proc, None).

    One thread polls the pidfds of all watched processes (new ones arrive through a pipe,
    so only that thread touches the selector). Without pidfds, a spawned child gets a
    thread of its own blocked in waitid(WNOWAIT), and an attached process is not watched.
    """

    def __init__(self, died: Callable[[Any, int | None], bool]):
        self._died = died
        self._pending: list[tuple[Any, int]] = []     # guarded by _mu
        self._mu = threading.Lock()
        self._wake_r, self._wake_w = os.pipe()
        self._sel = selectors.DefaultSelector()        # reaper thread only
        self._sel.register(self._wake_r, selectors.EVENT_READ)
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="llmos-reaper", daemon=True)
        self._thread.start()

    def watch(self, p, child: bool) -> None:
        try:
            fd = os.pidfd_open(p.os_pid)
        except ProcessLookupError:
            self._died(p, None)                 # an attached pid that vanished already
            return
        except (AttributeError, OSError):       # no pidfds on this OS or kernel
            if child:
                threading.Thread(target=self._wait_child, args=(p,), daemon=True,
                                 name=f"llmos-wait-{p.pid}").start()
            return
        with self._mu:
            self._pending.append((p, fd))
        os.write(self._wake_w, b"w")

    def _wait_child(self, p) -> None:
        try:
            os.waitid(os.P_PID, p.os_pid, os.WEXITED | os.WNOWAIT)   # peek, do not reap
        except ChildProcessError:
            pass
        self._died(p, None)

    def _run(self) -> None:
        while True:
            for key, _ in self._sel.select():
                if key.fd == self._wake_r:
                    os.read(self._wake_r, 4096)
                    with self._mu:
                        pending, self._pending = self._pending, []
                    if self._stopping:
                        for fd in [k.fd for k in self._sel.get_map().values()]:
                            self._sel.unregister(fd)
                            os.close(fd)
                        for _, fd in pending:
                            os.close(fd)
                        return
                    for p, fd in pending:
                        self._sel.register(fd, selectors.EVENT_READ, p)
                else:
                    self._sel.unregister(key.fd)
                    os.close(key.fd)
                    self._died(key.data, None)

    def stop(self) -> None:
        if self._stopping:
            return
        self._stopping = True
        os.write(self._wake_w, b"s")
        self._thread.join(timeout=5)
        os.close(self._wake_w)
