"""The process table: one row per agent process, spawned by us or attached to us.

A row records who a process is (identity), its life (state, parent, exit status), and
what it owns: its LLM calls in flight and its contexts, by id. The engine owns the KV
blocks behind those ids. No sockets and no engine here: the kernel is told through two
hooks, both called *under the table lock*, so that whatever they queue for the engine is
ordered with the kernel's own queueing of new work (also done under this lock):

    on_exit(proc, request_ids, context_ids)   proc died; release what it held, then call
                                              released(proc) (from any thread)
    on_signal(proc, sig, request_ids)         TERM/KILL/INT: cancel its LLM work;
                                              STOP/CONT: pause/resume it in the scheduler

A dead process is a ZOMBIE that is not yet waitable until released() says its resources
are free; then its waiters get its status. The parent collects (frees) it; the owner
may wait for any process and gets its status too, but collects only orphans (ppid 0),
since the parent still gets it first when it waits.

Each row carries its limits (kernel/limits.py): the table's defaults for a process with
no parent, its parent's for a child, with what spawn asked set instead; `setrlimit`
changes them under the lock. Lowering one is anyone's who may act on the process,
raising one the owner's alone.

Pids count up from `first_pid` and are not reused until PID_MAX wraps (as Linux does),
so a pid names one process for a long time and its log file is never overwritten.
Pid 0 stands for the kernel (the owner): orphans are re-parented to it. A spawned
orphan is kept as a zombie for the owner to collect, at most MAX_ORPHANS of them (oldest
freed first); an attached one (a CLI call, a closed SDK connection) is freed at once.

Threads: every public method may be called from any thread; `lock` guards every row.
Death of a spawned child is seen at once by the reaper thread (pidfds).
"""
from __future__ import annotations

import collections
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

from llmos.syscalls.errors import (EAGAIN, ECHILD, EINVAL, EPERM, ESRCH, SyscallError)
from llmos.syscalls.types import Limits, ProcState

from . import limits, subreaper, tunables
from .account import Account
from .birth import start
from .reaper import Reaper
from .signals import NOSIG, parse_signal, signal_name

PID_MAX = 1 << 22              # pids wrap here (Linux's pid_max on 64-bit)
MAX_PROCS = 4096               # rows in the table, zombies included; then EAGAIN
MAX_ORPHANS = 256              # uncollected zombies of the kernel kept for the owner's wait
KILL_REAP_WAIT = 5.0           # seconds shutdown() waits for the reaper after SIGKILL

log = logging.getLogger("llmos.proc")


@dataclass(eq=False)
class Proc:
    # Identity: set by alloc(), constant for the row's life.
    pid: int
    name: str
    argv: list
    owner: int                         # uid of the user it runs for
    token: str                         # its secret: handed to a spawned process in a pipe
    attached: bool                     # True: not our child (we cannot waitpid it)
    started_at: float                  # time.time() at alloc
    started_mono: float                # time.monotonic() at alloc

    # Guarded by ProcTable.lock.
    ppid: int = 0                      # 0: the kernel itself
    state: ProcState = ProcState.SLEEPING   # SLEEPING, STOPPED or ZOMBIE; RUNNING/READY
                                            # are the engine's to say (kernel/snapshot.py)
    os_pid: int | None = None          # the real OS pid (None: attached, unknown)
    exit_status: int | None = None     # -N for signal N; None while alive or if unknown
    last_seen: float = 0.0             # time.monotonic() of the last sign of life
    releasing: bool = False            # dead, its resources not yet released
    requests: dict = field(default_factory=dict)   # (peer, call id) -> request id
    contexts: dict = field(default_factory=dict)   # context id -> its model's ModelSpec

    # What the scheduler knows of it (kernel/account.py): nice and limits (written under
    # the lock), service received and KV held (written by the engine thread).
    acct: Account = field(default_factory=Account)

    # Accounting, read without the lock (a stale value is fine): the sampler thread only.
    cpu_percent: float = 0.0
    rss: int | None = None
    tok_in_s: float = 0.0          # tokens per second in and out, the sampler's last period
    tok_out_s: float = 0.0

    # Private to the table, guarded by its lock.
    _popen: subprocess.Popen | None = field(default=None, repr=False)
    _waiters: list = field(default_factory=list, repr=False)

    @property
    def alive(self) -> bool:
        return self.state is not ProcState.ZOMBIE

    @property
    def nice(self) -> int:
        return self.acct.nice

    @property
    def waitable(self) -> bool:
        return self.state is ProcState.ZOMBIE and not self.releasing


