"""The client half of the ABI: one DEALER per Connection, shared safely by many threads.

Imports only zmq, msgpack and the stdlib: an agent must start fast.

Design (leader/follower, no I/O thread of its own): whichever waiting caller finds no
leader becomes the leader and alone touches the socket: it sends what others queued,
polls, and delivers every reply and event to its slot by call id. The others wait on a
condition. A single-threaded caller thus sends and receives itself, with no thread
hand-off; many threads share one socket without ever using it at the same time.

Liveness: while calls are in flight, a silence of `ping_after` seconds makes the leader
send a ping; no message at all within `dead_after` seconds after it fails every waiting
call with KernelDead, and every later call raises it at once. A per-call deadline
(`_timeout`) raises CallTimeout and cancels the call in the kernel.

CURVE (a tcp kernel): the client's key pair and the server's public key. A kernel that
refuses the key (not on its allow-list) answers nothing; the socket monitor's handshake
failure fails every call at once with KernelDead saying so.
"""
from __future__ import annotations

import itertools
import os
import threading
import time
from collections import deque

import zmq

from . import wire
from .errors import EACCES, ECANCELED, EINVAL, NOT_HELLOED, CallTimeout, KernelDead, SyscallError
from .numbers import Sys

_EVENTS, _POLLIN = int(zmq.EVENTS), int(zmq.POLLIN)   # plain ints: pyzmq's enums cost µs
LEADER_POLL = 0.25          # seconds a leader polls before re-checking liveness and deadlines
_HANDSHAKE_FAILED = (zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                     | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)


class _Slot:
    """One call's mailbox (guarded by Connection._cond)."""
    __slots__ = ("id", "nr", "events", "done", "ok", "body")

    def __init__(self, cid, nr):
        self.id, self.nr, self.events, self.done, self.ok, self.body = \
            cid, nr, deque(), False, False, None


class CallHandle:
    """A streaming call that another thread may cancel (Connection.stream(_handle=)):
    cancel() before the call is sent cancels it as soon as it is."""

    def __init__(self):
        self._lock = threading.Lock()
        self._conn, self._slot, self._cancelled = None, None, False

    def cancel(self) -> None:
        with self._lock:
            self._cancelled = True
            conn, slot = self._conn, self._slot
        if slot is not None:
            conn._interrupt(slot)

    def _bind(self, conn: "Connection", slot: _Slot) -> None:
        with self._lock:
            self._conn, self._slot = conn, slot
            cancelled = self._cancelled
        if cancelled:
            conn._interrupt(slot)


