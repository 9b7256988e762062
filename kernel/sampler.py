"""The sampler: every SAMPLE_PERIOD seconds, CPU% and RSS of each live process (psutil),
and its tokens per second in and out over the last period (from its account's counters,
attached programs included).

Its own thread, so that reading /proc never runs on the engine or the I/O thread; ps
and top read the figures it left on each row (Proc.cpu_percent, rss, tok_in_s, tok_out_s).
"""
from __future__ import annotations

import threading
import time

import psutil

from . import tunables


class Sampler:
    def __init__(self, procs, period: float = tunables.SAMPLE_PERIOD):
        self.procs, self.period = procs, period
        self._handles: dict[int, psutil.Process] = {}     # sampler thread only
        self._tokens: dict[int, tuple] = {}               # pid -> (time, in, out) last seen
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
        self.rates()
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

    def rates(self) -> None:
        """Tokens per second in (prompt) and out (generated) of every live process since
        the previous sample."""
        now, live = time.monotonic(), [p for p in self.procs.procs() if p.alive]
        seen = {}
        for p in live:
            a = p.acct                        # the engine thread's counters: a stale int is fine
            seen[p.pid] = (now, a.prompt_tokens, a.generated_tokens)
            last = self._tokens.get(p.pid)
            if last is not None and now > last[0]:
                dt = now - last[0]
                p.tok_in_s = (a.prompt_tokens - last[1]) / dt
                p.tok_out_s = (a.generated_tokens - last[2]) / dt
        self._tokens = seen
