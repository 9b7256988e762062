"""Addresses: which ones are this machine's own (the kernel's tcp listener and the
gateway both refuse to expose an unauthenticated service beyond it)."""
from __future__ import annotations

import ipaddress


def is_loopback(host: str | None) -> bool:
    """host is "localhost" or a loopback IP address (127.0.0.0/8, ::1, ::ffff:127.x)."""
    if host == "localhost":
        return True
    try:
        ip = ipaddress.ip_address(host or "")
    except ValueError:
        return False                  # "*", an interface name, a host name: not provably local
    mapped = getattr(ip, "ipv4_mapped", None)          # ::ffff:127.0.0.1 (IPv6 only)
    return ip.is_loopback or bool(mapped and mapped.is_loopback)