class Connection:
    """A connection to the kernel at `endpoint`; sends hello first when `token` is given
    (raises SyscallError EACCES, and closes, if refused); `name` names the process an owner's
    hello attaches. Thread-safe. curve_server_key
    (Z85): use CURVE, as curve_keypair (public, secret; default a throwaway pair)."""

    def __init__(self, endpoint: str, token: str | None = None, *, timeout: float | None = None,
                 ping_after: float = 1.0, dead_after: float = 2.0,
                 curve_server_key: bytes | None = None,
                 curve_keypair: tuple[bytes, bytes] | None = None,
                 max_message: int = wire.MAX_MESSAGE, heartbeat: float | None = None,
                 name: str | None = None):
        self.endpoint, self.timeout = endpoint, timeout
        self.ping_after, self.dead_after, self.max_message = ping_after, dead_after, max_message
        self._handshake = None          # the socket monitor of a CURVE connection
        self._sock = self._open(endpoint, curve_server_key, curve_keypair)
        self._cond = threading.Condition()
        # Guarded by _cond.
        self._leading = False
        self._outbox: deque = deque()
        self._slots: dict[int, _Slot] = {}
        self._dead: str | None = None
        # Leader only.
        self._ids = itertools.count(1)
        self._last_rx = time.monotonic()
        self._ping_sent: float | None = None
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._poller = zmq.Poller()
        self._poller.register(self._sock, zmq.POLLIN)
        self._poller.register(self._wake_r, zmq.POLLIN)
        if self._handshake is not None:
            self._poller.register(self._handshake, zmq.POLLIN)
        self.hello = None
        self._closed = threading.Event()
        if token is not None:
            try:
                self.hello = self.call(Sys.HELLO, token=token, **({"name": name} if name else {}))
            except BaseException:
                self.close()
                raise
        if heartbeat:
            # An attached program tells the kernel it lives even while idle; the kernel
            # reaps one silent for longer than its heartbeat timeout.
            threading.Thread(target=self._beat, args=(heartbeat,), daemon=True,
                             name="llmos-heartbeat").start()

    def _beat(self, every: float) -> None:
        while not self._closed.wait(every):
            try:
                self.call(Sys.PING, _timeout=every)
            except SyscallError:      # dead, timed out, or closed: the calls will tell
                return

    def _open(self, endpoint, curve_server_key, curve_keypair):
        sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDTIMEO, int(self.dead_after * 1000))
        if curve_server_key is not None:
            sock.curve_publickey, sock.curve_secretkey = curve_keypair or zmq.curve_keypair()
            sock.curve_serverkey = curve_server_key
            self._handshake = sock.get_monitor_socket(_HANDSHAKE_FAILED)
        sock.connect(endpoint)
        return sock

    # ---- public -----------------------------------------------------------------------
    def call(self, nr: int, _timeout: float | None = None, **args):
        """Run syscall nr and return its result. Raises SyscallError (.code), CallTimeout,
        KernelDead. Events of a streaming call are dropped; use stream() for those."""
        slot, leading = self._submit(nr, args)
        deadline = self._deadline(_timeout)
        while True:
            self._wait(slot, deadline, False, leading)
            leading = False
            with self._cond:
                slot.events.clear()
                if slot.done:
                    return self._outcome(slot)

    def stream(self, nr: int, _timeout: float | None = None, _handle: "CallHandle | None" = None,
               **args):
        """Generator: yields delta payloads (merged when the caller fell behind), then
        returns the final result (StopIteration.value). Abandoning it cancels the call, and
        so does `_handle`.cancel() from another thread (the iterating one then gets
        SyscallError ECANCELED)."""
        slot, leading = self._submit(nr, args)
        if _handle is not None:
            _handle._bind(self, slot)
        deadline = self._deadline(_timeout)
        try:
            while True:
                self._wait(slot, deadline, True, leading)
                leading = False
                with self._cond:
                    events = list(slot.events)
                    slot.events.clear()
                if events:
                    yield events[0] if len(events) == 1 else wire.merge_delta(*events)
                elif slot.done:
                    return self._outcome(slot)
        finally:
            if not slot.done:
                self._abandon(slot)

    @property
    def dead(self) -> str | None:
        """Why the kernel is taken for dead (every call raises KernelDead), or None."""
        return self._dead

    def close(self) -> None:
        """Fail calls still waiting (KernelDead "connection closed") and close the socket."""
        self._closed.set()
        with self._cond:
            if self._sock is None:
                return
            self._fail_all("connection closed")
            self._wakeup()
            while self._leading:
                self._cond.wait(1.0)
            self._leading = True        # nobody may touch the socket again
            sock, self._sock = self._sock, None
        if self._handshake is not None:
            sock.disable_monitor()
            self._handshake.close(linger=0)
        sock.close(linger=0)
        os.close(self._wake_r)
        os.close(self._wake_w)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ---- submitting -------------------------------------------------------------------
    def _deadline(self, timeout):
        timeout = self.timeout if timeout is None else timeout
        return None if timeout is None else time.monotonic() + timeout

    def _submit(self, nr: int, args: dict) -> tuple[_Slot, bool]:
        """Register and send a call. Returns (slot, True) if the caller became the leader:
        it must then go on to _wait(..., leading=True), which resigns."""
        cid = next(self._ids)
        try:
            frame = wire.encode_request(cid, nr, args)
        except (TypeError, ValueError, OverflowError) as e:
            raise SyscallError(EINVAL, f"arguments cannot be encoded: {e}") from None
        slot = _Slot(cid, nr)
        with self._cond:
            if self._dead:
                raise KernelDead(self._dead)
            if not self._slots:
                self._last_rx = time.monotonic()    # silence is only counted while busy
            self._slots[cid] = slot
            if self._leading:
                self._outbox.append(frame)
                self._wakeup()
                return slot, False
            self._leading = True
        try:
            self._send(frame)
        except BaseException:
            self._resign()
            raise
        return slot, True

    def _send_or_queue(self, frame: bytes) -> None:
        with self._cond:
            if self._leading:
                self._outbox.append(frame)
                self._wakeup()
                return
            self._leading = True
        try:
            self._send(frame)
        finally:
            self._resign()

    def _abandon(self, slot: _Slot) -> None:
        with self._cond:
            self._slots.pop(slot.id, None)
            dead = self._dead
        if not dead:
            self._send_or_queue(wire.encode_request(next(self._ids), Sys.CANCEL, {"call": slot.id}))

    def _interrupt(self, slot: _Slot) -> None:
        """From any thread: end slot's call as cancelled and tell the kernel."""
        with self._cond:
            if slot.done:
                return
            slot.done, slot.ok, slot.body = True, False, (ECANCELED, "cancelled by the caller")
            self._slots.pop(slot.id, None)
            self._cond.notify_all()
            self._wakeup()                          # a leader waiting on it looks again
            dead = self._dead
        if not dead:
            self._send_or_queue(wire.encode_request(next(self._ids), Sys.CANCEL, {"call": slot.id}))

    def _outcome(self, slot: _Slot):
        if slot.ok:
            return slot.body
        if slot.body is _DEAD:
            raise KernelDead(self._dead)
        if slot.body[0] == EACCES and str(slot.body[1]).endswith(NOT_HELLOED) \
                and self.hello is not None:
            # A kernel started anew on the same endpoint (zmq reconnected to it) does not
            # know this connection, which said hello to the one before.
            with self._cond:
                self._dead = self._dead or "the kernel restarted; connect() again"
            raise KernelDead(self._dead)
        raise SyscallError(*slot.body)

    # ---- waiting (leader / follower) --------------------------------------------------
    def _wait(self, slot: _Slot, deadline, want_event: bool, leading: bool = False) -> None:
        """Return once slot is done (or has events, if want_event). Raises CallTimeout.
        leading: the caller already holds the leader role (from _submit)."""
        if leading:
            try:
                self._lead(slot, deadline, want_event)
            finally:
                self._resign()
        while True:
            with self._cond:
                if slot.done or want_event and slot.events:
                    return
                if deadline is not None and time.monotonic() >= deadline:
                    self._slots.pop(slot.id, None)
                    timed_out = True
                elif self._leading:
                    self._cond.wait(LEADER_POLL if deadline is None
                                    else max(0.0, min(LEADER_POLL, deadline - time.monotonic())))
                    continue
                else:
                    timed_out, self._leading = False, True
            if timed_out:
                self._abandon(slot)
                raise CallTimeout(f"call {slot.id} timed out; cancelled")
            try:
                self._lead(slot, deadline, want_event)
            finally:
                self._resign()

    def _lead(self, slot: _Slot, deadline, want_event: bool) -> None:
        while True:
            with self._cond:
                if slot.done or want_event and slot.events:
                    return
                frames = list(self._outbox)
                self._outbox.clear()
            for f in frames:
                self._send(f)
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                return
            wait = LEADER_POLL if deadline is None else min(LEADER_POLL, deadline - now)
            ready = dict(self._poller.poll(max(0, int(wait * 1000)) or 1))
            if self._wake_r in ready:
                self._drain_wakeups()
            if self._sock in ready:
                self._recv_all()
            if self._handshake is not None and self._handshake in ready:
                self._handshake_failed()
            self._check_liveness()

    def _resign(self) -> None:
        """Give up leadership, first sending whatever others queued meanwhile."""
        while True:
            with self._cond:
                if not self._outbox or self._sock is None:
                    self._leading = False
                    self._cond.notify_all()
                    return
                frames = list(self._outbox)
                self._outbox.clear()
            for f in frames:
                self._send(f)

    # ---- leader only --------------------------------------------------------------------
    def _send(self, frame: bytes, flags: int = 0) -> None:
        if self._sock is None:
            return
        try:
            self._sock.send(frame, flags)
        except zmq.Again:
            if flags:
                return                   # a ping that did not fit: silence will tell
            if self._handshake is not None and self._handshake.poll(0):
                self._handshake_failed()         # why it blocked: the kernel refused us
                return

            with self._cond:
                self._fail_all(f"kernel at {self.endpoint} is not taking messages")
        except zmq.ZMQError as e:
            with self._cond:
                self._fail_all(f"socket error: {e}")

    def _recv_all(self) -> None:
        got, sock = [], self._sock
        while sock.getsockopt(_EVENTS) & _POLLIN:    # cheaper than catching Again
            got.append(sock.recv(zmq.NOBLOCK))
        self._last_rx = time.monotonic()
        with self._cond:
            for frame in got:
                self._deliver(frame)
            self._cond.notify_all()

    def _deliver(self, frame: bytes) -> None:
        try:
            cid, kind, body = wire.decode_reply(frame, self.max_message)
        except SyscallError:
            return                       # not ours to fail on: a garbled reply has no id
        slot = self._slots.get(cid) if type(cid) is int else None
        if slot is None:
            return                       # a ping's answer, or a call given up on
        if kind == "event":
            slot.events.append(body)
            return
        slot.done, slot.ok, slot.body = True, kind == "ok", body
        del self._slots[cid]

    def _check_liveness(self) -> None:
        now = time.monotonic()
        if self._ping_sent is not None and self._last_rx >= self._ping_sent:
            self._ping_sent = None
        if self._ping_sent is None:
            if now - self._last_rx > self.ping_after:
                self._ping_sent = now
                self._send(wire.encode_request(next(self._ids), Sys.PING, {}), zmq.NOBLOCK)
        elif now - self._ping_sent > self.dead_after:
            with self._cond:
                self._fail_all(f"kernel at {self.endpoint} did not answer for "
                               f"{now - self._last_rx:.1f}s")

    def _handshake_failed(self) -> None:
        from zmq.utils.monitor import recv_monitor_message
        event = recv_monitor_message(self._handshake, zmq.NOBLOCK)
        if event["event"] == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
            why = (f"the kernel at {self.endpoint} refused this client's CURVE key "
                   f"(status {int(event['value'])}: not on its allow-list, see `llmos keys`)")
        else:
            why = (f"the CURVE handshake with {self.endpoint} failed: is the server key "
                   f"the kernel's (HOME/keys/server.pub)?")
        with self._cond:
            self._fail_all(why)

    def _drain_wakeups(self) -> None:
        try:
            os.read(self._wake_r, 4096)
        except BlockingIOError:
            pass

    # ---- under _cond ----------------------------------------------------------------------
    def _wakeup(self) -> None:
        try:
            os.write(self._wake_w, b"x")
        except (BlockingIOError, OSError):
            pass

    def _fail_all(self, why: str) -> None:
        if self._dead is None:
            self._dead = why
        for slot in self._slots.values():
            slot.done, slot.ok, slot.body = True, False, _DEAD
        self._slots.clear()
        self._cond.notify_all()


_DEAD = ("EDEAD", "kernel dead")
