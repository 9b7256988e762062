"""The syscall table (xv6 `syscall.c`): number -> (name, spec, handler), and the dispatcher.

A handler is `handler(call: Call, args: dict) -> result | PENDING`, called on the server's
I/O thread with arguments already validated against the number's spec (syscalls/specs.py).
It is thin and must not block: it either returns the result at once (a result type of
syscalls/types.py, or plain data), or returns PENDING and some other thread (the engine,
a tokenizer worker) later finishes the call with `call.reply(...)` / `call.error(...)`,
after any number of `call.event(...)` deltas. Raising SyscallError gives an error reply;
any other exception gives EIO and a log line. Nothing is ever looked up by a name off the wire.

`install(table, kernel)` registers the kernel's sys_* functions (kernel/sys*.py).
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable, NamedTuple

from llmos.syscalls import wire
from llmos.syscalls.errors import (EACCES, EAGAIN, ECANCELED, EIO, ENOMEM, ENOSYS, EPERM,
                                   NOT_HELLOED, SyscallError)
from llmos.syscalls.numbers import Sys, sys_name
from llmos.syscalls.specs import SPECS
from llmos.syscalls.types import to_wire

log = logging.getLogger("llmos.syscalls")

PENDING = type("Pending", (), {"__repr__": lambda self: "PENDING"})()
"""Returned by a handler that will finish its call later, from another thread."""

OPEN_BEFORE_HELLO = frozenset({Sys.PING, Sys.HELLO})
# Error replies the audit log records. ENOMEM counts: on the I/O thread it is only ever a
# process's limit (the engine's own ENOMEM answers its calls from the engine thread).
DENIALS = frozenset({EPERM, EACCES, EAGAIN, ENOMEM})


class ConnState:
    """One peer (a DEALER identity) as the server sees it.

    I/O thread only: peer, authenticated, last_seen, gone. Set once by hello (I/O thread):
    pid (the process this connection is), owner (it holds the owner's rights), uid (the
    peer's uid by SO_PEERCRED; None on tcp), for the audit log.
    Guarded by self.lock: calls (call id -> Call in flight).
    """

    def __init__(self, peer: bytes):
        self.peer = peer
        self.fd: int | None = None           # the connection it came on (kernel/peers.py)
        self.ino: int | None = None          # ...and its socket's inode: fd numbers are reused
        self.key: str | None = None          # its CURVE key (Z85), set by ZAP at the handshake
        self.key_name: str | None = None     # the allow-list's name for that key
        self.authenticated = False
        self.pid: int | None = None
        self.owner = False
        self.uid: int | None = None
        self.last_seen = time.monotonic()
        self.gone = False
        self.lock = threading.Lock()
        self.calls: dict[int, Call] = {}

    def name(self) -> str:
        """'pid 12' or 'peer 0a1b2c3d' for log lines, then 'key NAME' on CURVE."""
        who = f"pid {self.pid}" if self.pid is not None else f"peer {self.peer.hex()}"
        return who if self.key is None else f"{who} key {self.key_name or self.key}"

    def in_flight(self) -> list:
        with self.lock:
            return list(self.calls.values())

    def forget(self, cid: int) -> None:
        with self.lock:
            self.calls.pop(cid, None)


class Call:
    """One syscall in flight. Thread-safe: any thread may reply, fail or stream events.

    `reply`, `error` finish the call (the first one wins; later ones return False and send
    nothing). `event` sends a delta before the reply; deltas a slow reader has not taken yet
    are coalesced (see server.py). Everything goes through the server's outbox: no thread
    but the server's I/O thread ever touches the socket.
    """
    __slots__ = ("conn", "id", "nr", "frames", "_post", "_lock", "_done")

    def __init__(self, conn: ConnState, cid: int, nr: int, post: Callable, frames=()):
        self.conn, self.id, self.nr, self.frames = conn, cid, nr, frames
        self._post = post             # post(peer, call_id, kind, data): the server's outbox
        self._lock = threading.Lock()
        self._done = False

    @property
    def done(self) -> bool:
        return self._done

    def reply(self, result: Any = None) -> bool:
        """Finish with `result`; an unencodable result becomes EIO. False if already finished."""
        try:
            frame = wire.encode_reply(self.id, to_wire(result))
        except Exception as e:
            log.error("%s: %s returned an unencodable result: %s", self.conn.name(), sys_name(self.nr), e)
            frame = wire.encode_error(self.id, EIO, f"{sys_name(self.nr)}: unencodable result")
        return self._finish(frame)

    def error(self, code: str, msg: str = "") -> bool:
        """Finish with an error reply. False if already finished."""
        return self._finish(wire.encode_error(self.id, code, msg))

    def event(self, payload: dict) -> bool:
        """Send a delta event (a map; str and list values concatenate when coalesced)."""
        if self._done:
            return False
        self._post(self.conn.peer, self.id, "ev", to_wire(payload))
        return True

    def cancel_silently(self) -> bool:
        """Mark finished without sending anything (the peer is gone). False if already finished."""
        return self._finish(None)

    def _finish(self, frame) -> bool:
        with self._lock:
            if self._done:
                return False
            self._done = True
        self.conn.forget(self.id)
        if frame is not None:
            self._post(self.conn.peer, self.id, "msg", frame)
        return True


class Entry(NamedTuple):
    name: str
    spec: Any
    handler: Callable | None


class SyscallTable:
    """Number -> Entry. Built with every number of Sys and its spec; handlers come later.

    PING and SYSCALLS have built-in handlers; the kernel registers the rest (and may
    replace the built-ins). A number with no handler answers ENOSYS.
    """

    def __init__(self, specs=SPECS):
        self._entries = {int(nr): Entry(Sys(nr).name.lower(), spec, None) for nr, spec in specs.items()}
        # check_caller(conn) raises SyscallError if conn's process may no longer call
        # (it exited): set by the kernel, run before every call after hello.
        self.check_caller: Callable | None = None
        # on_denied(call, code, msg) for every DENIALS answer (the audit log): set by the
        # kernel, called by the dispatcher and by the server for its own EAGAIN refusals.
        self.on_denied: Callable | None = None
        self.register(Sys.PING, lambda call, args: {})
        self.register(Sys.SYSCALLS, lambda call, args: {"syscalls": self.describe()})

    def register(self, nr: int, handler: Callable) -> None:
        """Install handler(call, args) for syscall nr. Raises KeyError for an unknown number."""
        if int(nr) not in self._entries:
            raise KeyError(f"no syscall number {nr}")
        if not callable(handler):
            raise TypeError(f"handler for {sys_name(nr)} is not callable")
        self._entries[int(nr)] = self._entries[int(nr)]._replace(handler=handler)

    def entry(self, nr: int) -> Entry | None:
        return self._entries.get(nr)

    def describe(self) -> list:
        """Introspection as plain data: [{nr, name, implemented, args, ...}] by number."""
        return [{"nr": nr, "name": e.name, "implemented": e.handler is not None, **e.spec.describe()}
                for nr, e in sorted(self._entries.items())]

    def dispatch(self, call: Call, args: dict) -> None:
        """Answer `call` (or leave it to its handler): ENOSYS, EACCES, argument errors, the
        handler's result or error, or EIO for a handler's bug. Never raises."""
        e = self._entries.get(call.nr)
        if e is None or e.handler is None:
            what = "" if e is None else f" ({e.name}: no handler)"
            if call.conn.authenticated:
                log.warning("%s: unknown sys call %d%s", call.conn.name(), call.nr, what)
            else:
                _guest_errors.note(f"unknown sys call {call.nr}")
            call.error(ENOSYS, f"no syscall {call.nr}" if e is None else f"{e.name}: not implemented")
            return
        if not call.conn.authenticated and call.nr not in OPEN_BEFORE_HELLO:
            _guest_errors.note(f"{e.name} before hello")
            self.refuse(call, EACCES, f"{e.name}: {NOT_HELLOED}")
            return
        try:
            if call.conn.authenticated and self.check_caller is not None:
                self.check_caller(call.conn)
            result = e.handler(call, e.spec.validate(args))
        except SyscallError as err:
            self.refuse(call, err.code, err.msg)
            return
        except Exception:
            log.exception("%s: %s failed", call.conn.name(), e.name)
            call.error(EIO, f"{e.name}: internal error")
            return
        if call.nr == Sys.HELLO and result is not PENDING:
            call.conn.authenticated = True    # hello must answer at once; no exception: accepted
        if result is not PENDING:
            call.reply(result)

    def refuse(self, call: Call, code: str, msg: str) -> None:
        """Answer call with an error; tell on_denied first if it is one of DENIALS."""
        self.denied(call, code, msg)
        call.error(code, msg)

    def denied(self, call: Call, code: str, msg: str) -> None:
        """Tell on_denied of a DENIALS answer to call (other codes: nothing). Never raises."""
        if code in DENIALS and self.on_denied is not None:
            try:
                self.on_denied(call, code, msg)
            except Exception:
                log.exception("on_denied failed for %s", call.conn.name())


class _RateLimitedLog:
    """Mistakes of peers that have not said hello: counted, logged at most once a minute
    (the first one at once), so that nobody can fill the kernel log without a token."""
    PERIOD = 60.0

    def __init__(self):
        self.count, self.logged = 0, None

    def note(self, what: str) -> None:
        self.count += 1
        now = time.monotonic()
        if self.logged is None or now - self.logged >= self.PERIOD:
            log.warning("%d call(s) refused to connections without hello%s (latest: %s)",
                        self.count, "" if self.logged is None
                        else f" in the last {now - self.logged:.0f}s", what)
            self.count, self.logged = 0, now


_guest_errors = _RateLimitedLog()


def shutdown_error(call: Call) -> bool:
    """Fail an in-flight call because the kernel is going away."""
    return call.error(ECANCELED, "kernel shutting down")


def install(table: SyscallTable, kernel) -> None:
    """Register the kernel's sys_* functions, bound to `kernel`, in `table`: the one map
    of number -> function (PING and SYSCALLS are the table's own)."""
    from functools import partial

    from .sysinfo import (sys_meminfo, sys_metrics, sys_model_add, sys_model_load,
                          sys_model_rm, sys_model_unload, sys_models, sys_sysinfo)
    from .sysllm import (sys_cancel, sys_context_create, sys_context_fork, sys_context_free,
                         sys_context_info, sys_detokenize, sys_generate, sys_tokenize)
    from .sysproc import (sys_exit, sys_getpid, sys_getrlimit, sys_hello, sys_kill, sys_nice,
                          sys_ps, sys_sched, sys_setrlimit, sys_spawn, sys_wait)
    functions = {
        Sys.HELLO: sys_hello, Sys.SYSINFO: sys_sysinfo, Sys.SPAWN: sys_spawn,
        Sys.EXIT: sys_exit, Sys.WAIT: sys_wait, Sys.KILL: sys_kill, Sys.PS: sys_ps,
        Sys.GETPID: sys_getpid, Sys.NICE: sys_nice, Sys.GENERATE: sys_generate,
        Sys.CANCEL: sys_cancel, Sys.CONTEXT_CREATE: sys_context_create,
        Sys.CONTEXT_FORK: sys_context_fork, Sys.CONTEXT_FREE: sys_context_free,
        Sys.CONTEXT_INFO: sys_context_info, Sys.TOKENIZE: sys_tokenize,
        Sys.DETOKENIZE: sys_detokenize, Sys.MEMINFO: sys_meminfo, Sys.MODELS: sys_models,
        Sys.SCHED: sys_sched, Sys.SETRLIMIT: sys_setrlimit, Sys.GETRLIMIT: sys_getrlimit,
        Sys.MODEL_LOAD: sys_model_load, Sys.MODEL_UNLOAD: sys_model_unload,
        Sys.MODEL_ADD: sys_model_add, Sys.MODEL_RM: sys_model_rm, Sys.METRICS: sys_metrics,
    }
    for nr, fn in functions.items():
        table.register(nr, partial(fn, kernel))
    table.check_caller = kernel.check_caller
    table.on_denied = kernel.denied
