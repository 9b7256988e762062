"""The engine loop: the one thread that owns the engine, fed through the typed inbox.

It owns the model table (kernel/modeltable.py): every loaded model's engine, stepped
in turn by engine time, and the loads in flight.

The daemon runs it on its main thread (`run`): torch's OpenMP pool serves the thread
that created it best, and the same engine ran about 2x slower per step from a second
thread on 2 cores. Tests may `start` it on a thread of its own.

One turn of the loop:
  1. take the commands waiting in the inbox, in arrival order, and apply each
     (kernel/inbox.py); when the engine is idle, block for the first one (at most until
     throttled work may run again or a keep-alive runs out: wake_in, and never longer
     than SIGNAL_POLL, so that a signal handler runs soon whichever thread the OS gave
     the signal to) and gather what else arrives within ARRIVAL_WINDOW, so that requests
     sent together share a step;
  2. if a model has work, run one step of the one that has had the least engine time;
     its outputs answer their calls; unload models whose keep-alive ran out;
  3. publish a Snapshot (what ps, meminfo, sysinfo and metrics read) at most every
     SNAPSHOT_PERIOD while busy, and at every turn while idle;
  4. a step that raises is fatal: the loop stops, every queued and later command fails
     (its call gets ECANCELED, a dead process is released anyway), and `on_crash(exc)`
     tells the kernel, which exits.

The commands themselves are applied by kernel/apply.py (a mixin of this class).

Threading contract: only this thread touches the engine. Calls are answered through
`Call.reply/error/event`, which only queue a message for the I/O thread. The process
table is touched under its lock, briefly, to drop a finished call from its owner.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from llmos.syscalls.errors import ECANCELED
from llmos.syscalls.types import KVInfo

from . import inbox as cmd
from . import tunables
from .apply import Commands
from .metrics import model_metrics
from .modeltable import READY

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
    models: tuple = ()                              # a ModelInfo per READY model
    model_kv: dict = field(default_factory=dict)    # name -> its KVInfo
    loading: tuple = ()                             # the Slots being loaded (progress: live)
    memory: tuple = (0, 0)                          # the model table's (budget, used) bytes
    metrics: tuple = ()                             # a ModelMetrics per READY model


def _idle_wait(wake_in: float | None) -> float:
    """How long the idle loop may sleep: until throttled work or a keep-alive is due, and
    never longer than SIGNAL_POLL. When it runs on the main thread, a signal the OS gave to
    another thread is handled only once it wakes (Python runs handlers there)."""
    return tunables.SIGNAL_POLL if wake_in is None else min(wake_in, tunables.SIGNAL_POLL)


class EngineLoop(Commands):
    def __init__(self, models, procs, on_crash: Callable[[BaseException], None] | None = None,
                 on_limit: Callable | None = None):
        self.models, self.procs = models, procs
        models.on_loaded = self.put
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
                       cmd.SetPolicy: self._set_policy, cmd.Load: self._load,
                       cmd.Unload: self._unload, cmd.Loaded: self._loaded}

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
            while self._drain(block=not self.models.has_work()):
                if self.models.has_work():
                    self.models.step()
                self.models.expire()
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
                c = self.inbox.get(timeout=_idle_wait(self.models.wake_in()))
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
            self.models.expire()

    def _publish(self, force: bool = False) -> None:
        """A new Snapshot, at most every SNAPSHOT_PERIOD while a model is busy."""
        now = time.monotonic()
        busy = self.models.has_work()
        if busy and not force and now - self._published < tunables.SNAPSHOT_PERIOD:
            return
        m = self.models
        kvs = {s.name: _kv_info(s.engine) for s in m.ready()}
        running = frozenset(r.owner.pid for e in m.engines() if e.has_work()
                            for r in e.last_batch if r.owner is not None)
        disk = [e.pager.usage() for e in m.engines()]
        self.snapshot = Snapshot(now, _sum_kv(kvs.values()), running, m.stats(), self.policy,
                                 sum(d["disk_total"] for d in disk),
                                 sum(d["disk_used"] for d in disk),
                                 tuple(m.info(s) for s in m.ready()), kvs,
                                 tuple(s for s in m.slots.values() if s.state != READY),
                                 (m.budget, m.used()),
                                 tuple(model_metrics(s.name, s.engine, kvs[s.name])
                                       for s in m.ready()))
        self._published = now

    # ---- after a stop or crash ----------------------------------------------------------
    def _fail_queued(self) -> None:
        """Fail what is queued, and what waits for a model that is loading."""
        while (c := self.inbox.get(timeout=0)) is not None:
            self._fail(c)
        for slot in list(self.models.slots.values()):
            waiting, slot.waiting = slot.waiting, []
            for c in waiting:
                self._fail(c)

    def _fail(self, c) -> None:
        """A command that will never run: its call fails, a dead process is released."""
        why = f"kernel shutting down{f' (engine crashed: {self.crashed!r})' if self.crashed else ''}"
        if isinstance(c, cmd.Release):
            self.procs.released(c.proc)
        elif getattr(c, "call", None) is not None:
            c.call.error(ECANCELED, why)


def _kv_info(e) -> KVInfo:
    swap = e.swapper.host if e.swapper else None
    return KVInfo(**e.blocks.usage(), block_size=e.block_size,
                  swap_total=swap.num_blocks if swap else 0,
                  swap_free=swap.num_free_blocks if swap else 0)


def _sum_kv(kvs) -> KVInfo:
    """Every model's pool together (their blocks, of the kernel's one block size)."""
    kvs = list(kvs)
    counts = {f: sum(getattr(k, f) for k in kvs)
              for f in ("total", "used", "cached", "free", "swap_total", "swap_free")}
    return KVInfo(**counts, block_size=kvs[0].block_size if kvs else 0)
