"""The shell's status line (the prompt's bottom toolbar) and what completion knows of the
kernel, both read by one thread from the kernel's snapshot (userland/top.py's read) every
REFRESH seconds, so that drawing the prompt never waits on the kernel. When the kernel
goes away, it says so once, above the prompt; then, if the shell can reconnect, it tries
every REFRESH seconds and, once a kernel is up again (`llmos up`), the shell goes on
with it (Shell.attach) and says so.
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
        self._attaching = threading.Lock()    # no attach once stop() has returned
        self._thread = threading.Thread(target=self._run, daemon=True, name="llmos-shell-status")

    def start(self) -> "StatusLine":
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop refreshing; once this returns, the shell's connection is not swapped."""
        with self._attaching:
            self._stop.set()

    def _run(self) -> None:
        from llmos.userland.top import Rates, read
        rates = Rates()
        while not self._stop.is_set():
            if self.gone:
                if self.sh.reconnect is None or not self._reconnect():
                    self._stop.wait(REFRESH)
                    continue
                rates = Rates()
            try:
                snap = read(self.sh.k)
            except KernelDead as e:
                self._went_away(e)
                continue
            except SyscallError as e:
                self.text = f" {e.code}: {e.msg}"
            else:
                self.text = self.render(snap, rates.add(snap))
                self.pids = [p.pid for p in snap.procs]
                self.model_names = [m.name for m in snap.models]
            self._stop.wait(REFRESH)

    def _went_away(self, e: KernelDead) -> None:
        self.gone = True
        if self.sh.reconnect is None:
            self.text = " kernel gone"
            then = "`exit`, then `llmos up` and `llmos shell` again"
        else:
            self.text = " kernel gone: waiting for `llmos up`"
            then = "the shell goes on when a kernel is up again (`llmos up`)"
        self.sh.echo(f"\n[llmos: the kernel went away ({e.msg}); {then}]")

    def _reconnect(self) -> bool:
        """Connect to a kernel started anew; True once the shell goes on with it."""
        try:
            k = self.sh.reconnect()
        except Exception:                         # noqa: BLE001 — none yet (KernelNotRunning),
            return False                          # refused, or out of sockets: try again
        with self._attaching:
            if self._stop.is_set():               # the shell is leaving
                k.close()
                return False
            old = self.sh.k
            self.sh.attach(k)
        self.gone = False
        # A kernel that was only silent for a while answers again under its own pid.
        what = ("the kernel answers again" if k.kernel_pid == old.kernel_pid
                else f"connected to the new kernel (pid {k.kernel_pid})")
        self.sh.echo(f"\n[llmos: {what}; this shell is pid {k.pid} now (jobs started "
                     f"before are no longer followed)]")
        return True

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
