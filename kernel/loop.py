"""The engine loop: the one thread that owns the engine, fed through the typed inbox.

The daemon runs it on its main thread (`run`): torch's OpenMP pool serves the thread
that created it best, and the same engine ran about 2x slower per step from a second
thread on 2 cores. Tests may `start` it on a thread of its own.

One turn of the loop:
  1. take the commands waiting in the inbox, in arrival order, and apply each
     (kernel/inbox.py); when the engine is idle, block for the first one (at most until
     throttled work may run again: engine.wake_in) and gather what else arrives within
     ARRIVAL_WINDOW, so that requests sent together share a step;
  2. if the engine has work, run one step; its outputs answer their calls;
  3. publish a Snapshot (what ps, meminfo and sysinfo read) at most every
     SNAPSHOT_PERIOD while busy, and whenever the engine falls idle;
  4. a step that raises is fatal: the loop stops, every queued and later command fails
     (its call gets ECANCELED, a dead process is released anyway), and `on_crash(exc)`
     tells the kernel, which exits.

Threading contract: only this thread touches the engine. Calls are answered through
`Call.reply/error/event`, which only queue a message for the I/O thread. The process
table is touched under its lock, briefly, to drop a finished call from its owner.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Callable

from llmos.syscalls.errors import ECANCELED, SyscallError
from llmos.syscalls.types import ContextInfo, Delta, KVInfo, SchedInfo

from . import inbox as cmd
from . import tunables
from .account import KV_LIMIT
from .policy import POLICIES

log = logging.getLogger("llmos.loop")


@dataclass(frozen=True)
class Snapshot:
    """What the engine last published; read by any thread without a lock."""
    at: float = 0.0                                 # time.monotonic() when taken
    kv: KVInfo = field(default_factory=KVInfo)
    running: frozenset = frozenset()                # pids with tokens in the latest batch
    stats: dict = field(default_factory=dict)       # steps, computed/generated tokens, preemptions
    policy: str = ""                                # the scheduling policy in force
    disk_total: int = 0                             # KV blocks the disk tier may hold
    disk_used: int = 0


class EngineLoop:
    def __init__(self, engine, procs, on_crash: Callable[[BaseException], None] | None = None,
                 on_limit: Callable | None = None):
        self.engine, self.procs = engine, procs
        self.on_crash = on_crash
        self.on_limit = on_limit or (lambda proc, call, msg: None)   # kv_blocks refusals
        self.crashed: BaseException | None = None
        self.inbox = cmd.Inbox()
        self.snapshot = Snapshot()
        self._published = 0.0
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="llmos-engine", daemon=True)
        self._apply = {cmd.Add: self._add, cmd.Abort: self._abort, cmd.Pause: self._pause,
                       cmd.Release: self._release, cmd.CreateContext: self._create_context,
                       cmd.ForkContext: self._fork_context, cmd.FreeContext: self._free_context,
                       cmd.DescribeContext: self._describe_context,
                       cmd.SetPolicy: self._set_policy}

    # ---- any thread -----------------------------------------------------------------
    def put(self, command) -> None:
        """Queue a command. After the loop stopped, it fails at once (see _fail)."""
        self.inbox.put(command)
        if self._stopped.is_set():
            self._fail_queued()

    @property
    def alive(self) -> bool:
        return not self._stopped.is_set()

    def start(self) -> "EngineLoop":
        """Run the loop on a thread of its own."""
        self._thread.start()
        return self

    def run(self) -> None:
        """Run the loop on the calling thread until stop() or a crash."""
        self._run()

    def stop(self, timeout: float = 10.0) -> None:
        """Finish the command in hand, then stop; queued commands fail. Safe to call from
        a signal handler when the loop runs on this thread (it only queues Stop then)."""
        self.inbox.put(cmd.Stop())
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    # ---- the loop ---------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while self._drain(block=not self.engine.has_work()):
                if self.engine.has_work():
                    self.engine.step()
                self._publish()
        except BaseException as exc:      # noqa: BLE001 — a crashed engine must not hang anyone
            log.exception("engine loop crashed")
            self.crashed = exc
            if self.on_crash is not None:
                self.on_crash(exc)
        finally:
            self._stopped.set()
            self._fail_queued()

    def _drain(self, block: bool) -> bool:
        """Apply what is in the inbox; False on Stop."""
        deadline = None
        while True:
            if block:
                self._publish()
                c = self.inbox.get(timeout=self.engine.wake_in())   # throttled work: a timeout
                if c is None:
                    return True
                block, deadline = False, time.monotonic() + tunables.ARRIVAL_WINDOW
            else:
                left = 0 if deadline is None else max(0.0, deadline - time.monotonic())
                c = self.inbox.get(timeout=left or 0)
            if c is None:
                return True
            if isinstance(c, cmd.Stop):
                return False
            self._apply[type(c)](c)

    def _publish(self) -> None:
        """A new Snapshot, at most every SNAPSHOT_PERIOD while the engine is busy."""
        now = time.monotonic()
        busy = self.engine.has_work()
        if busy and now - self._published < tunables.SNAPSHOT_PERIOD:
            return
        e = self.engine
        swap = e.swapper.host if e.swapper else None
        kv = KVInfo(**e.blocks.usage(), block_size=e.block_size,
                    swap_total=swap.num_blocks if swap else 0,
                    swap_free=swap.num_free_blocks if swap else 0)
        running = frozenset(r.owner.pid for r in e.last_batch if r.owner is not None) if busy \
            else frozenset()
        self.snapshot = Snapshot(now, kv, running,
                                 {**e.stats, "preemptions": e.scheduler.num_preemptions,
                                  "paged_out": e.pager.paged_out, "paged_in": e.pager.paged_in},
                                 e.policy, **e.pager.usage())
        self._published = now

    # ---- commands (engine thread) -------------------------------------------------------
    def _add(self, c: cmd.Add) -> None:
        try:
            self.engine.add_request(c.tokens, chat=c.chat, context=c.context,
                                    on_event=partial(self._output, c), salt=c.salt,
                                    stream=c.stream, request_id=c.rid, owner=c.proc,
                                    account=c.proc.acct, **c.sampling)
        except SyscallError as e:          # EngineError and its kinds
            self._forget(c)
            self._refused(c, e.msg)
            c.call.error(e.code, e.msg)
            return

    def _output(self, c: cmd.Add, out) -> None:
        """A request's news: stream it, and answer the call when it is done (the scheduler
        charged its tokens to the process's account)."""
        if c.stream and (out.text or out.token_ids):
            c.call.event(Delta(out.text, out.token_ids))
        if out.finished:
            self._forget(c)
            if out.error:
                self._refused(c, out.error)
                c.call.error(out.error_code, out.error)
            else:
                c.call.reply(out.completion)

    def _refused(self, c: cmd.Add, msg: str) -> None:
        """A call failed: the kernel audits a refusal by the process's kv_blocks limit."""
        if msg.startswith(KV_LIMIT):
            self.on_limit(c.proc, c.call, msg)

    def _forget(self, c: cmd.Add) -> None:
        with self.procs.lock:
            if c.proc.requests.get(c.key) == c.rid:
                del c.proc.requests[c.key]

    def _abort(self, c: cmd.Abort) -> None:
        self.engine.abort(c.rid)

    def _pause(self, c: cmd.Pause) -> None:
        self.engine.pause(c.proc.acct, c.stopped)

    def _set_policy(self, c: cmd.SetPolicy) -> None:
        try:
            self.engine.set_policy(c.name)
        except SyscallError as e:
            c.call.error(e.code, e.msg)
            return
        self._published = 0.0                      # ps and sched show it at once
        self._publish()
        c.call.reply(SchedInfo(self.engine.policy, list(POLICIES)))

    def _release(self, c: cmd.Release) -> None:
        for rid in c.rids:
            self.engine.abort(rid)
        for cid in c.contexts:
            if cid in self.engine.contexts:
                self.engine.context_free(cid)
        self.procs.released(c.proc)

    def _create_context(self, c: cmd.CreateContext) -> None:
        try:
            self.engine.context_create(c.tokens, salt=c.salt, context_id=c.context, owner=c.proc,
                                       account=c.proc.acct)
        except SyscallError as e:
            self._disown(c.proc, c.context)
            c.call.error(e.code, e.msg)
            return
        c.call.reply({"context": c.context})

    def _fork_context(self, c: cmd.ForkContext) -> None:
        try:
            self.engine.context_fork(c.source, context_id=c.context, owner=c.proc,
                                     account=c.proc.acct)
        except SyscallError as e:
            self._disown(c.proc, c.context)
            c.call.error(e.code, e.msg)
            return
        c.call.reply({"context": c.context})

    def _disown(self, proc, context: int) -> None:
        with self.procs.lock:
            proc.contexts.discard(context)

    def _free_context(self, c: cmd.FreeContext) -> None:
        if c.context in self.engine.contexts:
            self.engine.context_free(c.context)
        c.call.reply({})

    def _describe_context(self, c: cmd.DescribeContext) -> None:
        try:
            c.call.reply(ContextInfo(**self.engine.context_info(c.context)))
        except SyscallError as e:
            c.call.error(e.code, e.msg)

    # ---- after a stop or crash ----------------------------------------------------------
    def _fail_queued(self) -> None:
        while (c := self.inbox.get(timeout=0)) is not None:
            self._fail(c)

    def _fail(self, c) -> None:
        """A command that will never run: its call fails, a dead process is released."""
        why = f"kernel shutting down{f' (engine crashed: {self.crashed!r})' if self.crashed else ''}"
        if isinstance(c, cmd.Release):
            self.procs.released(c.proc)
        elif getattr(c, "call", None) is not None:
            c.call.error(ECANCELED, why)
