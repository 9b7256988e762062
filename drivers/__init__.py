"""Drivers: the hardware behind the kernel. get_driver(name) picks one by name ("auto": the
best available); every driver comes from the entry-point group `llmos.drivers`."""
from __future__ import annotations

from .base import Capabilities, Driver, KVCache, LinearWeight, OutOfDeviceMemory
from .cpu import CpuDriver
from .registry import (DriverInfo, DriverRefused, Registry, check_driver, get_driver,
                       list_drivers, load_errors, register, reload, unregister)

__all__ = ["Driver", "LinearWeight", "CpuDriver", "Capabilities", "KVCache", "OutOfDeviceMemory",
           "DriverInfo", "DriverRefused", "Registry", "check_driver", "get_driver",
           "list_drivers", "load_errors", "register", "reload", "unregister"]
