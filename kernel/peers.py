"""The peers the syscall server knows, each bound to the connection it came on.

A peer is a ZeroMQ routing id, and a client may choose its own id: an id alone proves
nothing. So a peer's state, its authentication included, belongs to the connection its
messages arrive on (the socket's fd, which libzmq tells per message). When that
connection closes (the socket monitor's DISCONNECTED) or the id turns up on another
connection, the old state is dropped: its process, if attached, exits; the newcomer
starts unauthenticated.

The monitor reports a closed fd late, and the kernel may have given its number to a new
connection meanwhile (a client that exits and reconnects at once): so a DISCONNECTED
drops the peer at that fd only if its socket (its inode, taken when the state was made)
is no longer the one open there, or its other end hung up; otherwise it is checked again
RECHECK seconds later (libzmq may close a connection itself, just after the event).

A CURVE connection's key (the ZAP User-Id, kernel/zap.py) is read when its state is made
and kept in it (ConnState.key): a connection has one key for its life, fixed by its
handshake, so state bound to the connection is bound to that key, and a routing id
reused on another connection, or under another key, inherits nothing.

Budgets. Authenticated peers (processes' connections): at most MAX_PEERS; a hello past
it is EAGAIN. Peers that have not said hello ("guests"): at most MAX_GUESTS, each for at
most GUEST_TTL seconds; a new guest may push out the oldest guest, never an
authenticated peer. Connections that have sent nothing yet (the monitor's ACCEPTED) are
budgeted the same way, and hung up (shutdown of the socket, which libzmq then closes):
else a client could hold kernel fds without a word. I/O thread only.
"""
from __future__ import annotations

import os
import select
import socket
import struct
import time
from typing import Callable

import zmq

from .syscall import ConnState

MAX_PEERS = 4096            # authenticated connections (processes may have several)
MAX_GUESTS = 256            # connections that have not said hello yet
GUEST_TTL = 10.0            # seconds a connection may stay without saying hello
RECHECK = 1.0               # seconds after which a DISCONNECTED of a still-open fd is checked again


class PeerTable:
    def __init__(self, max_peers: int = MAX_PEERS, max_guests: int = MAX_GUESTS,
                 guest_ttl: float = GUEST_TTL):
        self.max_peers, self.max_guests, self.guest_ttl = max_peers, max_guests, guest_ttl
        self.by_id: dict[bytes, ConnState] = {}
        self._by_fd: dict[int, bytes] = {}
        self._guests: dict[bytes, float] = {}       # id -> when it arrived (oldest first)
        self.authenticated = 0
        self.key_names: dict[str, str] = {}         # CURVE key -> its name (the ZAP handler's)
        self.rechecks: dict[int, tuple[bytes, float]] = {}   # fd -> (peer, when to look again)
        self.silent: dict[int, tuple[int, float]] = {}       # fd -> (inode, accepted at), oldest first

    def admit(self, peer: bytes, fd: int | None, drop: Callable[[bytes, str], None],
              head: zmq.Frame | None = None) -> ConnState:
        """The state of `peer` on connection `fd`, made fresh if it is new or came back on
        another connection. drop(id, why) is called for each peer that must go first.
        head: the message's first frame, asked for the connection's CURVE key when the
        state is made (None: no connection has one)."""
        conn = self.by_id.get(peer)
        ino = _inode(fd)                 # the socket, not just its number (numbers are reused)
        if fd is not None:
            self.silent.pop(fd, None)
        if conn is not None and fd is not None and (conn.fd != fd or conn.ino != ino):
            drop(peer, "its id came back on a new connection")
            conn = None
        if conn is None:
            holder = self._by_fd.get(fd) if fd is not None else None
            if holder is not None and holder != peer:   # one live connection per fd: the
                drop(holder, "its connection closed")    # one that held it has closed
            self._make_room(drop)
            conn = self.by_id[peer] = ConnState(peer)
            conn.fd, conn.ino = fd, ino
            if fd is not None:
                self._by_fd[fd] = peer
            if head is not None:
                conn.key = user_id(head)
                conn.key_name = self.key_names.get(conn.key)
            self._guests[peer] = time.monotonic()
        conn.last_seen = time.monotonic()
        return conn

    def _make_room(self, drop) -> None:
        now = time.monotonic()
        for peer, since in list(self._guests.items()):
            if now - since <= self.guest_ttl and len(self._guests) < self.max_guests:
                break                                # the rest arrived later
            drop(peer, "no hello in time" if now - since > self.guest_ttl
                 else "too many connections without hello")

    def may_authenticate(self) -> bool:
        return self.authenticated < self.max_peers

    def authenticated_now(self, conn: ConnState) -> None:
        """conn said hello: it is a peer of its own now, out of the guests' budget."""
        if self._guests.pop(conn.peer, None) is not None:
            self.authenticated += 1

    def accepted(self, fd: int) -> None:
        """The monitor says connection fd was accepted: silent until its first message.
        Past MAX_GUESTS silent ones, the oldest is hung up."""
        ino = _inode(fd)
        peer = self._by_fd.get(fd)
        if ino is None or peer is not None and self.by_id[peer].ino == ino:
            return                                   # gone already, or it has spoken
        self.silent.pop(fd, None)
        self.silent[fd] = ino, time.monotonic()
        while len(self.silent) > self.max_guests:
            _hang_up(*self._pop_silent())

    def hang_up_silent(self) -> None:
        """Hang up the connections silent for more than guest_ttl seconds."""
        now = time.monotonic()
        while self.silent and now - next(iter(self.silent.values()))[1] > self.guest_ttl:
            _hang_up(*self._pop_silent())

    def _pop_silent(self) -> tuple[int, int]:
        fd = next(iter(self.silent))
        return fd, self.silent.pop(fd)[0]

    def disconnected(self, fd: int) -> bytes | None:
        """The monitor says connection fd closed: the peer to drop now, if any (see the
        module docstring; a still-open socket at fd is looked at again by due())."""
        quiet = self.silent.get(fd)
        if quiet is not None and not _open(fd, quiet[0]):
            del self.silent[fd]
        peer = self._by_fd.get(fd)
        if peer is not None and _open(fd, self.by_id[peer].ino):
            self.rechecks[fd] = peer, time.monotonic() + RECHECK
            return None
        return peer

    def due(self) -> list[bytes]:
        """The peers whose late-checked connection is closed after all."""
        now, gone = time.monotonic(), []
        for fd, (peer, when) in list(self.rechecks.items()):
            if when <= now:
                del self.rechecks[fd]
                conn = self.by_id.get(peer)
                if conn is not None and conn.fd == fd and not _open(fd, conn.ino):
                    gone.append(peer)
        return gone

    def remove(self, peer: bytes) -> ConnState | None:
        conn = self.by_id.pop(peer, None)
        if conn is None:
            return None
        if self._guests.pop(peer, None) is None:
            self.authenticated -= 1
        if conn.fd is not None and self._by_fd.get(conn.fd) == peer:
            del self._by_fd[conn.fd]
        return conn


