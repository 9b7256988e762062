"""The loader thread: it reads a model's weights, prepares them on the driver and makes
its engine and pools, off the engine thread, then hands the engine (or the load's error)
to the engine thread as a typed `Loaded` command (kernel/inbox.py). The model table
(kernel/modeltable.py) admits loads and gives them to it, one at a time, in order.

A daemon thread: a kernel that shuts down mid-load exits at once. The loader touches
only the slot it loads (its progress and load time); the engine options it reads are the
table's, copied per load.
"""
from __future__ import annotations

import hashlib
import logging
import os
import queue
import re
import threading
import time
from pathlib import Path
from typing import Callable

from llmos.syscalls.errors import EINVAL, EIO, ENOMEM, SyscallError

from . import inbox as cmd
from . import tunables
from .load import build

log = logging.getLogger("llmos.models")
MARKS = (0.25, 0.5, 0.75)      # shares of the weights read that the kernel log reports


class Loader:
    def __init__(self, driver, engine_options: dict, hand_over: Callable[[cmd.Loaded], None]):
        """engine_options: load.build's (the table's dict, read at each load); hand_over:
        where a finished load's Loaded goes (the engine inbox)."""
        from .engine import Engine
        self.driver, self.engine_options, self.hand_over = driver, engine_options, hand_over
        self._engine_cls = Engine
        self._loads: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="llmos-loader", daemon=True)

    def load(self, slot) -> None:
        """Load slot on the loader thread (started on first use); Loaded follows."""
        if not self._thread.is_alive():
            self._thread.start()
        self._loads.put(slot)

    def close(self) -> None:
        """Stop the loader thread after the load in hand (if the process lives on)."""
        self._loads.put(None)

    def build(self, slot):
        """slot's engine, made on this thread: weights read (progress logged), prepared,
        pools allocated. Raises what the load raises (CheckpointError, MemoryError, ...)."""
        started, marks = time.monotonic(), iter(MARKS)
        mark = next(marks)

        def progress(fraction: float) -> None:
            nonlocal mark
            slot.progress = fraction
            while mark is not None and fraction >= mark:
                log.info("loading model %s: %d%% of the weights read", slot.name, mark * 100)
                mark = next(marks, None)

        options = dict(self.engine_options)
        if options.get("kv_disk_dir") is not None:
            options["kv_disk_dir"] = Path(options["kv_disk_dir"]) / _file_name(slot.name)
        engine = build(self._engine_cls, slot.plan, self.driver, progress=progress, **options)
        slot.load_seconds = time.monotonic() - started
        return engine

    def _run(self) -> None:
        while (slot := self._loads.get()) is not None:
            self._load(slot)

    def _load(self, slot) -> None:
        """Build slot's engine; hand it, or the error as a SyscallError, over."""
        _held_by_fault()
        try:
            engine, error = self.build(slot), None
        except Exception as e:                  # noqa: BLE001 — the load fails, the kernel goes on
            oom = isinstance(e, MemoryError) or "OutOfMemory" in type(e).__name__   # torch.cuda's
            code = ENOMEM if oom else \
                EINVAL if isinstance(e, ValueError) else EIO     # CheckpointError: a ValueError
            log.error("model %s failed to load: %s", slot.name, e,
                      exc_info=e if code == EIO else None)
            engine, error = None, SyscallError(code, f"model {slot.name!r}: {e}")
        self.hand_over(cmd.Loaded(slot, engine, error))


def _held_by_fault() -> None:
    """Tests: $LLMOS_FAULT=load-wait:PATH holds every load after boot until PATH exists (at
    most a minute), so a test sees a model LOADING for as long as it needs."""
    fault = os.environ.get(tunables.FAULT_ENV, "")
    if fault.startswith("load-wait:"):
        path, deadline = Path(fault.removeprefix("load-wait:")), time.monotonic() + 60
        while not path.exists() and time.monotonic() < deadline:
            time.sleep(0.02)


def _file_name(name: str) -> str:
    """A directory name for model name's disk tier: readable, and distinct for distinct
    names ("a/b" and "a_b" read alike)."""
    digest = hashlib.sha256(name.encode()).hexdigest()[:12]
    return f"{re.sub(r'[^A-Za-z0-9._-]', '_', name)[-48:]}-{digest}"
