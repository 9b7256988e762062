"""Drivers: the hardware behind the kernel. get_driver(name) picks one by name."""
from __future__ import annotations

from .base import Driver
from .cpu import CpuDriver

_DRIVERS: dict[str, type[Driver]] = {"cpu": CpuDriver}


def get_driver(name: str = "cpu") -> Driver:
    """A new driver by name; "auto" is the best available. Unknown names raise ValueError."""
    if name == "auto":
        name = "cpu"
    if name not in _DRIVERS:
        raise ValueError(f"unknown driver {name!r}; known drivers: {', '.join(sorted(_DRIVERS))}")
    return _DRIVERS[name]()


__all__ = ["Driver", "CpuDriver", "get_driver"]