def user_id(frame: zmq.Frame) -> str | None:
    """The ZAP User-Id of frame's connection (a CURVE client's Z85 key), or None (no ZAP)."""
    try:
        return frame.get("User-Id") or None
    except zmq.ZMQError:                           # EINVAL: the connection has none
        return None


def peer_address(fd: int | None) -> str | None:
    """The IP address at the other end of tcp socket fd, or None (not tcp, gone)."""
    s = _socket(fd)
    if s is None:
        return None
    try:
        return s.getpeername()[0] if s.family in (socket.AF_INET, socket.AF_INET6) else None
    except OSError:
        return None
    finally:
        s.close()


def peer_credentials(fd: int | None) -> tuple[int, int] | None:
    """(pid, uid) of the process at the other end of unix socket fd (SO_PEERCRED), or
    None where there is none (tcp, not Linux, the connection already gone)."""
    s = _socket(fd) if hasattr(socket, "SO_PEERCRED") else None
    if s is None:
        return None
    try:
        if s.family != socket.AF_UNIX:         # tcp would answer uid -1, not an error
            return None
        pid, uid, _ = struct.unpack("3i", s.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                       struct.calcsize("3i")))
    except OSError:
        return None
    finally:
        s.close()
    return pid, uid


def _inode(fd: int | None) -> int | None:
    """The inode of the socket open at fd (sockets' inodes are not reused soon), or None."""
    try:
        return os.fstat(fd).st_ino if fd is not None else None
    except OSError:
        return None


def _hang_up(fd: int, ino: int) -> None:
    """Shut down the socket ino if it is still the one at fd (libzmq, reading EOF, then
    closes the connection and reports it)."""
    if _inode(fd) != ino:
        return
    s = _socket(fd)
    if s is not None:
        try:
            s.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        finally:
            s.close()


def _open(fd: int, ino: int | None) -> bool:
    """fd is still the socket ino, and its other end has not hung up."""
    if ino is None or _inode(fd) != ino:
        return False
    p = select.poll()
    p.register(fd, select.POLLRDHUP)            # POLLHUP, POLLERR, POLLNVAL come anyway
    return not p.poll(0)


def _socket(fd: int | None) -> socket.socket | None:
    """A socket object on a dup of fd (ours to close), its family read from the fd."""
    if fd is None:
        return None
    try:
        dup = os.dup(fd)
    except OSError:
        return None
    try:
        return socket.socket(fileno=dup)
    except OSError:
        os.close(dup)
        return None
