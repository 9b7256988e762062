"""The driver table: every driver comes from the entry-point group `llmos.drivers`.

The built-in `cpu` and `cuda` are declared in llmos's own pyproject.toml and load through
the same path as a third-party package's driver. A driver is checked when it registers
(check_driver): a class that would fail at its first KV op is refused then, with an error
naming what it lacks. A plugin that fails to import or is refused is kept in the load
errors and skipped; the others load regardless. LLMOS_DRIVERS="cpu,sim" loads only those.
Tests register drivers in-process with register().
"""
from __future__ import annotations

import inspect
import os
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points
from typing import Iterable

from .base import Driver

GROUP = "llmos.drivers"
ONLY_ENV = "LLMOS_DRIVERS"  # comma-separated names: load only these entry points
# What the kernel calls; a Driver subclass inherits defaults for all but the abstract ones.
REQUIRED_OPS = ("is_available", "memory_info", "allocate_kv_cache", "store_kv",
                "paged_attention", "copy_blocks", "allocate_swap", "swap_out", "swap_in")


class DriverRefused(TypeError):
    """A driver class that does not implement the Driver interface; says what is missing."""


@dataclass(frozen=True)
class DriverInfo:
    """One row of `llmos drivers`. memory is (free, total) bytes, known when available."""
    name: str
    available: bool
    reason: str | None = None       # why not available, or the load error
    device: str | None = None
    memory: tuple[int, int] | None = None
    priority: int = 0
    load_error: bool = False        # True: the plugin failed to import or was refused


def check_driver(cls, name: str | None = None) -> None:
    """Raise DriverRefused naming everything cls lacks to be the driver called name."""
    if not (inspect.isclass(cls) and issubclass(cls, Driver)):
        raise DriverRefused(f"{cls!r} is not a subclass of llmos.drivers.Driver")
    missing = sorted(getattr(cls, "__abstractmethods__", ()))
    missing += [op for op in REQUIRED_OPS
                if op not in missing and not callable(getattr(cls, op, None))]
    missing += [attr for attr in ("name", "device") if not hasattr(cls, attr)]
    if missing:
        raise DriverRefused(f"driver class {cls.__module__}.{cls.__qualname__} is missing: "
                            f"{', '.join(missing)}")
    if not isinstance(cls.name, str) or not cls.name:
        raise DriverRefused(f"{cls.__qualname__}.name must be a non-empty string")
    if name is not None and cls.name != name:
        raise DriverRefused(f"entry point {name!r} loads a driver named {cls.name!r}; "
                            f"the two must agree")


