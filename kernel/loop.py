"""The engine loop: the one thread that owns the engine, fed through an inbox.

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
from concurrent.futures import Future
from typing import Any, Callable

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
        self._thread.start()
        return self

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
        """Finish the function in hand, then stop; queued functions fail with EngineDead."""
        self._inbox.put(_STOP)
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
        """Run what is in the inbox (waiting for one item if `block`); False on stop."""
        while True:
            try:
                item = self._inbox.get(block=block, timeout=None)
            except queue.Empty:
                return True
            if item is _STOP:
                return False
            fn, future = item
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn(self.engine))
                except Exception as exc:   # a caller's error: theirs to handle, not fatal
                    future.set_exception(exc)
            block = False

    def _fail_queued(self) -> None:
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return
            if item is not _STOP:
                item[1].set_exception(EngineDead(f"engine loop is down: {self.crashed or 'stopped'}"))
