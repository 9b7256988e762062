"""The Supervisor: the kernel's policy behind the syscalls, over the process table and
the engine loop. (The SDK's `Kernel` is a program's handle on all this; this is the
kernel's own side.)

The sys_* functions (kernel/sysproc.py, sysllm.py, sysinfo.py) decode their arguments
and call these methods; the rules (who may act on whom, what a process owns, when work
starts) live here and in the process table. The LLM calls and contexts are in
kernel/llmcalls.py, a part of this class of its own.

Threads and what each may touch:
  I/O thread (kernel/server.py)  the public methods below; never waits on the engine.
  engine thread (kernel/loop.py)  the engine; answers LLM calls.
  tokenizer workers               encode long texts, then queue the command.
  reaper, timers, sampler         deaths, wait timeouts and silence, CPU and RSS.

Ownership is recorded when a call is accepted, under the process table's lock, and the
engine command that follows is queued under the same lock (see kernel/inbox.py): a
cancel or a kill at any moment finds its request, and a dead process's work never starts.
"""
from __future__ import annotations

import hmac
import itertools
import logging
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import psutil

from llmos.syscalls.args import UNLIMITED
from llmos.syscalls.errors import EACCES, EAGAIN, EINVAL, ENOMEM, EPERM, SyscallError
from llmos.syscalls.net import is_loopback
from llmos.syscalls.numbers import Sys, sys_name
from llmos.syscalls.types import Hello, Limits, ProcInfo, ProcState, SchedInfo, WaitStatus

from . import inbox as cmd
from . import limits, tunables
from .audit import AuditLog
from .llmcalls import LLMCalls
from .modelcalls import ModelCalls
from .loop import EngineLoop
from .peers import peer_address, peer_credentials
from .policy import POLICIES
from .proc import ProcTable, first_free_pid
from .signals import NOSIG, parse_signal, signal_name
from .sampler import Sampler
from .timers import Timers

log = logging.getLogger("llmos.kernel")

CANCEL_SIGNALS = {signal.SIGTERM, signal.SIGKILL, signal.SIGINT}   # cancel its LLM work


