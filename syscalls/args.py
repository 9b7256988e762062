"""Argument specs: a tiny declarative language for what a syscall accepts.

A Spec maps argument names to types (Int, Float, Str, Bool, Bytes, List, Dict, Fields,
Limit, Signal; chat messages and JSON data: syscalls/chat.py). `Spec.validate(args)`
returns a new dict with every declared argument present (an absent optional one gets its
default, or None) or raises SyscallError:
unknown or missing argument, wrong type or out of range -> EINVAL, too long -> E2BIG;
the message always names the argument ("argv[2]", "messages[0].role"). A value of None
for an optional argument means absent. `describe()` gives the spec as plain data.
"""
from __future__ import annotations

import math
import re
import signal as _signal

from .errors import E2BIG, EINVAL, SyscallError

_MISSING = object()
UNLIMITED = "unlimited"      # the wire's value of a Limit that lifts it (a reply says None)


def _bad(name, msg, code=EINVAL):
    raise SyscallError(code, f"argument '{name}': {msg}")


def _type_of(v) -> str:
    return "nil" if v is None else type(v).__name__


class Arg:
    """Base of every argument type. `required`: must be present; `default`: filled when absent."""
    kind = "any"

    def __init__(self, *, required=False, default=None, doc=""):
        self.required, self.default, self.doc = required, default, doc

    def check(self, name: str, value):
        """Return the (normalized) value or raise SyscallError naming `name`."""
        raise NotImplementedError

    def describe(self) -> dict:
        d = {"type": self.kind, "required": self.required}
        if self.default is not None:
            d["default"] = self.default
        d.update({k: v for k, v in self._limits().items() if v is not None})
        return d

    def _limits(self) -> dict:
        return {}

    def _expect(self, name, value, types, what):
        if not isinstance(value, types) or isinstance(value, bool) and bool not in types:
            _bad(name, f"expected {what}, got {_type_of(value)}")


class Int(Arg):
    kind = "int"

    def __init__(self, min=None, max=None, **kw):
        super().__init__(**kw)
        self.min, self.max = min, max

    def check(self, name, value):
        self._expect(name, value, (int,), "int")
        if self.min is not None and value < self.min:
            _bad(name, f"{value} is below the minimum {self.min}")
        if self.max is not None and value > self.max:
            _bad(name, f"{value} is above the maximum {self.max}")
        return value

    def _limits(self):
        return {"min": self.min, "max": self.max}


class Float(Arg):
    """A finite number (ints accepted, returned as float); min_open/max_open exclude the bound."""
    kind = "float"

    def __init__(self, min=None, max=None, min_open=False, max_open=False, **kw):
        super().__init__(**kw)
        self.min, self.max, self.min_open, self.max_open = min, max, min_open, max_open

    def check(self, name, value):
        self._expect(name, value, (int, float), "float")
        try:
            value = float(value)
        except OverflowError:       # an int past 1e308: only an in-process caller has one
            _bad(name, "expected a finite float, got an int beyond the float range")
        if not math.isfinite(value):
            _bad(name, f"expected a finite float, got {value}")
        lo, hi = self.min, self.max
        if lo is not None and (value < lo or self.min_open and value == lo):
            _bad(name, f"{value} must be {'>' if self.min_open else '>='} {lo}")
        if hi is not None and (value > hi or self.max_open and value == hi):
            _bad(name, f"{value} must be {'<' if self.max_open else '<='} {hi}")
        return value

    def _limits(self):
        return {"min": self.min, "max": self.max,
                "min_open": self.min_open or None, "max_open": self.max_open or None}


class Str(Arg):
    """A string of at most max_len characters (E2BIG past it), optionally one of `choices`."""
    kind = "str"

    def __init__(self, max_len=4096, min_len=0, choices=None, **kw):
        super().__init__(**kw)
        self.max_len, self.min_len = max_len, min_len
        self.choices = tuple(choices) if choices else None

    def check(self, name, value):
        self._expect(name, value, (str,), "str")
        if len(value) > self.max_len:
            _bad(name, f"too long ({len(value)} > {self.max_len} characters)", E2BIG)
        if len(value) < self.min_len:
            _bad(name, f"too short ({len(value)} < {self.min_len} characters)")
        if self.choices and value not in self.choices:
            _bad(name, f"{value!r} is not one of {', '.join(self.choices)}")
        return value

    def _limits(self):
        return {"max_len": self.max_len, "min_len": self.min_len or None,
                "choices": list(self.choices) if self.choices else None}


class Bool(Arg):
    kind = "bool"

    def check(self, name, value):
        if not isinstance(value, bool):
            _bad(name, f"expected bool, got {_type_of(value)}")
        return value


class Bytes(Arg):
    kind = "bytes"

    def __init__(self, max_len=1 << 20, **kw):
        super().__init__(**kw)
        self.max_len = max_len

    def check(self, name, value):
        self._expect(name, value, (bytes,), "bytes")
        if len(value) > self.max_len:
            _bad(name, f"too long ({len(value)} > {self.max_len} bytes)", E2BIG)
        return value

    def _limits(self):
        return {"max_len": self.max_len}


class List(Arg):
    """A list of `of` items, min_len..max_len long (E2BIG past max_len)."""
    kind = "list"

    def __init__(self, of: Arg, max_len=1024, min_len=0, **kw):
        super().__init__(**kw)
        self.of, self.max_len, self.min_len = of, max_len, min_len

    def check(self, name, value):
        self._expect(name, value, (list, tuple), "list")
        if len(value) > self.max_len:
            _bad(name, f"too long ({len(value)} > {self.max_len} items)", E2BIG)
        if len(value) < self.min_len:
            _bad(name, f"needs at least {self.min_len} item(s), got {len(value)}")
        if isinstance(self.of, Int) and value and all(type(v) is int for v in value):
            lo, hi = min(value), max(value)          # fast path for token id lists
            if (self.of.min is None or lo >= self.of.min) and (self.of.max is None or hi <= self.of.max):
                return list(value)
        return [self.of.check(f"{name}[{i}]", v) for i, v in enumerate(value)]

    def _limits(self):
        return {"of": self.of.describe(), "max_len": self.max_len, "min_len": self.min_len or None}


