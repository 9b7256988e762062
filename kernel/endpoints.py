"""The endpoints the kernel serves and how its ROUTER is hardened, before any socket
exists: which addresses it may bind (ipc, and tcp off loopback only with CURVE), the
frame size past which libzmq drops a peer, and the seed of libzmq's routing ids.
Light: `llmos up` checks --listen with it before it starts a kernel.
"""
from __future__ import annotations

import ctypes
import secrets

from llmos.syscalls.net import is_loopback


def hard_cap(max_message: int) -> int:
    """libzmq's MAXMSGSIZE: a frame past it makes libzmq drop the peer's connection, unanswered.
    Between max_message and this cap a message gets a proper E2BIG reply."""
    return 2 * max_message + 4096


def check_endpoint(endpoint: str, curve: bool) -> str | None:
    """The ipc socket path (or None for tcp). Raises ValueError for an endpoint we refuse:
    anything but ipc:// and tcp://, or a non-loopback tcp address without CURVE."""
    if endpoint.startswith("ipc://"):
        return endpoint[len("ipc://"):]
    if endpoint.startswith("tcp://"):
        host = endpoint[len("tcp://"):].rsplit(":", 1)[0]
        if not curve and not is_loopback(host.strip("[]")):
            raise ValueError(f"refusing {endpoint}: a non-loopback address needs CURVE "
                             f"(an allow-list of client keys); drop --no-curve, or listen "
                             f"on 127.0.0.1")
        return None
    raise ValueError(f"unsupported endpoint {endpoint!r}: use ipc://path or tcp://127.0.0.1:port")


def seed_routing_ids() -> None:
    """Seed the C library's rand(), from which libzmq's ROUTER takes the first of the
    routing ids it numbers ("\\0" + a counter). Unseeded, that counter starts at the same
    value in every kernel; a client may choose ids of that form, and when the counter
    reaches one already held libzmq aborts the process on an assertion: any client could
    have killed the kernel with 64 connections. Seeded, the ids cannot be guessed."""
    try:
        ctypes.CDLL(None).srand(secrets.randbits(32))
    except (OSError, AttributeError):          # no C library to reach: nothing to seed
        pass


def check_listen(endpoint: str, curve: bool) -> None:
    """check_endpoint for the extra endpoint (--listen): tcp only."""
    if check_endpoint(endpoint, curve) is not None:
        raise ValueError(f"--listen {endpoint}: tcp://HOST:PORT only (the home's ipc socket "
                         f"is served anyway)")