class Supervisor(LLMCalls, ModelCalls):
    def __init__(self, home, models, registry, default_model: str, owner_token: str,
                 agent_user=None, max_agents: int | None = None,
                 default_limits: dict | None = None):
        """models: the model table (kernel/modeltable.py), its default model loaded;
        registry: the names model= may take (kernel/registry.py); default_model: the name a
        call that names none gets. default_limits: {name: value, None: no limit} set
        instead of the kernel-wide defaults (kernel/limits.py; `llmos up --limit`)."""
        self.home, self.registry, self.default_model = home, registry, default_model
        engine = models.slots[default_model].engine
        self._owner_token = owner_token.encode()
        self.audit = AuditLog.open(home.log_dir)        # log/audit.log (kernel/audit.py)
        self.started = time.time()
        self.procs = ProcTable(on_exit=self._exited, on_signal=self._signalled,
                               first_pid=first_free_pid(home.log_dir), user=agent_user,
                               max_agents=max_agents,
                               default_limits=limits.defaults(engine.num_blocks, default_limits))
        self.loop = EngineLoop(models, self.procs, on_crash=self._engine_crashed,
                               on_limit=self._kv_limited)
        self.timers = Timers()
        self.timers.every(self.audit.period, self.audit.tick)
        self._shares: dict[int, set] = {}      # pid -> share groups it joined; procs.lock
        self.sampler = Sampler(self.procs).start()
        self.tokenizers = ThreadPoolExecutor(tunables.TOKENIZE_WORKERS, "llmos-tokenize")
        self.dead = threading.Event()          # the engine crashed: the daemon exits 1
        self._ids = itertools.count(1)         # request and context ids (thread-safe in CPython)

    def close(self) -> None:
        """Stop the helper threads (after the loop and the server stopped)."""
        self.timers.stop()
        self.sampler.stop()
        self.loop.models.close()
        self.tokenizers.shutdown(wait=False, cancel_futures=True)
        self.audit.close()

    # ---- processes ------------------------------------------------------------------
    def hello(self, conn, token: str, name: str | None = None) -> Hello:
        """Make conn a process: the owner's token attaches a new one (named `name`, else
        "attached"), a process's own token makes conn that process (its name stays).
        Raises EACCES, or EINVAL for a second hello."""
        if conn.authenticated:
            raise SyscallError(EINVAL, f"hello: this connection is already process {conn.pid}")
        # bytes: compare_digest refuses str with non-ASCII characters (TypeError)
        if hmac.compare_digest(token.encode(), self._owner_token):
            self._check_owner(conn)
            proc, conn.owner = self.procs.attach(name or "attached"), True
        else:
            proc = self.procs.by_token(token)
            if proc is None:
                raise SyscallError(EACCES, "hello: wrong token")
        conn.pid = proc.pid
        os_pid, conn.uid = peer_credentials(conn.fd) or (None, None)
        self.audit.record("hello", pid=proc.pid, uid=conn.uid, os_pid=os_pid, owner=conn.owner,
                          **_key(conn))
        return Hello(proc.pid, proc.ppid, os.getpid(), 1, conn.owner)

    def _check_owner(self, conn) -> None:
        """The owner's token counts only from the owner: on a unix socket the peer must run
        as our uid (or root) and must not be one of our agents or their descendants, who
        run as our uid and could read the token from the home. On tcp, which has no peer
        credentials, it counts over a CURVE connection with an allowed key, or from this
        machine (loopback). Raises EACCES."""
        cred = peer_credentials(conn.fd)
        if cred is None:
            if conn.key is None and not is_loopback(peer_address(conn.fd)):
                raise SyscallError(EACCES, "hello: the owner's token counts over tcp only "
                                           "with an allowed CURVE key or from loopback")
            return
        pid, uid = cred
        if uid not in (os.getuid(), 0):
            raise SyscallError(EACCES, f"hello: uid {uid} is not the kernel's owner")
        try:
            ancestors = {p.pid for p in psutil.Process(pid).parents()}
        except psutil.Error:                   # gone already: nobody to answer
            raise SyscallError(EACCES, "hello: the peer process is gone") from None
        if os.getpid() in ancestors:
            log.warning("hello refused: os pid %d, a descendant of the kernel, used the "
                        "owner's token", pid)
            raise SyscallError(EACCES, "hello: the owner's token is refused from agents and "
                                       "the programs they start: an agent says hello with its "
                                       "own secret (connect() reads it at start-up), and a "
                                       "program it starts is an llmos process only if started "
                                       "with spawn() or `llmos run`")

    def check_caller(self, conn) -> None:
        """Before every call after hello: the connection's process must be alive (a dead
        agent's connection acts for nobody). Raises ESRCH."""
        self.procs.live(conn.pid)

    def denied(self, call, code: str, msg: str) -> None:
        """I/O thread: call was refused with EPERM, EACCES, EAGAIN or ENOMEM (a limit): an
        audit record. Before hello it names the peer's uid and os pid by SO_PEERCRED."""
        conn, what = call.conn, {}
        uid = conn.uid
        if conn.pid is None:
            what["os_pid"], uid = peer_credentials(conn.fd) or (None, None)
        if call.nr == Sys.HELLO:
            event = "hello_refused"
        else:
            event = "limit" if code in (EAGAIN, ENOMEM) else "denied"
            what["syscall"] = sys_name(call.nr)
        self.audit.record(event, limited=True, pid=conn.pid, uid=uid, **what, code=code,
                          reason=msg, **_key(conn))

    def spawn(self, caller: int, argv: list, name=None, nice=None, env=None,
              uid: int | None = None, asked: dict | None = None, owner: bool = False) -> int:
        """Start argv as caller's child, with caller's limits and those asked ({name: value,
        None: no limit}; raising one: owner only); uid (the caller's, for the audit log)."""
        p = self.procs.spawn(argv, name=name, nice=nice or 0, parent=caller, env_extra=env,
                             socket_path=self.home.socket_url, log_dir=self.home.log_dir,
                             asked=asked, by_owner=owner)
        self.audit.record("spawn", limited=True, pid=caller, uid=uid, target=p.pid, name=p.name,
                          argv0=p.argv[0], os_pid=p.os_pid)
        return p.pid

    def exit(self, caller: int, status: int) -> None:
        self.procs.detach(caller, status)

    def wait(self, call, caller: int, owner: bool, pid: int, timeout: float | None) -> None:
        """Answer call with pid's WaitStatus when it is waitable, or exited=False after
        timeout seconds. Raises ESRCH, EINVAL, EPERM at once."""
        waiter = self.procs.wait(pid, caller, owner,
                                 reply=lambda status: call.reply(WaitStatus(pid, True, status)),
                                 fail=lambda err: call.error(err.code, err.msg))
        if waiter is not None and timeout is not None:
            def expire():
                if self.procs.cancel_wait(pid, waiter):
                    call.reply(WaitStatus(pid, False, None))
            self.timers.after(timeout, expire)

    def kill(self, caller: int, owner: bool, pid: int, sig, uid: int | None = None) -> None:
        """Signal pid for caller; uid (the caller's, for the audit log)."""
        self.procs.kill(pid, sig, caller, owner)
        num = parse_signal(sig)
        if num != NOSIG:                       # kill(pid, 0) only asks
            self.audit.record("signal", limited=True, pid=caller, uid=uid, target=pid,
                              signal=signal_name(num))

    def setrlimit(self, caller: int, owner: bool, pid: int, wanted: dict,
                  uid: int | None = None) -> Limits:
        """Set pid's limits for caller (kernel/limits.py rules); an audit record. Returns
        the limits now in force. Raises ESRCH, EPERM."""
        now = self.procs.setrlimit(pid, wanted, caller, owner)
        self.audit.record("setrlimit", limited=True, pid=caller, uid=uid, target=pid,
                          limits={n: UNLIMITED if v is None else v for n, v in wanted.items()})
        return now

    # ---- scheduling -----------------------------------------------------------------
    def sched_info(self) -> SchedInfo:
        """The policy in force (as the engine last published it) and the policies there are."""
        return SchedInfo(self.loop.snapshot.policy, list(POLICIES))

    def set_policy(self, call, owner: bool, name: str) -> None:
        """Queue the switch to policy `name`; the engine thread answers call with the new
        SchedInfo. Raises EPERM (not the owner), EINVAL (no such policy, naming them)."""
        if not owner:
            raise SyscallError(EPERM, "sched: only the owner may switch the scheduling policy")
        if name not in POLICIES:
            raise SyscallError(EINVAL, f"sched: no policy {name!r} (policies: "
                                       f"{', '.join(POLICIES)})")
        self.audit.record("sched", limited=True, pid=call.conn.pid, uid=call.conn.uid,
                          policy=name, **_key(call.conn))
        self.loop.put(cmd.SetPolicy(name, call))

    def _exited(self, proc, rids: list, contexts: list) -> None:
        """Process table hook, under its lock: release what the dead process held."""
        self._shares.pop(proc.pid, None)
        self.loop.put(cmd.Release(proc, rids, contexts))

    def _signalled(self, proc, sig: int, rids: list) -> None:
        """Process table hook, under its lock: a signal reached proc's LLM work."""
        if sig in CANCEL_SIGNALS:
            proc.requests.clear()
            for rid in rids:
                self.loop.put(cmd.Abort(rid))
        elif sig in (signal.SIGSTOP, signal.SIGCONT):
            self.loop.put(cmd.Pause(proc, sig == signal.SIGSTOP))

    def peer_gone(self, conn) -> None:
        """I/O thread: a connection vanished. Its LLM calls are cancelled; an attached
        program whose connection it was has exited."""
        if conn.pid is None:
            return
        with self.procs.lock:
            try:
                proc = self.procs.get(conn.pid)
            except SyscallError:
                return
            for key in [k for k in proc.requests if k[0] == conn.peer]:
                self.loop.put(cmd.Abort(proc.requests.pop(key)))
            if proc.attached and proc.alive:
                self.procs.detach(proc.pid, None)

    def watch_silence(self, server, timeout: float) -> None:
        """Reap attached programs silent for longer than timeout (not even a heartbeat)."""
        def check():
            now = time.monotonic()
            for conn in server.connections():
                if conn.pid is not None and now - conn.last_seen < timeout:
                    self.procs.heartbeat(conn.pid)
            for proc in self.procs.reap_silent(timeout):
                log.info("pid %d: silent for %.0fs, reaped", proc.pid, timeout)
        self.timers.every(timeout / 3, check)

    def visible(self, caller: int, owner: bool) -> list:
        """The rows caller may see: all for the owner; else its own process tree (the
        processes that share its tree root, see tree_root)."""
        with self.procs.lock:
            rows = self.procs.procs()
            if owner:
                return rows
            root = self.tree_root(caller)
            return [p for p in rows if self.tree_root(p.pid) == root]

    def tree_root(self, pid: int) -> int:
        """The root of pid's process tree: its highest ancestor that was spawned (not
        attached) below an attached program or the kernel. Processes of one tree share
        cached prefixes and see each other in ps; an attached program is a tree of its own."""
        with self.procs.lock:
            p = self.procs.get(pid)
            while p.ppid and not p.attached:
                parent = self.procs.get(p.ppid)
                if parent.attached:
                    break
                p = parent
            return p.pid

    def ps(self, caller: int, owner: bool) -> list[ProcInfo]:
        """The process table as caller may see it, with the engine's latest view of who runs."""
        snap, now = self.loop.snapshot, time.monotonic()
        with self.procs.lock:
            return [self._row(p, snap, now) for p in self.visible(caller, owner)]

    def _row(self, p, snap, now: float) -> ProcInfo:
        a = p.acct                   # the engine thread's counters: a stale int is fine
        return ProcInfo(pid=p.pid, ppid=p.ppid, name=p.name, state=self._state(p, snap),
                        nice=p.nice, kv_blocks=a.kv["device"], calls=len(p.requests),
                        contexts=len(p.contexts), tokens_in=a.prompt_tokens,
                        tokens_out=a.generated_tokens, cpu_percent=p.cpu_percent, rss=p.rss,
                        age=now - p.started_mono, os_pid=p.os_pid, exit_status=p.exit_status,
                        service=a.service, queued_s=a.queued_s, running_s=a.running_s,
                        preemptions=a.preemptions, swaps=a.swaps, kv_swapped=a.kv["host"],
                        kv_disk=a.kv["disk"], tok_in_s=round(p.tok_in_s, 1),
                        tok_out_s=round(p.tok_out_s, 1))

    @staticmethod
    def _state(p, snap) -> ProcState:
        if p.state is not ProcState.SLEEPING:
            return p.state
        if p.pid in snap.running:
            return ProcState.RUNNING
        return ProcState.READY if p.requests else ProcState.SLEEPING

    def _kv_limited(self, proc, call, msg: str) -> None:
        """Engine thread: proc's call was refused by its kv_blocks limit (ENOMEM)."""
        self.audit.record("limit", limited=True, pid=proc.pid, uid=call.conn.uid,
                          syscall=sys_name(call.nr), code=ENOMEM, reason=msg)

    def _engine_crashed(self, exc: BaseException) -> None:
        log.error("engine crashed: %r; the kernel exits", exc)
        self.dead.set()


def _key(conn) -> dict:
    """{"key": name or Z85} of a CURVE connection, for audit records; {} otherwise."""
    return {"key": conn.key_name or conn.key} if conn.key is not None else {}
