"""The process table: one row per agent process, spawned by us or attached to us.

No sockets and no engine: the kernel calls in, and is called back through three hooks,
each run outside the table lock, so a hook may call back into the table:

    on_exit(proc)         a process died (OS exit, signal, silence, detach); proc is a
                          ZOMBIE with exit_status set. Cancel its requests, free its KV
                          and contexts. wait() returns only after this hook has returned.
    on_signal(proc, sig)  a signal was delivered: TERM/KILL/INT mean cancel its LLM
                          work; STOP/CONT mean pause/resume it in the scheduler.

Threads. Every public method may be called from any thread; a single lock guards the
table and a Condition on it wakes waiters. Death of a spawned child is seen at once by
the reaper thread, blocked on the children's pidfds (Linux >= 5.3), or, where pidfds are
missing, by one thread per child blocked in waitid(WNOWAIT). on_exit runs on the reaper
thread for OS deaths, on the caller's thread for reap_silent() and detach().

Pids are small integers from 1, the lowest free one; a pid is reused only after free().
A freed Proc object is reset (pid 0, state UNUSED) and never reused, so a holder of a
stale reference sees it was freed. Pid 0 stands for the kernel (the owner): orphans are
re-parented to it, and a zombie whose parent is 0 is freed at once, as init would.
"""
from __future__ import annotations

import dataclasses
import enum
import errno
import logging
import os
import secrets
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import psutil

from .reaper import Reaper

MAX_PROCS = 4096               # rows in the table; spawn/attach past this is EAGAIN
KILL_REAP_WAIT = 5.0           # seconds shutdown() waits for the reaper after SIGKILL
NOSIG = 0                      # kill(pid, 0): check existence and permission only

log = logging.getLogger("llmos.proc")


class State(enum.Enum):
    UNUSED = "unused"          # a freed slot: only a stale reference ever sees it
    READY = "ready"            # has queued LLM work
    RUNNING = "running"        # has tokens in the current batch
    SLEEPING = "sleeping"      # no LLM work pending: running its own code or blocked
    STOPPED = "stopped"        # SIGSTOP: its requests are not scheduled
    ZOMBIE = "zombie"          # exited, exit status not yet collected


class ProcError(Exception):
    """A caller's mistake, with the syscall error code ("ESRCH", "EPERM", ...)."""

    def __init__(self, code: str, msg: str):
        super().__init__(f"{code}: {msg}")
        self.code = code
        self.msg = msg


@dataclass
class Limits:
    """Per-process caps the memory managers and the scheduler enforce (None: no cap)."""
    max_kv_blocks: int | None = None
    max_contexts: int | None = None
    max_queued: int | None = None


@dataclass(eq=False)
class Proc:
    # Identity: set by alloc(), constant until free().
    pid: int = 0
    name: str = ""
    argv: list = field(default_factory=list)
    owner: int = -1                    # uid of the user it runs for
    token: str = ""                    # its secret: LLMOS_TOKEN for spawned processes
    os_pid: int | None = None          # the real OS pid (None: attached, unknown)
    attached: bool = False             # True: not our child; we cannot waitpid() it
    started_at: float = 0.0            # time.time() at alloc
    limits: Limits = field(default_factory=Limits)

    # Guarded by ProcTable._lock.
    ppid: int = 0                      # 0: the kernel itself
    state: State = State.UNUSED
    nice: int = 0
    exit_status: int | None = None     # -N for signal N; None while alive or if unknown
    last_seen: float = 0.0             # time.monotonic() of the last heartbeat

    # Accounting: written by the engine thread only; read without the lock (stale is fine).
    tokens_in: int = 0
    tokens_out: int = 0
    kv_blocks: int = 0
    wait_time: float = 0.0             # seconds with queued LLM work and none running
    run_time: float = 0.0              # seconds with tokens in a batch

    # Owned by the kernel (its I/O thread and engine agree on their own locking); the
    # table only empties them in free(). Ids only.
    contexts: set = field(default_factory=set)
    requests: set = field(default_factory=set)

    # Private to the table, guarded by ProcTable._lock.
    _popen: subprocess.Popen | None = field(default=None, repr=False)
    _ps: psutil.Process | None = field(default=None, repr=False)  # cached: cpu_percent
    _started_mono: float = field(default=0.0, repr=False)
    _exiting: bool = field(default=False, repr=False)   # death seen, on_exit not yet done

    @property
    def alive(self) -> bool:
        """Not dead, not dying, not freed."""
        return self.state not in (State.ZOMBIE, State.UNUSED) and not self._exiting


