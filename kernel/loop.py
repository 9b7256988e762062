"""The engine loop: the one thread that owns the engine, fed through an inbox.

The daemon runs it on its main thread (`run`): torch's OpenMP pool serves the thread
that created it best, and the same engine ran about 2x slower per step from a second
thread on 2 cores. Tests and in-process users may `start` it on a thread of its own.

Other threads (the syscall I/O thread, the reaper) never touch the engine: they `submit`
a function, which runs on the engine thread between steps, and get a Future for its
result. Engine events leave through the callbacks the submitted functions install
(`on_event` of a request), which must only hand data to another thread, never block.

One turn of the loop:
  1. run every function waiting in the inbox, in arrival order;
  2. if the engine has work, run one step; else sleep on the inbox until something comes;
  3. a step that raises is fatal: the loop stops, every later submit fails, and
     `on_crash(exc)` tells the kernel, which answers every waiting call and exits.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import Future
from typing import Any, Callable

from . import tunables

log = logging.getLogger("llmos.loop")

_STOP = object()


class EngineDead(RuntimeError):
    """The engine loop is not running (crashed or shut down)."""


class EngineLoop:
    def __init__(self, engine, on_crash: Callable[[BaseException], None] | None = None):
        self.engine = engine
        self.on_crash = on_crash
        self.crashed: BaseException | None = None
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="llmos-engine", daemon=True)
        self._stopped = threading.Event()

    def start(self) -> "EngineLoop":
        """Run the loop on a thread of its own."""
        self._thread.start()
        return self

    def run(self) -> None:
        """Run the loop on the calling thread until stop() or a crash."""
        self._run()

    def submit(self, fn: Callable[[Any], Any]) -> Future:
        """Run fn(engine) on the engine thread; the Future holds its result or exception."""
        future: Future = Future()
        if self._stopped.is_set():
            future.set_exception(EngineDead(f"engine loop is down: {self.crashed or 'stopped'}"))
            return future
        self._inbox.put((fn, future))
        if self._stopped.is_set():     # stopped between the check and the put
            self._fail_queued()
        return future

    def call(self, fn: Callable[[Any], Any], timeout: float | None = None) -> Any:
        """submit and wait: for callers that may block (never the I/O thread)."""
        return self.submit(fn).result(timeout)

    def stop(self, timeout: float = 10.0) -> None:
        """Finish the function in hand, then stop; queued functions fail with EngineDead.
        Safe to call from a signal handler when the loop runs on this thread (it only
        queues the stop then)."""
        self._inbox.put(_STOP)          # SimpleQueue.put is reentrant: signal-handler safe
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    def _run(self) -> None:
        try:
            while self._drain(block=not self.engine.has_work()):
                if self.engine.has_work():
                    self.engine.step()
        except BaseException as exc:      # noqa: BLE001 — a crashed engine must not hang anyone
            log.exception("engine loop crashed")
            self.crashed = exc
            if self.on_crash is not None:
                self.on_crash(exc)
        finally:
            self._stopped.set()
            self._fail_queued()

    def _drain(self, block: bool) -> bool:
        """Run what is in the inbox; False on stop. If `block` (the engine is idle), wait
        for one item, then gather what else arrives within ARRIVAL_WINDOW, so that
        requests sent together start in one batch rather than one step apart."""
        deadline = None
        while True:
            try:
                if block:
                    item = self._inbox.get()
                elif deadline is not None and (left := deadline - time.monotonic()) > 0:
                    item = self._inbox.get(timeout=left)
                else:
                    item = self._inbox.get_nowait()
            except queue.Empty:
                return True
            if block:
                block, deadline = False, time.monotonic() + tunables.ARRIVAL_WINDOW
            if item is _STOP:
                return False
            fn, future = item
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn(self.engine))
                except Exception as exc:   # a caller's error: theirs to handle, not fatal
                    future.set_exception(exc)

    def _fail_queued(self) -> None:
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return
            if item is not _STOP:
                item[1].set_exception(EngineDead(f"engine loop is down: {self.crashed or 'stopped'}"))
