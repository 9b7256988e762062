"""The kernel's syscall server: one ZeroMQ ROUTER, owned by one I/O thread.

The I/O thread receives, decodes, dispatches through the SyscallTable and sends. Other
threads (the engine) never touch the socket: `Call.reply/error/event` append to an outbox
(a deque) and wake the I/O thread through a pipe it polls next to the ROUTER.

Frames: [peer identity, header, *binary frames] in; [peer identity, message] out.
A request whose header cannot be decoded or has no usable id is answered with "id": null
and its code (EPROTO or E2BIG), so a raw peer learns why; our client ignores such replies.

Streaming (coalescing policy): outbound messages wait in a queue per peer until the
socket takes them. A delta event still waiting there absorbs every later delta of the
same call (wire.Coalesced: text and token ids concatenate, other keys take the newest
value), so a reader that falls behind gets fewer, larger deltas, never lost or
reordered text, and the server holds at most one unsent delta per call.

A peer that vanished (its connection closed, seen by the socket monitor; or
ROUTER_MANDATORY's EHOSTUNREACH on send) or stopped reading for too long (its queue past
MAX_BACKLOG) is dropped: its calls are finished silently and `on_peer_gone(conn)` tells
the kernel. Peers are bound to their connection and budgeted (kernel/peers.py); before
hello a message may be at most MAX_GUEST_MESSAGE bytes.

Endpoints: the home's ipc socket, and optionally a tcp one (`listen`). CURVE, given a
secret key, applies to tcp endpoints only (libzmq takes a socket's options at each
bind); with `allowed`, the ZAP handler (kernel/zap.py) admits only the client keys it
lists, and each connection keeps its key (ConnState.key). A non-loopback tcp address
without CURVE is refused.
"""
from __future__ import annotations

import errno
import logging
import os
import threading
import time
from collections import deque
from typing import Callable

import zmq

from llmos.syscalls import wire
from llmos.syscalls.errors import E2BIG, EAGAIN, EINVAL, WireError
from llmos.syscalls.numbers import Sys

from .endpoints import check_endpoint, check_listen, hard_cap, seed_routing_ids
from .peers import PeerTable
from .syscall import Call, ConnState, SyscallTable, shutdown_error
from .zap import DOMAIN, Zap

_EVENTS, _POLLIN = int(zmq.EVENTS), int(zmq.POLLIN)   # plain ints: pyzmq's enums cost µs
log = logging.getLogger("llmos.syscalls")

HWM = 1000                  # messages queued in zmq per peer and direction
MAX_INFLIGHT = 1024         # calls in flight per connection, then EAGAIN (but see ALWAYS)
ALWAYS = frozenset({Sys.KILL, Sys.CANCEL, Sys.EXIT, Sys.PING})  # never refused for that cap
MAX_BACKLOG = 4 * MAX_INFLIGHT  # unsent messages per peer before it is dropped as not reading
MAX_GUEST_MESSAGE = 4096    # bytes of a message before hello: a hello or ping is ~100
RECV_BATCH = 256            # requests taken per wakeup before serving the outbox again