@dataclass(eq=False)
class Waiter:
    """One wait call on a process: `reply(status)` once, or dropped by cancel_wait."""
    caller: int
    owner: bool
    reply: Callable[[int | None], None]
    fail: Callable[[SyscallError], None]


def default_max_agents() -> int:
    """How many agents fit: AGENT_MEMORY each in the machine's memory, within bounds."""
    fit = psutil.virtual_memory().total // tunables.AGENT_MEMORY
    return max(tunables.MIN_AGENTS, min(tunables.MAX_AGENTS, fit))


class ProcTable:
    def __init__(self, on_exit: Callable | None = None, on_signal: Callable | None = None,
                 first_pid: int = 1, max_agents: int | None = None, user=None,
                 default_limits: Limits | None = None):
        self.max_agents = max_agents or default_max_agents()   # live OS processes we started
        self.default_limits = default_limits or Limits()       # of a process with no parent
        self.user = user                               # AgentUser agents run as; None: ours
        self.on_exit = on_exit or (lambda proc, rids, cids: self.released(proc))
        self.on_signal = on_signal or (lambda proc, sig, rids: None)
        self.lock = threading.RLock()                  # reentrant: hooks may call back in
        self._changed = threading.Condition(self.lock)  # a process became waitable
        self._procs: dict[int, Proc] = {}
        self._by_token: dict[str, Proc] = {}
        self._orphans: collections.deque[int] = collections.deque()  # uncollected, ppid 0
        self._next_pid = max(1, min(first_pid, PID_MAX - 1))
        self._closed = False
        self._reaper = Reaper(self._died)

    # ---- the two functions that create and free a slot -----------------------------

    def alloc(self, name: str, argv: list, *, parent: int = 0, nice: int = 0,
              owner: int | None = None, attached: bool = False, asked: dict | None = None,
              by_owner: bool = False) -> Proc:
        """Create a row (SLEEPING) with the next unused pid and a fresh token. Its limits:
        its parent's (without a parent: the defaults) with those `asked` set instead
        ({name: value, None: no limit}); raising one needs `by_owner`, the owner's rights.

        Raises ESRCH if parent is not a live process, EAGAIN if the table is full or the
        parent at its children limit, EPERM for a raise not by_owner.
        """
        with self.lock:
            if self._closed:
                raise SyscallError(EAGAIN, "the process table is shut down")
            if parent and not (parent in self._procs and self._procs[parent].alive):
                raise SyscallError(ESRCH, f"parent: no live process {parent}")
            if len(self._procs) >= MAX_PROCS:
                raise SyscallError(EAGAIN, f"process table full ({MAX_PROCS} processes)")
            if not attached and self._agents() >= self.max_agents:
                raise SyscallError(EAGAIN, f"{self.max_agents} agent processes are running, "
                                           "the most this kernel starts (llmos up --max-agents)")
            up = self._procs[parent] if parent else None
            if up is not None:
                live = sum(1 for c in self._procs.values() if c.ppid == parent and c.alive)
                limits.check(up, "children", live, f"process {parent} has {live} live children")
            quota = limits.change(up.acct.limits if up is not None else self.default_limits,
                                  asked or {}, by_owner, "spawn")
            pid = self._take_pid()
            now = time.monotonic()
            program = up.acct.root if up is not None and not up.attached and not attached \
                else None                            # the tree root's account (tree_root)
            p = Proc(pid=pid, name=name, argv=list(argv),
                     owner=os.getuid() if owner is None else owner,
                     token=secrets.token_hex(32), attached=attached, started_at=time.time(),
                     started_mono=now, ppid=parent, last_seen=now,
                     acct=Account(pid, nice, limits=quota, program=program))
            self._procs[pid] = p
            self._by_token[p.token] = p
            return p

    def _agents(self) -> int:
        """Live rows of processes we started (a spawn in progress counts: its row is alive)."""
        return sum(1 for p in self._procs.values() if p.alive and not p.attached)

    def _take_pid(self) -> int:
        while self._next_pid in self._procs:
            self._next_pid = self._next_pid % (PID_MAX - 1) + 1
        pid = self._next_pid
        self._next_pid = pid % (PID_MAX - 1) + 1
        return pid

    def free(self, pid: int) -> None:
        """Remove a row: only a waitable zombie, or a row whose spawn failed (broken
        invariant otherwise: assert)."""
        with self.lock:
            p = self._procs.pop(pid)
            assert p.waitable or (p._popen is None and not p.attached and p.alive), p
            self._by_token.pop(p.token, None)
            if pid in self._orphans:         # at most MAX_ORPHANS: a short scan
                self._orphans.remove(pid)
            if p._popen is not None:
                p._popen.wait()      # dead and reaped already: this only closes it

    # ---- birth -----------------------------------------------------------------

    def spawn(self, argv: list, *, name: str | None = None, nice: int = 0, parent: int = 0,
              env_extra: dict | None = None, socket_path: str = "",
              log_dir: str | os.PathLike = ".", owner: int | None = None,
              asked: dict | None = None, by_owner: bool = False) -> Proc:
        """Start argv as a real OS process in its own session and process group, set to
        die with the kernel (kernel/subreaper.py); return its row.

        Its environment is ours (with an agent user, that user's: kernel/agentuser.py) plus
        env_extra plus LLMOS_SOCKET, LLMOS_PID and LLMOS_TOKEN_FD, an inherited pipe that holds its secret (syscalls/secret.py: never
        the secret itself, which a sibling could read in /proc/<pid>/environ); it runs as
        the table's agent user if there is one; stdin is /dev/null; stdout and stderr go to
        log_dir/<pid>.log, a new file (an older one of that pid is moved to <pid>.log.old).
        Its limits are alloc's (asked, by_owner). Raises ESRCH (parent), EAGAIN (table
        full, children limit), EPERM (a raise of a limit), EINVAL (argv or env the OS
        cannot take), or the errno name of a failed exec (ENOENT, EACCES, ...).
        """
        argv = [str(a) for a in argv]
        if not argv:
            raise SyscallError(EINVAL, "argv: empty")
        p = self.alloc(name or Path(argv[0]).name, argv, parent=parent, nice=nice, owner=owner,
                       asked=asked, by_owner=by_owner)
        base = self.user.environ(os.environ) if self.user else os.environ
        env = {**base, **(env_extra or {}), "LLMOS_SOCKET": str(socket_path),
               "LLMOS_PID": str(p.pid)}
        try:
            with subreaper.births:           # until the row has the pid: no stray reaping
                popen = start(argv, env, log_dir, f"{p.pid}.log", p.token, self.user)
                with self.lock:
                    p._popen, p.os_pid = popen, popen.pid
        except (OSError, ValueError) as e:   # ValueError: NUL in argv or env, '=' in a key
            self.free(p.pid)
            code = errno.errorcode.get(getattr(e, "errno", None) or 0, EINVAL)
            raise SyscallError(code, f"spawn {argv[0]}: {getattr(e, 'strerror', None) or e}") from None
        log.info("pid %d (%s): spawned by pid %d as os pid %d: %s", p.pid, p.name, parent,
                 popen.pid, " ".join(argv)[:200])
        self._reaper.watch(p, child=True)
        return p

    def attach(self, name: str, *, parent: int = 0, owner: int | None = None) -> Proc:
        """A row for a program we did not start (the shell, a notebook). Only heartbeats
        (reap_silent) and detach() end it; its exit status is what it says at exit."""
        p = self.alloc(name, [name], parent=parent, owner=owner, attached=True)
        log.info("pid %d (%s): attached", p.pid, name)
        return p

    # ---- lookups -----------------------------------------------------------------

    def get(self, pid: int) -> Proc:
        """The row of pid (zombies included). Raises ESRCH."""
        with self.lock:
            p = self._procs.get(pid)
            if p is None:
                raise SyscallError(ESRCH, f"no process {pid}")
            return p

    def live(self, pid: int) -> Proc:
        """The row of pid if it is alive. Raises ESRCH (none, or exited)."""
        p = self.get(pid)
        if not p.alive:
            raise SyscallError(ESRCH, f"process {pid} has exited")
        return p

    def by_token(self, token: str) -> Proc | None:
        """The live process whose secret is token, else None (zombies never authenticate)."""
        with self.lock:
            p = self._by_token.get(token)
            return p if p is not None and p.alive else None

    def procs(self) -> list[Proc]:
        """Every row, by pid."""
        with self.lock:
            return sorted(self._procs.values(), key=lambda p: p.pid)

    def may_act(self, caller: int, pid: int, owner: bool) -> bool:
        """A process may act on itself and its descendants; the owner on everyone."""
        with self.lock:
            return owner or caller == pid or self._is_descendant(pid, caller)

    def _is_descendant(self, pid: int, of: int) -> bool:
        seen = set()
        p = self._procs.get(pid)
        while p is not None and p.ppid and p.pid not in seen:
            if p.ppid == of:
                return True
            seen.add(p.pid)
            p = self._procs.get(p.ppid)
        return False

    def set_nice(self, pid: int, value: int, caller: int, owner: bool) -> None:
        """Raises ESRCH, EPERM (not caller's process)."""
        with self.lock:
            p = self.live(pid)
            if not self.may_act(caller, pid, owner):
                raise SyscallError(EPERM, f"nice: process {pid} is not yours")
            p.acct.nice = value

    def setrlimit(self, pid: int, wanted: dict, caller: int, owner: bool) -> Limits:
        """Set limits of pid ({name: value, None: no limit}) for caller, who may act on pid
        (itself, a descendant; the owner: anyone); raising one needs the owner. Returns
        the limits now in force. Raises ESRCH, EPERM (not caller's, or a raise)."""
        with self.lock:
            p = self.live(pid)
            if not self.may_act(caller, pid, owner):
                raise SyscallError(EPERM, f"setrlimit: process {pid} is not yours")
            p.acct.limits = limits.change(p.acct.limits, wanted, owner, "setrlimit")
            return p.acct.limits

    def getrlimit(self, pid: int, caller: int, owner: bool) -> Limits:
        """pid's limits, for caller, who may act on it. Raises ESRCH, EPERM."""
        with self.lock:
            p = self.live(pid)
            if not self.may_act(caller, pid, owner):
                raise SyscallError(EPERM, f"getrlimit: process {pid} is not yours")
            return p.acct.limits

    # ---- liveness of attached processes ------------------------------------------------

    def heartbeat(self, pid: int) -> None:
        """pid showed it is alive (any message on its connection counts)."""
        with self.lock:
            p = self._procs.get(pid)
            if p is not None:
                p.last_seen = time.monotonic()

    def reap_silent(self, timeout: float) -> list[Proc]:
        """Declare dead every attached process silent for more than timeout seconds."""
        now = time.monotonic()
        with self.lock:
            silent = [p for p in self._procs.values()
                      if p.attached and p.alive and now - p.last_seen > timeout]
        return [p for p in silent if self._died(p, None)]

    def detach(self, pid: int, status: int | None = 0) -> None:
        """An attached process said goodbye or lost its connection: it exits with status.
        Raises ESRCH, or EPERM for a spawned process (the OS reports its exit)."""
        p = self.get(pid)
        if not p.attached:
            raise SyscallError(EPERM, f"exit: process {pid} was spawned; it exits by itself "
                                      f"(sys.exit), the kernel sees it")
        self._died(p, status)

    # ---- death ----------------------------------------------------------------

    def _died(self, p: Proc, status: int | None) -> bool:
        """Record p's death and hand what it held to on_exit (under the lock). False if it
        was dead already. A spawned child's status comes from waitpid, collected here
        under the lock, so kill() never signals a recycled OS pid."""
        with self.lock:
            if not p.alive:
                return False
            if p._popen is not None:
                status = p._popen.wait()
            p.exit_status, p.state, p.releasing = status, ProcState.ZOMBIE, True
            rids, cids = list(p.requests.values()), list(p.contexts)
            p.requests.clear()
            p.contexts.clear()
            p.cpu_percent, p.rss, p.tok_in_s, p.tok_out_s = 0.0, None, 0.0, 0.0
            log.info("pid %d (%s): exited with status %s", p.pid, p.name, status)
            try:
                self.on_exit(p, rids, cids)
            except Exception:             # a broken hook must not keep a zombie unwaitable
                log.exception("on_exit(%d) failed", p.pid)
                self.released(p)
        return True

    def released(self, p: Proc) -> None:
        """What p held is free: it becomes waitable; its children go to the kernel."""
        with self.lock:
            if not p.releasing or self._procs.get(p.pid) is not p:
                return
            p.releasing = False
            for c in list(self._procs.values()):
                for w in [w for w in c._waiters if w.caller == p.pid]:
                    c._waiters.remove(w)             # a dead caller waits no more
                    w.fail(SyscallError(ECHILD, f"process {p.pid} exited while waiting"))
                if c.ppid == p.pid:
                    c.ppid = 0                       # orphans go to the kernel
                    if c.waitable:
                        self._orphaned(c)
            self._deliver(p)
            self._trim_orphans()
            self._changed.notify_all()

    def _deliver(self, p: Proc) -> None:
        """p is waitable: answer its waiters; the parent's (or, for an orphan, the
        owner's) wait collects it."""
        waiters, p._waiters = p._waiters, []
        for w in waiters:
            w.reply(p.exit_status)
        if any(w.caller == p.ppid or p.ppid == 0 and w.owner for w in waiters):
            self._collect(p, waiters[0].caller)
        elif p.ppid == 0:
            self._orphaned(p)

    def _orphaned(self, p: Proc) -> None:
        """A zombie of the kernel: a spawned one waits for the owner's wait (its status
        and log matter); an attached one (a CLI call, a closed SDK) is freed at once."""
        if p.attached:
            self._collect(p, 0)
        else:
            self._orphans.append(p.pid)

    def _collect(self, p: Proc, by: int) -> None:
        who = f"pid {by}" if by else "the kernel"
        log.info("pid %d (%s): reaped by %s (status %s)", p.pid, p.name, who, p.exit_status)
        self.free(p.pid)

    def _trim_orphans(self) -> None:
        while len(self._orphans) > MAX_ORPHANS:
            p = self._procs.get(self._orphans.popleft())
            if p is not None and p.waitable and p.ppid == 0:
                self._collect(p, 0)

    def wait(self, pid: int, caller: int, owner: bool, reply: Callable[[int | None], None],
             fail: Callable[[SyscallError], None]) -> Waiter | None:
        """Collect pid's exit status: reply(status) once it is waitable (at once if it is).

        Status: the exit code, -N if killed by signal N, None if unknown (attached).
        The parent may wait for its children; the owner for any process. Returns None if
        answered at once, else the Waiter (for cancel_wait). fail(err) if the caller dies
        first. Raises ESRCH (no such pid), EINVAL (pid == caller), EPERM (not allowed).
        """
        with self.lock:
            p = self.get(pid)
            if pid == caller:
                raise SyscallError(EINVAL, "a process cannot wait for itself")
            if p.ppid != caller and not owner:
                raise SyscallError(EPERM, f"process {pid} is not a child of {caller}")
            w = Waiter(caller, owner, reply, fail)
            p._waiters.append(w)
            if p.waitable:
                self._deliver(p)
                return None
            return w

    def cancel_wait(self, pid: int, w: Waiter) -> bool:
        """Drop a waiter (its timeout passed); False if it was answered already."""
        with self.lock:
            p = self._procs.get(pid)
            if p is None or w not in p._waiters:
                return False
            p._waiters.remove(w)
            return True

    # ---- signals ------------------------------------------------------------------

    def kill(self, pid: int, sig: int | str, caller: int, owner: bool = False) -> bool:
        """Send sig to pid; True if delivered, False for a zombie (a no-op, as POSIX kill
        on a zombie succeeds without effect).

        A process may signal itself and its descendants; the owner anyone. A spawned
        process gets the signal on its whole process group; an attached one only in the
        scheduler (its OS process is not ours). STOP and CONT also set and clear STOPPED.
        Raises ESRCH, EPERM, EINVAL (signal).
        """
        num = parse_signal(sig)
        with self.lock:
            p = self.get(pid)
            if not self.may_act(caller, pid, owner):
                raise SyscallError(EPERM, f"process {caller} may not signal process {pid}")
            if not p.alive or num == NOSIG:
                return p.alive
            self._send(p, num)
            if num == signal.SIGSTOP:
                p.state = ProcState.STOPPED
            elif num == signal.SIGCONT and p.state is ProcState.STOPPED:
                p.state = ProcState.SLEEPING
            log.info("pid %d (%s): SIG%s from pid %d", pid, p.name, signal_name(num), caller)
            self.on_signal(p, num, list(p.requests.values()))
        return True

    def _send(self, p: Proc, num: int) -> None:
        """Deliver to the OS; caller holds the lock and knows p is alive."""
        if p._popen is None:
            return
        try:
            os.killpg(p.os_pid, num)
        except ProcessLookupError:
            pass            # exiting right now: the reaper will report it
        except PermissionError:
            raise SyscallError(EPERM, f"the OS refused signal {num} to os pid {p.os_pid}")

    def shutdown(self, grace: float = 5.0) -> None:
        """Terminate every spawned process: SIGTERM (and SIGCONT, so a stopped one can
        act on it) to its group, up to grace seconds, then SIGKILL. Returns when all are
        dead and released, then stops the reaper. Later spawns raise EAGAIN."""
        with self.lock:
            self._closed = True
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, KILL_REAP_WAIT)):
            with self.lock:
                for p in self._children(alive_only=True):
                    self._send(p, sig)
                    if sig == signal.SIGTERM:
                        self._send(p, signal.SIGCONT)
                self._changed.wait_for(lambda: not self._children(alive_only=False), wait)
        self._reaper.stop()

    def _children(self, alive_only: bool) -> list[Proc]:
        return [p for p in self._procs.values()
                if p._popen is not None and (p.alive or not alive_only and p.releasing)]


def first_free_pid(log_dir: Path) -> int:
    """One past the highest pid with a log in log_dir: a new boot on the same home does
    not reuse the pids (and so the logs) of the boots before it."""
    top = 0
    try:
        for entry in os.scandir(log_dir):
            stem = entry.name[:-len(".log")] if entry.name.endswith(".log") else ""
            if stem.isdigit():
                top = max(top, int(stem))
    except FileNotFoundError:
        pass
    return top + 1 if top + 1 < PID_MAX else 1