_FRESH = Proc()        # the reset values free() copies from


def _reset(p: Proc) -> None:
    for f in dataclasses.fields(Proc):
        v = getattr(_FRESH, f.name)
        setattr(p, f.name, type(v)() if isinstance(v, (list, set)) else
                Limits() if isinstance(v, Limits) else v)


_ALLOWED = {signal.SIGTERM, signal.SIGKILL, signal.SIGINT, signal.SIGHUP,
            signal.SIGUSR1, signal.SIGUSR2, signal.SIGSTOP, signal.SIGCONT}


def parse_signal(sig: int | str) -> int:
    """A signal number from 15, "TERM", "SIGTERM" or "sigterm"; 0 is kill's probe.

    Raises ProcError("EINVAL") for anything not in TERM KILL INT HUP USR1 USR2 STOP CONT.
    """
    try:
        if isinstance(sig, str) and not sig.lstrip("-").isdigit():
            name = sig.upper()
            num = signal.Signals[name if name.startswith("SIG") else "SIG" + name]
        else:
            num = int(sig)
    except (KeyError, ValueError, TypeError):
        raise ProcError("EINVAL", f"signal: unknown signal {sig!r}") from None
    if num != NOSIG and num not in _ALLOWED:
        raise ProcError("EINVAL", f"signal: {sig!r} is not one of "
                        f"{' '.join(sorted(s.name[3:] for s in _ALLOWED))}")
    return int(num)


