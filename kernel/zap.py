"""The ZAP handler (ZeroMQ RFC 27): libzmq asks it whether a CURVE client may finish its
handshake; it answers from the home's allow-list (syscalls/keys.py), read again at every
request, so `llmos keys allow` and `revoke` take effect for the next connection without
a restart or a word to the kernel. A connection already open stays until it closes:
ZeroMQ authenticates once, at the handshake.

Its answer's User-Id is the client's public key (Z85): libzmq attaches it to every
message of that connection, and the server keeps it in the connection's state
(kernel/peers.py), so the key, not a routing id, says who the peer is.

I/O thread only: its socket is polled next to the ROUTER. Reading the allow-list is a
few small files, never a wait on the engine. A refused client hears nothing but the
handshake error (the client turns it into KernelDead saying so at once).
"""
from __future__ import annotations

import logging
import time
from typing import Callable

import zmq
from zmq.utils import z85

from llmos.syscalls.home import HomeError

log = logging.getLogger("llmos.kernel")

ENDPOINT = "inproc://zeromq.zap.01"      # fixed by RFC 27
DOMAIN = b"llmos"
REFUSALS_LOGGED_EVERY = 60.0             # seconds: refused handshakes are counted between lines
_EVENTS, _POLLIN = int(zmq.EVENTS), int(zmq.POLLIN)


class Zap:
    """Answers ZAP requests in ctx: a CURVE client whose key allowed() lists is accepted."""

    def __init__(self, ctx: zmq.Context, allowed: Callable[[], dict[str, str]]):
        self.allowed = allowed                  # () -> {Z85 public key: name}
        self.names: dict[str, str] = {}         # key -> the name it was last accepted as
        self.sock = ctx.socket(zmq.REP)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind(ENDPOINT)
        self._refused, self._refusal_logged = 0, 0.0

    def serve(self) -> None:
        """Answer every request waiting (the socket polled readable)."""
        while self.sock.getsockopt(_EVENTS) & _POLLIN:
            request = self.sock.recv_multipart(zmq.NOBLOCK)
            try:
                answer = self._answer(request)
            except Exception:                   # a REP socket must answer, whatever happened
                log.exception("ZAP request failed")
                answer = [b"1.0", request[1] if len(request) > 1 else b"", b"500",
                          b"internal error", b"", b""]
            self.sock.send_multipart(answer)

    def close(self) -> None:
        self.sock.close(linger=0)

    def _answer(self, frames: list[bytes]) -> list[bytes]:
        """[version, request id, status, text, user id, metadata] for one request."""
        if len(frames) < 6 or frames[0] != b"1.0":
            return [b"1.0", frames[1] if len(frames) > 1 else b"", b"500", b"bad request", b"", b""]
        _, rid, _domain, address, _routing_id, mechanism, *credentials = frames
        if mechanism != b"CURVE" or len(credentials) != 1 or len(credentials[0]) != 32:
            return self._refuse(rid, address, "not CURVE")
        key = z85.encode(credentials[0]).decode()
        try:
            name = self.allowed().get(key)
        except (OSError, HomeError) as e:
            log.error("the CURVE allow-list cannot be read: %s", e)
            return [b"1.0", rid, b"500", b"allow-list unreadable", b"", b""]
        if name is None:
            return self._refuse(rid, address, f"key {key} is not allowed")
        self.names[key] = name
        log.info("CURVE connection from %s: key %s", address.decode(errors="replace"), name)
        return [b"1.0", rid, b"200", b"OK", key.encode(), b""]

    def _refuse(self, rid: bytes, address: bytes, why: str) -> list[bytes]:
        """A 400 answer; logged at most once a minute, with how many were refused since."""
        self._refused += 1
        now = time.monotonic()
        if now - self._refusal_logged >= REFUSALS_LOGGED_EVERY:
            log.warning("refused a connection from %s: %s (%d refused since the last line)",
                        address.decode(errors="replace"), why, self._refused)
            self._refused, self._refusal_logged = 0, now
        return [b"1.0", rid, b"400", b"key not allowed", b"", b""]
