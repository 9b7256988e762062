"""Who calls the gateway, as the kernel sees them: one attached process per API key
("api:NAME" in ps), so limits, nice, kill and the scheduling policy apply to an API
client exactly as to an agent. Without keys (loopback only) every request is one
process, "api". The gateway's own reads (models, health, metrics) are "gateway".

A connection whose kernel went away is dropped and made again on the next request, so
a restarted kernel is picked up without restarting the gateway.
"""
from __future__ import annotations

import hashlib
import hmac
import threading
from pathlib import Path

from llmos.userland.gateway.errors import ApiError

DEFAULT = "api"            # the process of keyless requests
SELF = "gateway"           # the process of the gateway's own reads


def read_keys(keys: tuple[str, ...], key_file: str | None) -> dict[str, str]:
    """{key: name}: --api-key KEYs (named key1, key2, ...) and a file of `NAME KEY` or
    `KEY` lines (lines starting with # are comments). Raises ValueError naming a bad
    line, an empty key, a key or a name given twice."""
    found: dict[str, str] = {}

    def add(key: str, name: str, where: str) -> None:
        if not key.strip():
            raise ValueError(f"{where}: an empty API key would let anyone in")
        if key in found or name in found.values():
            raise ValueError(f"{where}: key or name {name!r} given twice")
        found[key] = name
    for i, key in enumerate(keys, 1):
        add(key, f"key{i}", f"--api-key #{i}")
    if key_file:
        for n, line in enumerate(Path(key_file).read_text().splitlines(), 1):
            parts = line.split()
            if not parts or parts[0].startswith("#"):
                continue
            if len(parts) > 2:
                raise ValueError(f"{key_file}:{n}: expected `NAME KEY` or `KEY`")
            name, key = parts if len(parts) == 2 else (f"key{len(found) + 1}", parts[0])
            add(key, name, f"{key_file}:{n}")
    return found


class Clients:
    def __init__(self, home, keys: dict[str, str]):
        self.home = home
        # compared as digests: equal lengths, so the time taken tells nothing of a key
        self.keys = {_digest(k): name for k, name in keys.items()}
        self._lock = threading.Lock()
        self._kernels: dict = {}                  # process name -> Kernel (guarded by _lock)

    def caller(self, authorization: str | None) -> str:
        """The process name for a request's Authorization header. Raises ApiError 401."""
        if not self.keys:
            return DEFAULT
        scheme, _, given = (authorization or "").strip().partition(" ")
        given = given.strip() if scheme.lower() == "bearer" else ""
        if given:
            digest = _digest(given)
            for key, name in self.keys.items():
                if hmac.compare_digest(digest, key):
                    return f"api:{name}"
        raise ApiError(401, "Incorrect API key provided" if given else
                       "No API key provided (Authorization: Bearer KEY)", code="invalid_api_key")

    def get(self, name: str):
        """The Kernel that is process `name`, connected on first use. Raises
        KernelNotRunning / SyscallError when no kernel answers."""
        with self._lock:
            k = self._kernels.get(name)
        if k is not None and k.alive:
            return k
        if k is not None:
            self.dead(name, k)                    # found dead by its heartbeat meanwhile
        from llmos.userland import connect
        k = connect(self.home, name=name)
        with self._lock:
            if name in self._kernels:               # another request made it meanwhile
                other, k = k, self._kernels[name]
                other.close()
            else:
                self._kernels[name] = k
        return k

    def dead(self, name: str, k) -> None:
        """k stopped answering: forget it (the next request connects again)."""
        with self._lock:
            if self._kernels.get(name) is k:
                del self._kernels[name]
        k.close()

    def close(self) -> None:
        with self._lock:
            kernels, self._kernels = list(self._kernels.values()), {}
        for k in kernels:
            k.close()


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()