class Dict(Arg):
    """A map of str keys (Str(key_len)) to `of` values, at most max_len entries."""
    kind = "map"

    def __init__(self, of: Arg, max_len=256, key_len=256, **kw):
        super().__init__(**kw)
        self.of, self.max_len, self.key = of, max_len, Str(key_len, min_len=1)

    def check(self, name, value):
        self._expect(name, value, (dict,), "map")
        if len(value) > self.max_len:
            _bad(name, f"too many entries ({len(value)} > {self.max_len})", E2BIG)
        return {self.key.check(f"{name} key", k): self.of.check(f"{name}[{k!r}]", v)
                for k, v in value.items()}

    def _limits(self):
        return {"of": self.of.describe(), "max_len": self.max_len}


class Fields(Arg):
    """A map of some of the named `fields`, each its own Arg: an unknown key is EINVAL
    naming it ("limits.calls"), a None value is absent. Returns the fields given, checked."""
    kind = "fields"

    def __init__(self, fields: dict, **kw):
        super().__init__(**kw)
        self.fields = fields

    def check(self, name, value):
        self._expect(name, value, (dict,), "map")
        out = {}
        for key, v in value.items():
            if key not in self.fields:
                _bad(f"{name}.{key}", f"unknown field (one of {', '.join(self.fields)})")
            if v is not None:
                out[key] = self.fields[key].check(f"{name}.{key}", v)
        return out

    def _limits(self):
        return {"fields": {n: a.describe() for n, a in self.fields.items()}}


class Limit(Arg):
    """A limit: a number that `of` (an Int or a Float) takes, or UNLIMITED (returned as is)."""
    kind = "limit"

    def __init__(self, of: Arg, **kw):
        super().__init__(**kw)
        self.of = of

    def check(self, name, value):
        if isinstance(value, str):
            if value == UNLIMITED:
                return value
            _bad(name, f"expected a number or {UNLIMITED!r}, got {value[:40]!r}")
        return self.of.check(name, value)

    def _limits(self):
        return {"of": self.of.describe(), "unlimited": UNLIMITED}


class Signal(Arg):
    """A signal by name ("TERM", "SIGTERM") or number (15), among `names`; returns the name."""
    kind = "signal"

    def __init__(self, names=("TERM", "KILL", "INT", "STOP", "CONT"), **kw):
        super().__init__(**kw)
        self.names = tuple(names)
        self.by_number = {int(getattr(_signal, "SIG" + n)): n for n in self.names}

    def check(self, name, value):
        if isinstance(value, str):
            n = value.upper().removeprefix("SIG")
            if n in self.names:
                return n
        elif isinstance(value, int) and not isinstance(value, bool):
            if value in self.by_number:
                return self.by_number[value]
        else:
            _bad(name, f"expected a signal name or number, got {_type_of(value)}")
        _bad(name, f"{value!r} is not one of {', '.join(self.names)}")

    def _limits(self):
        return {"choices": list(self.names)}


class Spec:
    """The arguments of one syscall: `fields` by name; `one_of`: groups of which exactly one
    argument must be given (prompt / messages / token_ids); `at_most_one`: groups of which
    at most one may be given."""

    def __init__(self, one_of=(), at_most_one=(), **fields: Arg):
        self.fields = fields
        self.one_of = [tuple(g) for g in one_of]
        self.at_most_one = [tuple(g) for g in at_most_one]

    def validate(self, args: dict) -> dict:
        """Checked copy of args with every declared field present. Raises SyscallError."""
        for name in args:
            if name not in self.fields:
                raise SyscallError(EINVAL, f"unknown argument '{name}'")
        out = {}
        for name, arg in self.fields.items():
            value = args.get(name)
            if value is not None:
                out[name] = arg.check(name, value)
            elif arg.required:
                raise SyscallError(EINVAL, f"missing argument '{name}'")
            else:
                out[name] = arg.default
        for group in self.one_of:
            self._check_group(group, out, exactly=True)
        for group in self.at_most_one:
            self._check_group(group, out, exactly=False)
        return out

    @staticmethod
    def _check_group(group, out, exactly):
        given = [n for n in group if out.get(n) is not None]
        if len(given) > 1 or exactly and not given:
            what = "none" if not given else " and ".join(f"'{n}'" for n in given)
            rule = "exactly one of {} is required" if exactly else "at most one of {} is allowed"
            raise SyscallError(EINVAL, f"{rule.format(', '.join(group))}, got {what}")

    def describe(self) -> dict:
        d = {"args": {n: a.describe() for n, a in self.fields.items()}}
        if self.one_of:
            d["one_of"] = [list(g) for g in self.one_of]
        if self.at_most_one:
            d["at_most_one"] = [list(g) for g in self.at_most_one]
        return d


_UNITS = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def duration(text: str) -> float:
    """Seconds of a duration as people write it ("300", "30s", "5m", "1.5h", "-1": for
    ever, as Ollama's keep_alive). Raises ValueError naming the text."""
    m = re.fullmatch(r"\s*(-?\d+(?:\.\d+)?)\s*([smhd]?)\s*", str(text))
    if not m:
        raise ValueError(f"not a duration: {text!r} (e.g. 30s, 5m, 1h, -1 for ever)")
    return float(m.group(1)) * _UNITS[m.group(2)]