class Registry:
    """Driver classes by name, and the plugins that failed to load (name -> error text)."""

    def __init__(self):
        self.drivers: dict[str, type[Driver]] = {}
        self.errors: dict[str, str] = {}

    def register(self, cls: type[Driver]) -> type[Driver]:
        """Add a driver class under cls.name; raise DriverRefused if it is incomplete, or
        ValueError if another class already holds the name. Returns cls (a decorator)."""
        check_driver(cls)
        held = self.drivers.get(cls.name)
        if held is not None and held is not cls:
            raise ValueError(f"driver {cls.name!r} is already registered by "
                             f"{held.__module__}.{held.__qualname__}")
        self.drivers[cls.name] = cls
        self.errors.pop(cls.name, None)
        return cls

    def load(self, eps: Iterable[EntryPoint], only: Iterable[str] | None = None) -> None:
        """Register each entry point (those named in only, if given); record any failure."""
        only = None if only is None else set(only)
        seen = set()
        for ep in eps:
            if only is not None and ep.name not in only:
                continue
            seen.add(ep.name)
            try:
                cls = ep.load()
                check_driver(cls, ep.name)
                self.register(cls)
            except Exception as e:  # a broken plugin must not take the others down
                self.errors[ep.name] = f"{ep.value}: {type(e).__name__}: {e}"
        for name in sorted((only or set()) - seen):
            self.errors[name] = f"{ONLY_ENV} names {name!r} but no installed package provides it"

    def get(self, name: str, **options) -> Driver:
        """A new instance of the driver called name ("auto": the best available), built with
        options. Raises ValueError for an unknown, broken or unavailable driver."""
        if name == "auto":
            name = self.auto()
        if name not in self.drivers and name in self.errors:
            raise ValueError(f"driver {name!r} failed to load: {self.errors[name]}")
        if name not in self.drivers:
            known = ", ".join(sorted(self.drivers)) or \
                f"none (no entry points in {GROUP!r}: is llmos installed?)"
            raise ValueError(f"unknown driver {name!r}; known drivers: {known}")
        cls = self.drivers[name]
        if not cls.is_available():
            raise ValueError(f"driver {name!r} is not available: {cls.unavailable_reason()}")
        return cls(**options)

    def auto(self) -> str:
        """The name "auto" picks: cuda if available, else the available plugin of highest
        priority (none negative), else cpu. Raises ValueError when none is available."""
        ok = [cls for cls in self.drivers.values() if _available(cls)[0]]
        names = {cls.name for cls in ok}
        if "cuda" in names:
            return "cuda"
        plugins = [c for c in ok if c.name != "cpu" and c.priority >= 0]
        if plugins:
            return max(plugins, key=lambda c: (c.priority, c.name)).name
        if "cpu" in names:
            return "cpu"
        raise ValueError(f"no driver is available for 'auto' (registered: "
                         f"{', '.join(sorted(self.drivers)) or 'none'})")

    def info(self) -> list[DriverInfo]:
        """A DriverInfo per registered driver and per load error, sorted by name."""
        rows = [_describe(cls) for cls in self.drivers.values()]
        rows += [DriverInfo(name, False, err, load_error=True) for name, err in self.errors.items()]
        return sorted(rows, key=lambda r: r.name)


def _available(cls) -> tuple[bool, str | None]:
    """(available, reason if not); an is_available that raises counts as unavailable."""
    try:
        if cls.is_available():
            return True, None
        return False, cls.unavailable_reason() or "not available"
    except Exception as e:
        return False, f"{type(e).__name__}: {e}"


def _describe(cls) -> DriverInfo:
    ok, reason = _available(cls)
    device, memory = str(getattr(cls, "device", "")) or None, None
    if ok:
        try:
            drv = cls()
            device, memory = str(drv.device), tuple(drv.memory_info())
        except Exception as e:
            ok, reason = False, f"failed to start: {type(e).__name__}: {e}"
    return DriverInfo(cls.name, ok, reason, device, memory, cls.priority)


_registry: Registry | None = None


def current() -> Registry:
    """The process's driver table, loaded from the entry points on first use."""
    global _registry
    if _registry is None:
        _registry = Registry()
        only = [n.strip() for n in os.environ.get(ONLY_ENV, "").split(",") if n.strip()]
        _registry.load(entry_points(group=GROUP), only or None)
    return _registry


def reload() -> Registry:
    """Forget the table, in-process registrations included, and read the entry points and
    LLMOS_DRIVERS again."""
    global _registry
    _registry = None
    return current()


def register(cls: type[Driver]) -> type[Driver]:
    """Register a driver class in-process (tests, notebooks); see Registry.register."""
    return current().register(cls)


def unregister(name: str) -> None:
    """Drop the driver called name (tests undo their register() with this)."""
    current().drivers.pop(name, None)
    current().errors.pop(name, None)


def get_driver(name: str = "cpu", **options) -> Driver:
    """A new driver by name; "auto" is the best available. Raises ValueError when the name
    is unknown, its plugin failed to load, or its hardware is not available."""
    return current().get(name, **options)


def list_drivers() -> list[DriverInfo]:
    """Every driver with its availability, device and memory, and every load error."""
    return current().info()


def load_errors() -> dict[str, str]:
    """{entry-point name: error text} for the plugins that failed to import or were refused."""
    return dict(current().errors)
