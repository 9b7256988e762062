"""The engine's inbox: typed commands, processed by the engine thread in arrival order.

Other threads never touch the engine: they put a command here. The kernel puts the
commands that concern a process while it holds the process table's lock, so their order
is the order in which ownership changed: the Add of a request always precedes its
Abort, and a dead process's Release follows every Add it made, so a request of a process
that is already dead never starts.

Commands that answer a syscall carry its Call; the engine thread answers it. A command
for a model that is still loading waits in its model table slot, in order, until the
loader thread's Loaded comes (kernel/modeltable.py).
"""
from __future__ import annotations

import queue
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Add:
    """Start request `rid` for process `proc` on token ids (chat: they came from the
    chat template; `turn` is how they continue a context that has tokens)."""
    rid: int
    proc: Any                  # the kernel/proc.py Proc that owns it
    call: Any                  # the generate Call: deltas and the reply go there
    key: tuple                 # (peer, call id): its entry in proc.requests
    tokens: list
    chat: bool
    sampling: dict
    context: int | None
    stream: bool
    salt: bytes                # (a STOPPED process's Pause came first: its account says so)
    model: Any = None          # the registry's ModelSpec (kernel/registry.py)
    mdir: Any = None           # its opened ModelDir: the load plan's input if not loaded
    turn: Any = None           # chat on a context: the messages as a turn (Engine.add_request)


@dataclass(frozen=True)
class Abort:
    """Finish request `rid` with reason "abort" (cancel, a signal); no-op if it is gone."""
    rid: int


@dataclass(frozen=True)
class Pause:
    """SIGSTOP (stopped=True) or SIGCONT of every request of `proc`."""
    proc: Any
    stopped: bool


@dataclass(frozen=True)
class Release:
    """`proc` died: abort its requests, free its contexts, then tell the process table."""
    proc: Any
    rids: list
    contexts: list


@dataclass(frozen=True)
class CreateContext:
    context: int
    proc: Any
    call: Any
    tokens: list = field(default_factory=list)
    salt: bytes = b""
    model: Any = None          # as Add's
    mdir: Any = None


@dataclass(frozen=True)
class ForkContext:
    source: int
    context: int               # the id the child gets
    proc: Any
    call: Any


@dataclass(frozen=True)
class FreeContext:
    context: int
    call: Any


@dataclass(frozen=True)
class DescribeContext:
    context: int
    call: Any


@dataclass(frozen=True)
class Stop:
    """Finish the command in hand and stop the loop."""


class Inbox:
    """A FIFO of commands; put() from any thread (and from a signal handler)."""

    def __init__(self):
        self._q: queue.SimpleQueue = queue.SimpleQueue()

    def put(self, cmd) -> None:
        self._q.put(cmd)          # SimpleQueue.put is reentrant: signal-handler safe

    def get(self, timeout: float | None = None):
        """The next command; None if none came within timeout (0: do not wait)."""
        try:
            if timeout == 0:
                return self._q.get_nowait()
            return self._q.get(timeout=timeout)
        except queue.Empty:
            return None


@dataclass(frozen=True)
class SetPolicy:
    """Switch the scheduling policy to `name` (kernel/policy.py); the call gets a SchedInfo,
    or EINVAL for an unknown name."""
    name: str
    call: Any


@dataclass(frozen=True)
class Load:
    """Load model `model` (a ModelSpec, its ModelDir opened) if it is not loaded; the call
    gets the model's ModelInfo once it is READY, or the load's error."""
    model: Any
    mdir: Any
    call: Any
    keep_alive: float | None = None     # seconds; negative: forever; None: the default


@dataclass(frozen=True)
class Unload:
    """Unload model `name` now (EBUSY while something pins it)."""
    name: str
    call: Any


@dataclass(frozen=True)
class Loaded:
    """From the loader thread: slot's engine is ready, or its load failed with error."""
    slot: Any
    engine: Any
    error: str | None
