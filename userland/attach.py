"""How a program reaches a kernel: connect(), which says hello as the right process.

A process the kernel spawned is itself (its secret, read once from the pipe it was
handed: syscalls/secret.py); any other program on the kernel's machine attaches with the
owner token of the home; a program elsewhere reaches a `--listen` endpoint over tcp,
with CURVE keys (syscalls/keys.py). What comes back is the SDK's Kernel (userland/sdk.py).
"""
from __future__ import annotations

import os
from pathlib import Path

from llmos.syscalls import EACCES, Connection, SyscallError
from llmos.syscalls.home import Home, HomeError, NoKernel, read_token
from llmos.syscalls.secret import own_token

from .sdk import Kernel, KernelNotRunning

HEARTBEAT = 5.0     # s between an attached program's pings (the kernel reaps after 30 s)


def connect(home=None, timeout: float | None = None, *, url: str | None = None,
            key: str | None = None, server_key: str | None = None,
            token: str | None = None, name: str | None = None) -> Kernel:
    """Connect to the kernel and say hello; returns the Kernel (this process's `.pid`).

    Without `home`, a process spawned by the kernel is itself: LLMOS_SOCKET, and its own
    secret, read once from the pipe the kernel handed it (syscalls/secret.py). Anyone
    else (or with `home`) attaches to the kernel of that home (the home of LLMOS_SOCKET,
    else $LLMOS_HOME, else ~/.llmos) with the owner token; the kernel refuses that token
    from its agents and their descendants. `timeout`: default seconds per call (None: no
    limit; a silent kernel still raises KernelDead within seconds). `name`: what ps calls
    this program when it attaches (default "attached"); a spawned process keeps its own.

    A kernel listening on tcp (`llmos up --listen`): `url` "tcp://HOST:PORT", else
    $LLMOS_URL (used without `home`, outside llmos processes). With CURVE: the client key
    `key` (else $LLMOS_KEY: a name in HOME/keys/clients/ or a .key file's path) and the
    kernel's public key `server_key` (else $LLMOS_SERVER_KEY: Z85 or a file; else
    HOME/keys/server.pub). The hello uses `token` (else $LLMOS_TOKEN, else the owner token
    of the kernel running on home: the same machine). A refused key is KernelDead.
    Raises KernelNotRunning (no kernel; start one with `llmos up`), SyscallError EACCES
    (token refused or unreadable, or this process's secret already taken), KernelDead
    (the kernel does not answer).
    """
    if url is None and home is None and "LLMOS_SOCKET" not in os.environ:
        url = os.environ.get("LLMOS_URL")
    if url:
        return _connect_tcp(url, home, key, server_key, token, timeout, name)
    endpoint = os.environ.get("LLMOS_SOCKET")
    secret = own_token() if home is None and endpoint else None
    if secret:
        if "://" not in endpoint:
            endpoint = "ipc://" + endpoint
        where = Path(os.environ["LLMOS_HOME"]) if os.environ.get("LLMOS_HOME") else None
        if endpoint.startswith("ipc://"):
            sock = Path(endpoint[len("ipc://"):])
            if not sock.exists():
                raise KernelNotRunning(f"the kernel socket {sock} is gone; "
                                       f"start a kernel with `llmos up`")
            where = where or sock.parent.parent        # HOME/run/kernel.sock
    else:
        below_agent = home is None and bool(endpoint)    # inherited LLMOS_SOCKET, no secret
        endpoint, owner, where = _attach(_home_of(endpoint) if below_agent else home,
                                         _NOT_SPAWNED if below_agent else "")
        conn = Connection(endpoint, owner, timeout=timeout, heartbeat=HEARTBEAT, name=name)
        return Kernel(conn, where, attached=True)
    return Kernel(Connection(endpoint, secret, timeout=timeout), where)


def _connect_tcp(url, home, key, server_key, token, timeout, name) -> Kernel:
    """connect() to a kernel's tcp endpoint as an attached program, with CURVE if a key is given."""
    from llmos.syscalls import keys
    h = home if isinstance(home, Home) else Home(home)
    key = key or os.environ.get("LLMOS_KEY")
    server_key = server_key or os.environ.get("LLMOS_SERVER_KEY")
    if server_key and not key:
        raise SyscallError(EACCES, "a server key without a client key: give key= or $LLMOS_KEY")
    curve = {}
    try:
        if key:
            curve = {"curve_keypair": keys.client_keys(h, key), "curve_server_key":
                     keys.public_key(server_key) if server_key else keys.server_public(h)}
        token = token or os.environ.get("LLMOS_TOKEN") or read_token(h)
    except NoKernel as e:
        raise KernelNotRunning(f"{e}; for a kernel elsewhere, give its owner token (its "
                               f"HOME/run/token) as token= or $LLMOS_TOKEN") from None
    except HomeError as e:                     # a key missing or malformed included
        raise SyscallError(EACCES, str(e)) from None
    conn = Connection(url, token, timeout=timeout, heartbeat=HEARTBEAT, name=name, **curve)
    return Kernel(conn, None, attached=True)


def _home_of(endpoint: str | None) -> Path | None:
    """The home whose socket is endpoint (HOME/run/kernel.sock), else None (the default):
    a program below an agent finds the agent's kernel, wherever its home."""
    if not endpoint or "://" in endpoint and not endpoint.startswith("ipc://"):
        return None
    return Path(endpoint.removeprefix("ipc://")).parent.parent


def _attach(home, hint: str = ""):
    """(endpoint, owner token, home path) of the kernel on home; hint is added to EACCES."""
    h = home if isinstance(home, Home) else Home(home)
    try:
        token = read_token(h)
    except NoKernel as e:
        up = "llmos up" if home is None else f"llmos up --home {h.path}"
        raise KernelNotRunning(f"{e}; start one with `{up}`") from None
    except HomeError as e:
        raise SyscallError(EACCES, f"{e}{hint}") from None
    return h.socket_url, token, h.path


# Why a program an agent started itself cannot connect: it inherited the agent's
# LLMOS_SOCKET but not its secret, and the owner's token is not for agents.
_NOT_SPAWNED = ("; this process inherited LLMOS_SOCKET from an agent but not its secret, "
                "which only the process the kernel spawned holds: start it with spawn() or "
                "`llmos run` to make it an llmos process of its own")
