"""The shell's status line (the prompt's bottom toolbar) and what completion knows of the
kernel, both read by one thread from the kernel's snapshot (userland/top.py's read) every
REFRESH seconds, so that drawing the prompt never waits on the kernel. When the kernel
stops answering, it says so once, above the prompt.
"""
from __future__ import annotations

import threading

from llmos.syscalls import KernelDead, SyscallError
from llmos.syscalls.types import ProcState

REFRESH = 1.0       # s between snapshots


class StatusLine:
    def __init__(self, sh):
        self.sh = sh
        self.text = " connecting..."
        self.pids: list[int] = []             # for completion
        self.model_names: list[str] = []      # for completion
        self.gone = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="llmos-shell-status")

    def start(self) -> "StatusLine":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        from llmos.userland.top import Rates, read
        rates = Rates()
        while not self._stop.is_set():
            try:
                snap = read(self.sh.k)
            except KernelDead as e:
                if not self.gone:
                    self.gone = True
                    self.text = " kernel gone"
                    self.sh.echo(f"\n[llmos: the kernel went away ({e.msg}); `exit`, then "
                                 f"`llmos up` and `llmos shell` again]")
                return
            except SyscallError as e:
                self.text = f" {e.code}: {e.msg}"
            else:
                self.text = self.render(snap, rates.add(snap))
                self.pids = [p.pid for p in snap.procs]
                self.model_names = [m.name for m in snap.models]
            self._stop.wait(REFRESH)

    def render(self, snap, rates) -> str:
        s, kv = snap.sysinfo, snap.mem.kv
        model = next((m.name for m in snap.models if m.default), s.model)
        running = sum(p.state is ProcState.RUNNING for p in snap.procs)
        ready = sum(p.state is ProcState.READY for p in snap.procs)
        rate = rates["last"]
        out = "-" if rate is None else f"{rate[1]:.0f}"
        jobs = len(self.sh.jobs.jobs())
        return (f" {model} | {s.policy} | KV {kv.used}/{kv.total} | {running} running, "
                f"{ready} ready | {out} tok/s | {jobs} job{'s' * (jobs != 1)}")
