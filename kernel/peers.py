"""The peers the syscall server knows, each bound to the connection it came on.

A peer is a ZeroMQ routing id, and a client may choose its own id: an id alone proves
nothing. So a peer's state, its authentication included, belongs to the connection its
messages arrive on (the socket's fd, which libzmq tells per message). When that
connection closes (the socket monitor's DISCONNECTED) or the id turns up on another
connection, the old state is dropped: its process, if attached, exits; the newcomer
starts unauthenticated.

Budgets. Authenticated peers (processes' connections): at most MAX_PEERS; a hello past
it is EAGAIN. Peers that have not said hello ("guests"): at most MAX_GUESTS, each for at
most GUEST_TTL seconds; a new guest may push out the oldest guest, never an
authenticated peer. I/O thread only.
"""
from __future__ import annotations

import socket
import struct
import time
from typing import Callable

from .syscall import ConnState

MAX_PEERS = 4096            # authenticated connections (processes may have several)
MAX_GUESTS = 256            # connections that have not said hello yet
GUEST_TTL = 10.0            # seconds a connection may stay without saying hello


class PeerTable:
    def __init__(self, max_peers: int = MAX_PEERS, max_guests: int = MAX_GUESTS,
                 guest_ttl: float = GUEST_TTL):
        self.max_peers, self.max_guests, self.guest_ttl = max_peers, max_guests, guest_ttl
        self.by_id: dict[bytes, ConnState] = {}
        self._by_fd: dict[int, bytes] = {}
        self._guests: dict[bytes, float] = {}       # id -> when it arrived (oldest first)
        self.authenticated = 0

    def admit(self, peer: bytes, fd: int | None, drop: Callable[[bytes, str], None]) -> ConnState:
        """The state of `peer` on connection `fd`, made fresh if it is new or came back on
        another connection. drop(id, why) is called for each peer that must go first."""
        conn = self.by_id.get(peer)
        if conn is not None and fd is not None and conn.fd != fd:
            drop(peer, "its id came back on a new connection")
            conn = None
        if conn is None:
            self._make_room(drop)
            conn = self.by_id[peer] = ConnState(peer)
            conn.fd = fd
            if fd is not None:
                self._by_fd[fd] = peer
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

    def on_fd(self, fd: int) -> bytes | None:
        """The peer whose connection is fd, if any."""
        return self._by_fd.get(fd)

    def remove(self, peer: bytes) -> ConnState | None:
        conn = self.by_id.pop(peer, None)
        if conn is None:
            return None
        if self._guests.pop(peer, None) is None:
            self.authenticated -= 1
        if conn.fd is not None and self._by_fd.get(conn.fd) == peer:
            del self._by_fd[conn.fd]
        return conn


def peer_credentials(fd: int | None) -> tuple[int, int] | None:
    """(pid, uid) of the process at the other end of unix socket fd (SO_PEERCRED), or
    None where there is none (tcp, not Linux, the connection already gone)."""
    if fd is None or not hasattr(socket, "SO_PEERCRED"):
        return None
    try:
        s = socket.fromfd(fd, socket.AF_UNIX, socket.SOCK_STREAM)    # a dup: ours to close
    except OSError:
        return None
    try:
        pid, uid, _ = struct.unpack("3i", s.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                       struct.calcsize("3i")))
    except OSError:
        return None
    finally:
        s.close()
    return pid, uid
