"""The psutil sampler: every SAMPLE_PERIOD seconds, CPU% and RSS of each live process.

Its own thread, so that reading /proc never runs on the engine or the I/O thread; ps
reads the figures it left on each row (Proc.cpu_percent, Proc.rss).
"""
from __future__ import annotations

import threading

import psutil

from . import tunables


class Sampler:
    def __init__(self, procs, period: float = tunables.SAMPLE_PERIOD):
        self.procs, self.period = procs, period
        self._handles: dict[int, psutil.Process] = {}     # sampler thread only
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="llmos-sampler", daemon=True)

    def start(self) -> "Sampler":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            self.sample()

    def sample(self) -> None:
        live = {p.pid: p for p in self.procs.procs() if p.alive and p.os_pid is not None}
        for pid in set(self._handles) - set(live):
            del self._handles[pid]
        for pid, p in live.items():
            try:
                h = self._handles.get(pid)
                if h is None:
                    h = self._handles[pid] = psutil.Process(p.os_pid)
                with h.oneshot():
                    cpu, rss = h.cpu_percent(None), h.memory_info().rss
            except psutil.Error:
                continue
            if p.alive:
                p.cpu_percent, p.rss = cpu, rss