class Server:
    """Serve `table` at `endpoint` and at `listen` (a tcp endpoint, or None). start() binds
    (raises zmq.ZMQError / ValueError) and starts the I/O thread; close() stops it.
    `on_peer_gone(conn)` runs on the I/O thread. curve_secret_key: tcp endpoints use
    CURVE; allowed() -> {Z85 public key: name}: the clients they admit (None: any key)."""

    def __init__(self, endpoint: str, table: SyscallTable, *, on_peer_gone=None,
                 listen: str | None = None, curve_secret_key: bytes | None = None,
                 allowed: Callable[[], dict[str, str]] | None = None,
                 max_message: int = wire.MAX_MESSAGE, hwm: int = HWM):
        self.endpoint, self.table = endpoint, table
        self.on_peer_gone = on_peer_gone
        self.max_message, self.hwm = max_message, hwm
        self._curve, self._allowed = curve_secret_key, allowed
        self._ipc_path = check_endpoint(endpoint, curve_secret_key is not None)
        if listen is not None:
            check_listen(listen, curve_secret_key is not None)
        self._endpoints = [endpoint] + ([listen] if listen else [])
        self.bound: list[str] = []                # the endpoints as bound (a tcp port resolved)
        # Any thread: the outbox and its wakeup.
        self._outbox: deque = deque()
        self._wake_lock = threading.Lock()
        self._wake_pending = False
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        # I/O thread only.
        self._peers = PeerTable()
        self._queues: dict[bytes, deque] = {}     # peer -> [call id, kind, data] not yet sent
        self._open_ev: dict[tuple, list] = {}     # (peer, call id) -> its unsent delta
        self._stopping = False
        self._cancel_on_close = True
        self._thread: threading.Thread | None = None
        self._sock = None
        self._zap: Zap | None = None

    # ---- life cycle -----------------------------------------------------------------
    def start(self) -> "Server":
        seed_routing_ids()
        self._ctx = zmq.Context()
        s = self._sock = self._ctx.socket(zmq.ROUTER)
        s.setsockopt(zmq.ROUTER_MANDATORY, 1)
        s.setsockopt(zmq.SNDHWM, self.hwm)
        s.setsockopt(zmq.RCVHWM, self.hwm)
        s.setsockopt(zmq.MAXMSGSIZE, hard_cap(self.max_message))
        s.setsockopt(zmq.LINGER, 0)
        if self._curve is not None and self._allowed is not None:
            self._zap = Zap(self._ctx, self._allowed)       # bound before any CURVE endpoint
            self._peers.key_names = self._zap.names
        for endpoint in self._endpoints:
            curve = self._curve is not None and endpoint.startswith("tcp://")
            s.curve_server = curve                          # taken by this bind only
            if curve:
                s.curve_secretkey, s.zap_domain = self._curve, DOMAIN
            s.bind(endpoint)
            self.bound.append(s.getsockopt(zmq.LAST_ENDPOINT).decode())
        self._monitor = s.get_monitor_socket(zmq.EVENT_DISCONNECTED | zmq.EVENT_ACCEPTED)
        if self._ipc_path:
            os.chmod(self._ipc_path, 0o600)
        self._thread = threading.Thread(target=self._run, name="llmos-syscalls-io", daemon=True)
        self._thread.start()
        return self

    def close(self, cancel: bool = True, timeout: float = 5.0) -> None:
        """Stop serving. cancel: answer every call in flight with ECANCELED first."""
        if self._thread is None:
            return
        self._cancel_on_close, self._stopping = cancel, True
        self._wake()
        self._thread.join(timeout)
        self._thread = None
        os.close(self._wake_r)
        os.close(self._wake_w)
        self._ctx.term()
        if self._ipc_path:
            try:
                os.unlink(self._ipc_path)
            except FileNotFoundError:
                pass

    def connections(self) -> list[ConnState]:
        """A snapshot of the peers known now (for ps and tests)."""
        return list(self._peers.by_id.values())

    # ---- any thread -----------------------------------------------------------------
    def post(self, peer: bytes, cid, kind: str, data) -> None:
        """Queue an outbound message ("msg": encoded bytes, "ev": a delta payload)."""
        self._outbox.append((peer, cid, kind, data))
        if threading.get_ident() != self._io_ident:
            self._wake()

    def _wake(self) -> None:
        with self._wake_lock:
            if self._wake_pending:
                return
            self._wake_pending = True
        try:
            os.write(self._wake_w, b"x")
        except (BlockingIOError, OSError):
            pass

    _io_ident = None

    # ---- I/O thread -----------------------------------------------------------------
    def _run(self) -> None:
        self._io_ident = threading.get_ident()
        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        poller.register(self._monitor, zmq.POLLIN)
        zap = self._zap.sock if self._zap else None
        if zap is not None:
            poller.register(zap, zmq.POLLIN)
        try:
            while not self._stopping:
                ready = dict(poller.poll(5 if self._queues else 1000))
                if self._wake_r in ready:
                    self._take_wakeup()
                if zap in ready:
                    self._zap.serve()
                if self._monitor in ready:      # before new messages: a closed connection
                    self._take_events()    # must be forgotten before its id is reused
                if self._peers.rechecks:
                    for peer in self._peers.due():
                        self._drop_peer(peer, "disconnected")
                if self._peers.silent:
                    self._peers.hang_up_silent()
                if self._sock in ready:
                    self._recv_batch()
                self._serve_outbox()
        except Exception:
            log.exception("syscall I/O thread crashed")
        finally:
            self._shutdown()

    def _take_wakeup(self) -> None:
        try:
            os.read(self._wake_r, 4096)
        except BlockingIOError:
            pass
        with self._wake_lock:
            self._wake_pending = False

    def _take_events(self) -> None:
        from zmq.utils.monitor import recv_monitor_message
        while self._monitor.getsockopt(_EVENTS) & _POLLIN:
            event = recv_monitor_message(self._monitor, zmq.NOBLOCK)
            if event["event"] == zmq.EVENT_ACCEPTED:
                self._peers.accepted(int(event["value"]))
                continue
            peer = self._peers.disconnected(int(event["value"]))
            if peer is not None:
                self._drop_peer(peer, "disconnected")

    def _recv_batch(self) -> None:
        sock = self._sock
        for _ in range(RECV_BATCH):
            if not sock.getsockopt(_EVENTS) & _POLLIN:   # cheaper than catching Again
                return
            frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
            self._handle(frames[0].get(zmq.SRCFD), [f.bytes for f in frames],
                         frames[0] if self._zap else None)
            self._serve_outbox()

    def _handle(self, fd: int | None, frames: list, head: zmq.Frame | None = None) -> None:
        """One message; head: its first frame, for the connection's CURVE key (or None)."""
        conn = self._peers.admit(frames[0], fd, self._drop_peer, head)
        if not conn.authenticated and sum(len(f) for f in frames[1:]) > MAX_GUEST_MESSAGE:
            msg = f"a message before hello may be at most {MAX_GUEST_MESSAGE} bytes"
            return self._enqueue(conn.peer, None, "msg", wire.encode_error(None, E2BIG, msg))
        try:
            req = wire.decode_request(frames[1:], self.max_message)
        except WireError as e:
            log.debug("%s: bad message: %s", conn.name(), e)
            return self._enqueue(conn.peer, e.call_id, "msg", wire.encode_error(e.call_id, e.code, e.msg))
        call = Call(conn, req.id, req.nr, self.post, req.frames)
        with conn.lock:
            if req.id in conn.calls:
                clash = EINVAL, f"call id {req.id} is already in flight"
            elif len(conn.calls) >= MAX_INFLIGHT and req.nr not in ALWAYS:
                clash = EAGAIN, f"more than {MAX_INFLIGHT} calls in flight"
            elif req.nr == Sys.HELLO and not self._peers.may_authenticate():
                clash = EAGAIN, "too many connections; close one and say hello again"
            else:
                clash = None
                conn.calls[req.id] = call
        if clash:
            self.table.denied(call, *clash)         # EAGAIN: for the audit log
            return self._enqueue(conn.peer, req.id, "msg", wire.encode_error(req.id, *clash))
        self.table.dispatch(call, req.args)
        if conn.authenticated:
            self._peers.authenticated_now(conn)

    def _serve_outbox(self) -> None:
        out = self._outbox
        while out:
            peer, cid, kind, data = out.popleft()
            if peer not in self._peers.by_id:
                continue
            if kind == "msg" and not self._queues and self._send_now(peer, data):
                continue                    # fast path: nothing queued, the socket took it
            self._enqueue(peer, cid, kind, data)
        for peer in list(self._queues):
            self._flush(peer)

    def _send_now(self, peer: bytes, frame: bytes) -> bool:
        try:
            self._sock.send_multipart([peer, frame], zmq.NOBLOCK)
            return True
        except zmq.ZMQError:
            return False                    # Again or a gone peer: the queue path sorts it out

    def _enqueue(self, peer: bytes, cid, kind: str, data) -> None:
        """Append to peer's queue, merging a delta into that call's unsent one (the policy)."""
        key = (peer, cid)
        if kind == "ev":
            pending = self._open_ev.get(key)
            if pending is not None:
                if not isinstance(pending[2], wire.Coalesced):
                    pending[2] = wire.Coalesced(pending[2])
                pending[2].add(data)
                return
        item = [cid, kind, data]
        q = self._queues.setdefault(peer, deque())
        q.append(item)
        if kind == "ev":
            self._open_ev[key] = item
        else:
            self._open_ev.pop(key, None)
        if len(q) > MAX_BACKLOG:
            self._drop_peer(peer, f"not reading ({len(q)} messages unsent)")

    def _flush(self, peer: bytes) -> None:
        q = self._queues.get(peer)
        while q:
            cid, kind, data = q[0]
            frame = data if kind == "msg" else self._encode_event(cid, data)
            try:
                if frame is not None:
                    self._sock.send_multipart([peer, frame], zmq.NOBLOCK)
            except zmq.Again:
                return                          # its pipe is full: retry in a few ms
            except zmq.ZMQError as e:
                if e.errno != errno.EHOSTUNREACH:
                    raise
                return self._drop_peer(peer, "gone")
            q.popleft()
            if kind == "ev":
                self._open_ev.pop((peer, cid), None)
        self._queues.pop(peer, None)

    @staticmethod
    def _encode_event(cid, payload):
        if isinstance(payload, wire.Coalesced):
            payload = payload.payload()
        try:
            return wire.encode_event(cid, payload)
        except Exception as e:
            log.error("call %s: dropping an unencodable event: %s", cid, e)
            return None

    def _drop_peer(self, peer: bytes, why: str) -> None:
        conn = self._peers.remove(peer)
        q = self._queues.pop(peer, ())
        for cid, _, _ in q:
            self._open_ev.pop((peer, cid), None)
        if conn is None:
            return
        conn.gone = True
        calls = conn.in_flight()
        for call in calls:
            call.cancel_silently()
        (log.info if conn.authenticated else log.debug)(
            "%s: %s; %d call(s) dropped", conn.name(), why, len(calls))
        if self.on_peer_gone is not None:
            try:
                self.on_peer_gone(conn)
            except Exception:
                log.exception("on_peer_gone failed for %s", conn.name())

    def _shutdown(self) -> None:
        if self._cancel_on_close:
            for conn in list(self._peers.by_id.values()):
                for call in conn.in_flight():
                    shutdown_error(call)
            deadline = time.monotonic() + 0.5
            self._serve_outbox()
            while self._queues and time.monotonic() < deadline:
                time.sleep(0.005)
                self._serve_outbox()
        self._sock.disable_monitor()
        self._monitor.close(linger=0)
        if self._zap is not None:
            self._zap.close()
        self._sock.close(linger=100)
