"""One thread that runs short functions at given times: wait timeouts, periodic chores.

A function must not block: it only decides and queues (a reply, a command).
"""
from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from typing import Callable

log = logging.getLogger("llmos.timers")


class Timers:
    def __init__(self):
        self._heap: list = []                 # (when, seq, fn), guarded by _cond
        self._seq = itertools.count()
        self._cond = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="llmos-timers", daemon=True)
        self._thread.start()

    def after(self, delay: float, fn: Callable[[], object]) -> None:
        """Run fn() on the timer thread once `delay` seconds have passed."""
        with self._cond:
            heapq.heappush(self._heap, (time.monotonic() + delay, next(self._seq), fn))
            self._cond.notify()

    def every(self, period: float, fn: Callable[[], object]) -> None:
        """Run fn() every `period` seconds until stop()."""
        def tick():
            fn()
            self.after(period, tick)
        self.after(period, tick)

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join(5)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stopping and (not self._heap or self._heap[0][0] > time.monotonic()):
                    self._cond.wait(None if not self._heap else self._heap[0][0] - time.monotonic())
                if self._stopping:
                    return
                _, _, fn = heapq.heappop(self._heap)
            try:
                fn()
            except Exception:
                log.exception("timer %r failed", fn)