class ProcTable:
    def __init__(self, on_exit: Callable[[Proc], None] | None = None,
                 on_signal: Callable[[Proc, int], None] | None = None):
        self.on_exit = on_exit or (lambda proc: None)
        self.on_signal = on_signal or (lambda proc, sig: None)
        self._lock = threading.RLock()                      # reentrant: free() under it
        self._changed = threading.Condition(self._lock)   # a proc became a reapable zombie
        self._procs: dict[int, Proc] = {}                   # guarded by _lock
        self._by_token: dict[str, Proc] = {}                # guarded by _lock
        self._closed = False                                # guarded by _lock
        self._reaper = Reaper(self._died)

    # ---- the two functions that create and free a slot -----------------------------

    def alloc(self, name: str, argv: list, *, parent: int | None = None, nice: int = 0,
              owner: int | None = None, os_pid: int | None = None, attached: bool = False,
              limits: Limits | None = None) -> Proc:
        """Create a row (state SLEEPING) with the lowest free pid and a fresh token.

        Raises ESRCH if parent is not a live process, EAGAIN if the table is full.
        """
        with self._lock:
            if self._closed:
                raise ProcError("EAGAIN", "the process table is shut down")
            ppid = parent or 0
            if ppid and not (ppid in self._procs and self._procs[ppid].alive):
                raise ProcError("ESRCH", f"parent: no live process {ppid}")
            pid = next((i for i in range(1, MAX_PROCS + 1) if i not in self._procs), None)
            if pid is None:
                raise ProcError("EAGAIN", f"process table full ({MAX_PROCS} processes)")
            now = time.monotonic()
            p = Proc(pid=pid, name=name, argv=list(argv),
                     owner=os.getuid() if owner is None else owner,
                     token=secrets.token_hex(32), os_pid=os_pid, attached=attached,
                     started_at=time.time(), limits=limits or Limits(), ppid=ppid,
                     state=State.SLEEPING, nice=nice, last_seen=now, _started_mono=now)
            self._procs[pid] = p
            self._by_token[p.token] = p
            return p

    def free(self, pid: int) -> None:
        """Remove a row and reset every field of its Proc. Only a zombie, or a row whose
        spawn failed, may be freed: anything else is a broken invariant (assert)."""
        with self._lock:
            p = self._procs.pop(pid)
            assert (p.state is State.ZOMBIE and not p._exiting) or p._popen is None, p
            self._by_token.pop(p.token, None)
            if p._popen is not None:
                p._popen.wait()      # dead and reaped already: this only closes it
            _reset(p)

    # ---- birth -----------------------------------------------------------------

    def spawn(self, argv: list, *, name: str | None = None, nice: int = 0,
              parent: int | None = None, env_extra: dict | None = None,
              socket_path: str | os.PathLike = "", log_dir: str | os.PathLike = ".",
              owner: int | None = None, limits: Limits | None = None) -> Proc:
        """Start argv as a real OS process in its own process group; return its row.

        Its environment is ours plus env_extra plus LLMOS_SOCKET, LLMOS_TOKEN (its own
        secret) and LLMOS_PID; stdin is /dev/null; stdout and stderr go to
        log_dir/<pid>.log (truncated). Raises ESRCH (parent), EAGAIN (table full), or
        the errno name of a failed exec (ENOENT, EACCES, ...).
        """
        if not argv:
            raise ProcError("EINVAL", "argv: empty")
        argv = [str(a) for a in argv]
        p = self.alloc(name or Path(argv[0]).name, argv, parent=parent, nice=nice,
                       owner=owner, limits=limits)
        env = {**os.environ, **(env_extra or {}), "LLMOS_SOCKET": str(socket_path),
               "LLMOS_TOKEN": p.token, "LLMOS_PID": str(p.pid)}
        try:
            log = os.open(Path(log_dir) / f"{p.pid}.log",
                          os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            try:
                popen = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, env=env,
                                         start_new_session=True, close_fds=True)
            finally:
                os.close(log)
        except OSError as e:
            with self._lock:
                self.free(p.pid)
            code = errno.errorcode.get(e.errno, "EINVAL")
            raise ProcError(code, f"spawn {argv[0]}: {e.strerror or e}") from None
        with self._lock:
            p._popen, p.os_pid = popen, popen.pid
        self._reaper.watch(p, child=True)
        return p

    def attach(self, os_pid: int | None, name: str, *, parent: int | None = None,
               argv: list | None = None, owner: int | None = None) -> Proc:
        """A row for a program we did not start (the shell, a notebook).

        If os_pid is known we watch it with a pidfd where we can, so its death is seen at
        once; otherwise only heartbeats (reap_silent) and detach() end it. Its exit status
        is unknown: None. Raises ESRCH if os_pid names no process.
        """
        if os_pid is not None and not psutil.pid_exists(os_pid):
            raise ProcError("ESRCH", f"os_pid: no process {os_pid}")
        p = self.alloc(name, argv or [name], parent=parent, owner=owner, os_pid=os_pid,
                       attached=True)
        if os_pid is not None:
            self._reaper.watch(p, child=False)
        return p

    # ---- lookups -----------------------------------------------------------------

    def get(self, pid: int) -> Proc:
        """The row of pid (zombies included). Raises ESRCH."""
        with self._lock:
            return self._get(pid)

    def _get(self, pid: int) -> Proc:
        p = self._procs.get(pid)
        if p is None:
            raise ProcError("ESRCH", f"no process {pid}")
        return p

    def by_token(self, token: str) -> Proc | None:
        """The live process whose secret is token, else None (zombies never authenticate)."""
        with self._lock:
            p = self._by_token.get(token)
            return p if p is not None and p.alive else None

    def procs(self) -> list[Proc]:
        with self._lock:
            return list(self._procs.values())

    def children(self, pid: int) -> list[Proc]:
        with self._lock:
            return [p for p in self._procs.values() if p.ppid == pid]

    def is_descendant(self, pid: int, of: int) -> bool:
        """True if pid is a child, grandchild, ... of `of` (not `of` itself)."""
        with self._lock:
            return self._is_descendant(pid, of)

    def _is_descendant(self, pid: int, of: int) -> bool:
        seen = set()
        p = self._procs.get(pid)
        while p is not None and p.ppid and p.pid not in seen:
            if p.ppid == of:
                return True
            seen.add(p.pid)
            p = self._procs.get(p.ppid)
        return False

    def set_state(self, pid: int, state: State) -> bool:
        """The scheduler's READY / RUNNING / SLEEPING; False (unchanged) if the process is
        stopped, dying or gone. STOPPED and ZOMBIE belong to kill() and death only."""
        assert state in (State.READY, State.RUNNING, State.SLEEPING), state
        with self._lock:
            p = self._procs.get(pid)
            if p is None or not p.alive or p.state is State.STOPPED:
                return False
            p.state = state
            return True

    # ---- liveness of attached processes ------------------------------------------------

    def heartbeat(self, pid: int) -> None:
        """pid showed it is alive (any syscall counts). Raises ESRCH."""
        with self._lock:
            self._get(pid).last_seen = time.monotonic()

    def reap_silent(self, timeout: float) -> list[Proc]:
        """Declare dead every attached process silent for more than timeout seconds;
        return them (on_exit has run for each). The kernel calls this periodically."""
        now = time.monotonic()
        with self._lock:
            silent = [p for p in self._procs.values()
                      if p.attached and p.alive and now - p.last_seen > timeout]
        return [p for p in silent if self._died(p, None)]

    def detach(self, pid: int, status: int | None = 0) -> None:
        """An attached process said goodbye or lost its connection: it exits with status.
        Raises ESRCH, or EINVAL for a spawned process (the OS reports its exit)."""
        p = self.get(pid)
        if not p.attached:
            raise ProcError("EINVAL", f"process {pid} was spawned: it exits by itself")
        self._died(p, status)

    # ---- death ----------------------------------------------------------------

    def _died(self, p: Proc, status: int | None) -> bool:
        """Record p's death, run on_exit, then make it a waitable zombie (or free it).

        Returns False if p was already dead or freed. For a spawned child the status
        comes from waitpid, collected here under the lock so kill() never signals a
        recycled OS pid.
        """
        with self._lock:
            if not p.alive:
                return False
            if p._popen is not None:
                status = p._popen.wait()
            p.exit_status, p.state, p._exiting = status, State.ZOMBIE, True
        try:
            self.on_exit(p)
        except Exception:                 # a broken hook must not keep a zombie unwaitable
            log.exception("on_exit(%d) failed", p.pid)
        finally:
            with self._lock:
                p._exiting = False
                for c in self._procs.values():
                    if c.ppid == p.pid:
                        c.ppid = 0                    # orphans go to the kernel
                for c in [c for c in self._procs.values()
                          if c.ppid == 0 and c.state is State.ZOMBIE and not c._exiting]:
                    self.free(c.pid)                  # nobody can wait for them
                self._changed.notify_all()
        return True

    def wait(self, pid: int, caller: int, timeout: float | None) -> int | None:
        """Block until child pid of caller is a zombie, free it, return its exit status.

        Status: the exit code, -N if killed by signal N, None if unknown (attached).
        Raises ESRCH (no such pid), EPERM (not caller's child), EINVAL (pid == caller),
        ETIMEDOUT (still running after timeout seconds; 0 polls), ECHILD (it stopped
        being caller's child while we waited, e.g. the caller died).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            p = self._get(pid)
            if pid == caller:
                raise ProcError("EINVAL", "a process cannot wait for itself")
            if caller == 0:
                raise ProcError("ECHILD", "the kernel's children are reaped automatically")
            if p.ppid != caller:
                raise ProcError("EPERM", f"process {pid} is not a child of {caller}")
            while not (p.state is State.ZOMBIE and not p._exiting):
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise ProcError("ETIMEDOUT", f"process {pid} still running")
                self._changed.wait(left)
                if p.pid != pid or p.ppid != caller:       # freed by another waiter, or orphaned
                    raise ProcError("ECHILD", f"process {pid} is no longer a child of {caller}")
            status = p.exit_status
            self.free(pid)
            return status

    # ---- signals ------------------------------------------------------------------

    def kill(self, pid: int, sig: int | str, caller: int | None, owner: bool = False) -> bool:
        """Send sig to pid; return True if delivered, False for a zombie (a no-op, as
        POSIX kill on a zombie succeeds without effect).

        A process may signal itself and its descendants; the owner (owner=True) anyone.
        A spawned process gets the signal on its whole process group; an attached one on
        its own OS pid only (its group may be the user's terminal), if known. STOP and
        CONT also set and clear state STOPPED. Raises ESRCH, EPERM, EINVAL (signal).
        """
        num = parse_signal(sig)
        with self._lock:
            p = self._get(pid)
            if not (owner or caller == pid or
                    (caller is not None and self._is_descendant(pid, caller))):
                raise ProcError("EPERM", f"process {caller} may not signal process {pid}")
            if not p.alive or num == NOSIG:
                return p.alive
            self._send(p, num)
            if num == signal.SIGSTOP:
                p.state = State.STOPPED
            elif num == signal.SIGCONT and p.state is State.STOPPED:
                p.state = State.READY if p.requests else State.SLEEPING
        self.on_signal(p, num)
        return True

    def _send(self, p: Proc, num: int) -> None:
        """Deliver to the OS; caller holds the lock and knows p is alive."""
        try:
            if p._popen is not None:
                os.killpg(p.os_pid, num)
            elif p.os_pid is not None:
                os.kill(p.os_pid, num)
        except ProcessLookupError:
            pass            # exiting right now: the reaper will report it
        except PermissionError:
            raise ProcError("EPERM", f"the OS refused signal {num} to os pid {p.os_pid}")

    def shutdown(self, grace: float = 5.0) -> None:
        """Terminate every spawned process: SIGTERM (and SIGCONT, so a stopped one can
        act on it) to its group, up to grace seconds, then SIGKILL. Returns when all
        are dead (on_exit has run for each), then stops the reaper. Attached processes
        are left alone. Later spawns raise EAGAIN."""
        with self._lock:
            self._closed = True
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, KILL_REAP_WAIT)):
            with self._lock:
                for p in [p for p in self._live_children() if p.alive]:
                    self._send(p, sig)
                    if sig == signal.SIGTERM:
                        self._send(p, signal.SIGCONT)
                self._changed.wait_for(lambda: not self._live_children(), wait)
        self._reaper.stop()

    def _live_children(self) -> list[Proc]:
        return [p for p in self._procs.values()
                if p._popen is not None and (p.alive or p._exiting)]

    # ---- ps ---------------------------------------------------------------------

    def ps(self) -> list[dict]:
        """One dict per row, by pid: pid ppid name state nice kv_blocks tokens_in
        tokens_out cpu_percent rss age os_pid. cpu_percent is since the previous ps()
        (0.0 the first time); cpu_percent 0.0 and rss None once the OS process is gone."""
        now = time.monotonic()
        with self._lock:
            rows = []
            for p in sorted(self._procs.values(), key=lambda p: p.pid):
                if p._ps is None and p.os_pid is not None and p.alive:
                    try:
                        p._ps = psutil.Process(p.os_pid)
                    except psutil.Error:
                        pass
                rows.append((p, p._ps if p.alive else None, dict(
                    pid=p.pid, ppid=p.ppid, name=p.name, state=p.state.value, nice=p.nice,
                    kv_blocks=p.kv_blocks, tokens_in=p.tokens_in, tokens_out=p.tokens_out,
                    cpu_percent=0.0, rss=None, age=now - p._started_mono, os_pid=p.os_pid)))
        for p, ps, row in rows:                     # psutil reads /proc: not under the lock
            if ps is not None:
                try:
                    with ps.oneshot():
                        row["cpu_percent"] = ps.cpu_percent(None)
                        row["rss"] = ps.memory_info().rss
                except psutil.Error:
                    pass
        return [row for _, _, row in rows]

    def procdump(self) -> str:
        """The process table as text, one line per process (xv6's procdump)."""
        lines = [f"{'PID':>5} {'PPID':>5} {'STATE':<8} {'NI':>3} {'KV':>6} {'IN':>8} "
                 f"{'OUT':>8} {'CPU%':>5} {'RSS':>8} {'AGE':>7} {'OSPID':>7}  NAME"]
        for r in self.ps():
            rss = f"{r['rss'] // (1 << 20)}M" if r["rss"] is not None else "-"
            lines.append(f"{r['pid']:>5} {r['ppid']:>5} {r['state']:<8} {r['nice']:>3} "
                         f"{r['kv_blocks']:>6} {r['tokens_in']:>8} {r['tokens_out']:>8} "
                         f"{r['cpu_percent']:>5.1f} {rss:>8} {r['age']:>7.1f} "
                         f"{r['os_pid'] if r['os_pid'] is not None else '-':>7}  {r['name']}")
        return "\n".join(lines)
