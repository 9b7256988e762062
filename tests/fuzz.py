"""Hypothesis strategies for attacking the ABI: any msgpack value, request frames, and the
arguments of every syscall derived from its spec (syscalls/specs.py).

`valid(arg)` draws values an argument type must accept; `invalid(arg)` draws
(value, code, where) for values it must refuse with `code`, naming the argument with
`where` appended ("[2]", " key", "[0].role"); `call_args(spec)` draws a whole argument
map and the error it must give (None: it must parse). `within(arg, value)` is the
independent check that a parsed value respects its declared limits.

A new syscall is fuzzed by iterating SPECS; a new argument type fails here loudly
(NotImplementedError) until it has strategies.
"""
from __future__ import annotations

import functools
import json
import math

import msgpack
from hypothesis import settings
from hypothesis import strategies as st

from llmos.syscalls import wire
from llmos.syscalls.args import (UNLIMITED, Bool, Bytes, Dict, Fields, Float, Int, Limit, List,
                                 Signal, Spec, Str)
from llmos.syscalls.chat import Json, Messages, ToolCall, Tools
from llmos.syscalls.errors import E2BIG, EINVAL

# Reproducible in CI: a fixed sequence of examples, no example database, no deadline (a
# loaded 2-core box is slow, and a few values are deliberately huge: a 4M-character
# prompt, 2**20 + 1 token ids); each test sets its own number of examples.
FUZZ = settings(derandomize=True, database=None, deadline=None, print_blob=False)

MSGPACK_INT = (-(1 << 63), (1 << 64) - 1)      # what the wire can carry
HUGE_INTS = [1 << 64, -(1 << 63) - 1, 10 ** 400, -(10 ** 400)]   # only in-process callers
FLOAT_EDGES = [0.0, -0.0, 5e-324, -5e-324, 1e-300, 1e-45, 1e-9, 1e-6, 1e-5, 0.5,
               1.0 - 2 ** -53, 1.0, 1.0 + 2 ** -52, 100.0, 1e5, 1e9, 1e308, -1.0, -1e308,
               math.inf, -math.inf, math.nan]
INT_EDGES = [0, 1, -1, 2, (1 << 31) - 1, 1 << 31, -(1 << 31), (1 << 63) - 1, -(1 << 63),
             (1 << 64) - 1]
TEXT = st.text(max_size=24)
WEIRD_TEXT = st.sampled_from(["", " ", "\0", "\n", "\ufffd", "\u202e", "é", "ß", "ſigkill",
                              "\U0001F600", "\r\n" * 3, "x" * 300,
                              "\u0301" * 5, "\U000E0001"]) | TEXT

KEYS = WEIRD_TEXT | st.binary(max_size=4)     # map keys msgpack carries (strict_map_key)
scalars = (st.none() | st.booleans() | st.integers(*MSGPACK_INT) | st.sampled_from(INT_EDGES)
           | st.floats() | st.sampled_from(FLOAT_EDGES) | WEIRD_TEXT | st.binary(max_size=24))
junk = st.recursive(scalars, lambda kids: st.lists(kids, max_size=4)
                    | st.dictionaries(TEXT | st.binary(max_size=4), kids, max_size=4),
                    max_leaves=6)
"""Any value msgpack carries (ext types aside): what a peer may put anywhere."""

json_data = st.recursive(
    st.none() | st.booleans() | st.integers(*MSGPACK_INT) | WEIRD_TEXT
    | st.floats(allow_nan=False, allow_infinity=False),
    lambda kids: st.lists(kids, max_size=3) | st.dictionaries(TEXT, kids, max_size=3),
    max_leaves=8)
"""Plain JSON data (what syscalls/chat.py Json takes, depth and size aside)."""


def json_depth(v) -> int:
    """Maps and lists v is made of, nested: 0 for a scalar."""
    if isinstance(v, dict):
        return 1 + max(map(json_depth, v.values()), default=0)
    if isinstance(v, (list, tuple)):
        return 1 + max(map(json_depth, v), default=0)
    return 0


def _accepts_type(arg, v) -> bool:
    """Whether v is of a type `arg` takes at all (so another type must give EINVAL)."""
    if isinstance(arg, Float):
        return isinstance(v, (int, float)) and not isinstance(v, bool)
    if isinstance(arg, (Int, Signal)) and isinstance(v, int):
        return not isinstance(v, bool)
    if isinstance(arg, Limit):
        return v == UNLIMITED or _accepts_type(arg.of, v)
    if isinstance(arg, Json) and arg.objects is None:
        return not isinstance(v, (bytes, float)) or math.isfinite(v)
    types = {Int: (), Str: (str,), Bool: (bool,), Bytes: (bytes,), List: (list, tuple),
             Dict: (dict,), Fields: (dict,), Messages: (list, tuple), Signal: (str,),
             Json: (list, tuple), Tools: (list, tuple)}
    return isinstance(v, types[type(arg)])


@functools.cache
def wrong_type(arg):
    return junk.filter(lambda v: v is not None and not _accepts_type(arg, v))


def _chars(n: int) -> st.SearchStrategy:
    """Strings of exactly n characters; ASCII when n is large, so that the frame stays
    under the wire's limits and the spec, not the decoder, judges it."""
    chars = ["x"] if n > 4096 else ["x", "é", "\U0001F600"]
    return st.sampled_from(chars).map(lambda c: c * n)


def rarely(common: st.SearchStrategy, rare: st.SearchStrategy) -> st.SearchStrategy:
    """common, or one time in eight rare (a value that is costly to make and to send)."""
    return st.integers(0, 7).flatmap(lambda n: rare if n == 0 else common)


def _in_float(arg: Float, v: float) -> bool:
    if not math.isfinite(v):
        return False
    lo, hi = arg.min, arg.max
    if lo is not None and (v < lo or arg.min_open and v == lo):
        return False
    return not (hi is not None and (v > hi or arg.max_open and v == hi))


def _in_int(arg: Int, v: int) -> bool:
    return (arg.min is None or v >= arg.min) and (arg.max is None or v <= arg.max)


# ---- valid values ----------------------------------------------------------------------------

@functools.cache       # a strategy is built once per argument: hypothesis validates each new one
def valid(arg) -> st.SearchStrategy:
    """Values `arg` must accept."""
    if isinstance(arg, Int):
        lo = MSGPACK_INT[0] if arg.min is None else arg.min
        hi = (1 << 63) - 1 if arg.max is None else arg.max
        edges = [v for v in INT_EDGES + [lo, hi, lo + 1, hi - 1] if lo <= v <= hi]
        return st.integers(lo, hi) | st.sampled_from(edges)
    if isinstance(arg, Float):
        edges = [v for v in FLOAT_EDGES if _in_float(arg, v)]
        ints = [v for v in INT_EDGES if _in_float(arg, float(v))]
        return (st.floats(arg.min, arg.max, allow_nan=False, allow_infinity=False,
                          exclude_min=arg.min_open, exclude_max=arg.max_open)
                | st.sampled_from(edges) | st.sampled_from(ints or [edges[0]]))
    if isinstance(arg, Str):
        if arg.choices:
            return st.sampled_from(arg.choices)
        return rarely(st.text(min_size=arg.min_len, max_size=min(arg.max_len, 32))
                      | WEIRD_TEXT.filter(lambda s: arg.min_len <= len(s) <= arg.max_len)
                      | _chars(max(arg.min_len, 1)), _chars(arg.max_len))
    if isinstance(arg, Bool):
        return st.booleans()
    if isinstance(arg, Bytes):
        return st.binary(max_size=min(arg.max_len, 32)) | st.just(b"\xff" * arg.max_len)
    if isinstance(arg, List):
        small = st.lists(valid(arg.of), min_size=arg.min_len, max_size=min(arg.max_len, 6))
        return rarely(small, valid(arg.of).map(lambda v: [v] * arg.max_len))
    if isinstance(arg, Dict):
        keys = st.text(min_size=1, max_size=min(arg.key.max_len, 16)) | _chars(arg.key.max_len)
        return st.dictionaries(keys, valid(arg.of), max_size=min(arg.max_len, 4))
    if isinstance(arg, Fields):
        return st.fixed_dictionaries({}, optional={k: valid(a) for k, a in arg.fields.items()})
    if isinstance(arg, Limit):
        return valid(arg.of) | st.just(UNLIMITED)
    if isinstance(arg, Messages):
        msg = st.fixed_dictionaries({"role": valid(arg.role), "content": valid(arg.content)})
        msg |= _tool_messages(arg)
        one = {"role": arg.ROLES[0], "content": ""}
        return rarely(st.lists(msg, min_size=1, max_size=min(arg.max_len, 4)),
                      st.just([one] * arg.max_len))
    if isinstance(arg, Tools):
        params = st.dictionaries(TEXT, json_data.filter(lambda v: json_depth(v) < 12), max_size=3)
        fn = st.fixed_dictionaries({"name": TEXT.filter(bool)},
                                   optional={"description": TEXT, "parameters": params})
        tool = st.fixed_dictionaries({"function": fn}, optional={"type": st.just("function")})
        one = {"type": "function", "function": {"name": "f"}}
        return rarely(st.lists(tool, max_size=min(arg.objects, 4)),
                      st.just([one] * arg.objects))
    if isinstance(arg, Json):
        data = json_data.filter(lambda v: json_depth(v) < arg.max_depth)
        if arg.objects is None:
            return data
        maps = st.dictionaries(TEXT, data, max_size=3)
        full = [{"d": "x" * (arg.max_bytes - len('[{"d":""}]'))}]     # max_bytes exactly
        return rarely(st.lists(maps, max_size=min(arg.objects, 4)),
                      st.sampled_from([[{}] * arg.objects, full]))
    if isinstance(arg, Signal):
        names = st.sampled_from(arg.names)
        return (names | names.map(lambda n: "SIG" + n) | names.map(str.lower)
                | names.map(lambda n: "sig" + n.capitalize())
                | st.sampled_from(sorted(arg.by_number)))
    raise NotImplementedError(f"no strategy for argument type {type(arg).__name__}: add one")


# ---- invalid values: (value, code, where) ----------------------------------------------------

def _bad(values, code=EINVAL, where="") -> st.SearchStrategy:
    return values.map(lambda v: (v, code, where))


@functools.cache
def invalid(arg) -> st.SearchStrategy:
    """(value, code, where): values `arg` must refuse with `code`, naming the argument + where."""
    if isinstance(arg, Limit):          # a number's errors, and any other word
        return invalid(arg.of).filter(lambda bad: bad[0] != UNLIMITED)
    options = [_bad(wrong_type(arg))]
    if isinstance(arg, Int):
        lo, hi = arg.min, arg.max
        if lo is not None and lo > MSGPACK_INT[0]:
            options += [_bad(st.integers(MSGPACK_INT[0], lo - 1) | st.just(lo - 1))]
        if hi is not None and hi < MSGPACK_INT[1]:
            options += [_bad(st.integers(hi + 1, MSGPACK_INT[1]) | st.just(hi + 1))]
    elif isinstance(arg, Float):
        outside = [v for v in FLOAT_EDGES if not _in_float(arg, v)]
        outside += [float(b) for b in (arg.min, arg.max) if b is not None
                    and not _in_float(arg, float(b))]
        options += [_bad(st.sampled_from(outside)),
                    _bad(st.floats().filter(lambda v: not _in_float(arg, v)))]
        ints = [v for v in INT_EDGES if not _in_float(arg, float(v))]
        if ints:
            options += [_bad(st.sampled_from(ints))]
    elif isinstance(arg, Str):
        options += [_bad(_chars(arg.max_len + 1) | _chars(arg.max_len + 2), E2BIG)]
        if arg.min_len:
            options += [_bad(st.text(max_size=arg.min_len - 1))]
        if arg.choices:
            options += [_bad(st.text(min_size=arg.min_len, max_size=arg.max_len).filter(
                lambda s: s not in arg.choices))]
    elif isinstance(arg, Bytes):
        options += [_bad(st.just(b"\0" * (arg.max_len + 1)), E2BIG)]
    elif isinstance(arg, List):
        options += [_bad_item(arg)]
        if arg.min_len:
            options += [_bad(st.lists(valid(arg.of), max_size=arg.min_len - 1))]
        too_long = _bad(valid(arg.of).map(lambda v: [v] * (arg.max_len + 1)), E2BIG)
        if arg.max_len > 4096:          # a million token ids: costly to make, send and check
            return rarely(st.one_of(options), too_long)
        options += [too_long]
    elif isinstance(arg, Dict):
        too_many = valid(arg.of).map(lambda v: {f"k{i}": v for i in range(arg.max_len + 1)})
        options += [_bad(too_many, E2BIG), _bad_entry(arg)]
    elif isinstance(arg, Fields):
        options += [_bad_field(arg)]
    elif isinstance(arg, Messages):
        one = {"role": "user", "content": "hi"}
        options += [_bad(st.just([])), _bad(st.just([one] * (arg.max_len + 1)), E2BIG),
                    _bad_message(arg)]
    elif isinstance(arg, Json):
        options += [_bad_json(arg)]
    elif isinstance(arg, Signal):
        other_name = WEIRD_TEXT.filter(lambda s: s.upper().removeprefix("SIG") not in arg.names)
        options += [_bad(st.integers(*MSGPACK_INT).filter(lambda n: n not in arg.by_number)),
                    _bad(other_name)]
    elif not isinstance(arg, Bool):
        raise NotImplementedError(f"no strategy for argument type {type(arg).__name__}: add one")
    return st.one_of(options)


@st.composite
def _bad_item(draw, arg: List):
    """A list of valid items but one, at index i: that item's error, named [i]."""
    room = min(arg.max_len, 5)
    items = draw(st.lists(valid(arg.of), min_size=max(arg.min_len - 1, 0), max_size=room - 1))
    i = draw(st.integers(0, len(items)))
    value, code, where = draw(invalid(arg.of))
    return items[:i] + [value] + items[i:], code, f"[{i}]{where}"


@st.composite
def _bad_entry(draw, arg: Dict):
    """A map whose one entry has a bad key (" key") or a bad value ("['k']")."""
    good = draw(st.dictionaries(st.text(min_size=1, max_size=8), valid(arg.of),
                                max_size=min(arg.max_len - 1, 3)))
    if draw(st.booleans()):
        key, code = draw(st.sampled_from([("", EINVAL), (b"k", EINVAL),
                                          ("k" * (arg.key.max_len + 1), E2BIG)]))
        return {**good, key: draw(valid(arg.of))}, code, " key"
    key = draw(st.text(min_size=1, max_size=8))
    while key in good:
        key += "x"
    value, code, where = draw(invalid(arg.of))
    return {**good, key: value}, code, f"[{key!r}]{where}"


@st.composite
def _bad_field(draw, arg: Fields):
    """A map of valid fields but one: an unknown key (".key") or a bad value (".name...")."""
    good = draw(valid(arg))
    if draw(st.booleans()):
        key = draw(KEYS.filter(lambda k: k not in arg.fields))
        return {**good, key: draw(junk)}, EINVAL, f".{key}"
    key = draw(st.sampled_from(sorted(arg.fields)))
    value, code, where = draw(invalid(arg.fields[key]))
    return {**good, key: value}, code, f".{key}{where}"


_NOT_A_MAP = junk.filter(lambda v: v is not None and not isinstance(v, dict))
_OTHER_KEYS = KEYS.filter(lambda k: k not in ("role", "content"))


@st.composite
def _bad_message(draw, arg: Messages):
    """Messages of which one is bad: not a map, an unknown or missing field, a bad role or
    a bad content."""
    msg = st.fixed_dictionaries({"role": valid(arg.role), "content": st.text(max_size=8)})
    msgs = draw(st.lists(msg, max_size=3))
    i = draw(st.integers(0, len(msgs)))
    how = draw(st.sampled_from(["type", "unknown", "missing", "role", "content"]))
    m = {"role": "user", "content": "hi"}
    if how == "type":
        m, code, where = draw(_NOT_A_MAP), EINVAL, ""
    elif how == "unknown":
        key = draw(_OTHER_KEYS)
        m, code, where = {**m, key: draw(junk)}, EINVAL, f".{key}"
    elif how == "missing":
        key = draw(st.sampled_from(["role", "content"]))
        m, code, where = {k: v for k, v in m.items() if k != key}, EINVAL, f".{key}"
    else:
        value, code, sub = draw(invalid(arg.role if how == "role" else arg.content))
        m, where = {**m, how: value}, f".{how}{sub}"
    return msgs[:i] + [m] + msgs[i:], code, f"[{i}]{where}"


def _tool_messages(arg: Messages) -> st.SearchStrategy:
    """An assistant's tool calls (its content nil, absent or text) and a tool's reply."""
    call = st.fixed_dictionaries(
        {"id": st.text(max_size=8), "function": st.fixed_dictionaries(
            {"name": st.text(min_size=1, max_size=8), "arguments": st.text(max_size=16)})},
        optional={"type": st.just("function")})
    calls = st.fixed_dictionaries({"role": st.just("assistant"),
                                   "tool_calls": st.lists(call, min_size=1, max_size=2)},
                                  optional={"content": st.none() | st.text(max_size=8)})
    reply = st.fixed_dictionaries({"role": st.just("tool"), "content": st.text(max_size=8)},
                                  optional={"tool_call_id": st.text(max_size=8),
                                            "name": st.text(max_size=8)})
    return calls | reply


def _nested(depth: int) -> dict:
    """Maps nested depth deep, each under the key "a"."""
    v: dict = {}
    for _ in range(depth - 1):
        v = {"a": v}
    return v


@st.composite
def _bad_json(draw, arg: Json):
    """A value that is JSON but for one part (a leaf, a key, an item, its depth), or is
    too big: the error and where it is. Lists of maps (arg.objects) only."""
    if arg.objects is None:
        raise NotImplementedError("no strategy for Json of any value: add one")
    how = draw(st.sampled_from(["many", "item", "leaf", "key", "deep", "big"]))
    if how == "many":
        return [{}] * (arg.objects + 1), E2BIG, ""
    if how == "item":
        return [{}, draw(json_data.filter(lambda v: not isinstance(v, dict)))], EINVAL, "[1]"
    if how == "leaf":
        return [{"k": draw(st.binary(max_size=4) | st.sampled_from([math.nan, math.inf]))}], \
            EINVAL, "[0]['k']"
    if how == "key":
        return [{b"k": 1}], EINVAL, "[0] key"
    if how == "deep":            # the list is the first level: its map the second
        return [_nested(arg.max_depth)], EINVAL, "[0]" + "['a']" * (arg.max_depth - 1)
    return [{"d": "x" * arg.max_bytes}], E2BIG, ""


# ---- whole argument maps ---------------------------------------------------------------------

@functools.cache
def _unknown_keys(spec: Spec) -> st.SearchStrategy:
    return KEYS.filter(lambda k: k not in spec.fields)


@st.composite
def call_args(draw, spec: Spec, narrow: dict | None = None, must_fail=False):
    """(args, expected): an argument map for `spec` and the error it must give, as
    (code, start of the message), or None if it must parse. `narrow` maps argument
    names to strategies of valid values to use instead of the spec's (a real kernel
    cannot run a million-token generate in a test); `must_fail` draws only bad maps."""
    narrow = narrow or {}
    grouped = {n for g in spec.one_of + spec.at_most_one for n in g}
    args = {}

    def give(name):
        args[name] = draw(narrow[name] if name in narrow else valid(spec.fields[name]))
    for name, arg in spec.fields.items():
        if arg.required or name not in grouped and draw(st.booleans()):
            give(name)
        elif name not in grouped and draw(st.integers(0, 9)) == 0:
            args[name] = None                       # None is absent
    for group in spec.one_of:
        give(draw(st.sampled_from(group)))
    for group in spec.at_most_one:
        if draw(st.booleans()):
            give(draw(st.sampled_from(group)))
    kinds = ["unknown"] + ["none"] * (not must_fail) + ["bad value"] * bool(spec.fields)
    kinds += ["missing"] * any(a.required for a in spec.fields.values())
    kinds += ["group"] * bool(spec.one_of or spec.at_most_one)
    kind = draw(st.sampled_from(kinds))
    if kind == "none":
        return args, None
    if kind == "bad value":
        name = draw(st.sampled_from(sorted(spec.fields)))
        args[name], code, where = draw(invalid(spec.fields[name]))
        return args, (code, f"argument '{name}{where}'")
    if kind == "unknown":
        key = draw(_unknown_keys(spec))
        args[key] = draw(junk)
        return args, (EINVAL, f"unknown argument '{key}'")
    if kind == "missing":
        name = draw(st.sampled_from(sorted(n for n, a in spec.fields.items() if a.required)))
        if draw(st.booleans()):
            del args[name]
        else:
            args[name] = None
        return args, (EINVAL, f"missing argument '{name}'")
    group, exactly = draw(st.sampled_from([(g, True) for g in spec.one_of]
                                          + [(g, False) for g in spec.at_most_one]))
    given = [n for n in group if args.get(n) is not None]
    if exactly and draw(st.booleans()):
        for n in given:
            del args[n]
    else:
        for n in draw(st.lists(st.sampled_from(group), min_size=2, unique=True)):
            if args.get(n) is None:
                give(n)
    rule = "exactly one of {} is required" if exactly else "at most one of {} is allowed"
    return args, (EINVAL, rule.format(", ".join(group)))


def junk_args(spec: Spec) -> st.SearchStrategy:
    """Argument maps of anything: the spec's names and others, any values (good, bad, junk)."""
    names = sorted(spec.fields)
    keys = (st.sampled_from(names) if names else st.nothing()) | WEIRD_TEXT | st.binary(max_size=4)
    values = junk | st.one_of([valid(a) for a in spec.fields.values()] or [junk]) \
        | st.one_of([invalid(a).map(lambda t: t[0]) for a in spec.fields.values()] or [junk])
    return st.dictionaries(keys, values, max_size=6)


# ---- the independent check of a parsed value ------------------------------------------------

def within(arg, v) -> bool:
    """Whether v (a parsed value) is of arg's type and inside its declared limits."""
    if isinstance(arg, Int):
        return type(v) is int and _in_int(arg, v)
    if isinstance(arg, Float):
        return type(v) is float and _in_float(arg, v)
    if isinstance(arg, Str):
        return (type(v) is str and arg.min_len <= len(v) <= arg.max_len
                and (not arg.choices or v in arg.choices))
    if isinstance(arg, Bool):
        return type(v) is bool
    if isinstance(arg, Bytes):
        return type(v) is bytes and len(v) <= arg.max_len
    if isinstance(arg, List):
        if not (type(v) is list and arg.min_len <= len(v) <= arg.max_len):
            return False
        if isinstance(arg.of, Int) and v and set(map(type, v)) == {int}:   # token ids: fast
            return _in_int(arg.of, min(v)) and _in_int(arg.of, max(v))
        return all(within(arg.of, x) for x in v)
    if isinstance(arg, Dict):
        return (type(v) is dict and len(v) <= arg.max_len
                and all(within(arg.key, k) and within(arg.of, x) for k, x in v.items()))
    if isinstance(arg, Fields):
        return type(v) is dict and all(k in arg.fields and within(arg.fields[k], x)
                                       for k, x in v.items())
    if isinstance(arg, Limit):
        return v == UNLIMITED or within(arg.of, v)
    if isinstance(arg, Messages):
        return (type(v) is list and 1 <= len(v) <= arg.max_len
                and all(_message_within(arg, m) for m in v))
    if isinstance(arg, ToolCall):
        fn = v.get("function") if type(v) is dict else None
        return (type(fn) is dict and set(v) <= {"id", "type", "function"}
                and set(fn) == {"name", "arguments"} and within(arg.id, v.get("id"))
                and ("type" not in v or within(arg.type, v["type"]))
                and within(arg.name, fn["name"]) and within(arg.arguments, fn["arguments"]))
    if isinstance(arg, Json):
        size = len(json.dumps(v, ensure_ascii=False, separators=(",", ":")).encode())
        shape = arg.objects is None or (type(v) is list and len(v) <= arg.objects
                                        and all(type(x) is dict for x in v))
        if isinstance(arg, Tools):
            shape = shape and all(_tool_within(t) for t in v)
        return shape and _json_within(v) and json_depth(v) <= arg.max_depth \
            and size <= arg.max_bytes
    if isinstance(arg, Signal):
        return v in arg.names
    raise NotImplementedError(f"no check for argument type {type(arg).__name__}: add one")


def _tool_within(t: dict) -> bool:
    """t is a tool as syscalls/chat.py Tools takes one."""
    fn = t.get("function")
    return (set(t) <= {"type", "function"} and t.get("type", "function") == "function"
            and type(fn) is dict and set(fn) <= {"name", "description", "parameters", "strict"}
            and type(fn.get("name")) is str and fn["name"] != ""
            and type(fn.get("description", "")) is str and type(fn.get("parameters", {})) is dict)


def _message_within(arg: Messages, m) -> bool:
    if type(m) is not dict or not within(arg.role, m.get("role")):
        return False
    keys = {"role", "content", *arg.EXTRA.get(m["role"], ())}
    calls = m.get("tool_calls")
    content_ok = within(arg.content, m["content"]) if "content" in m and (
        m["content"] is not None or not calls) else bool(calls)
    return (set(m) <= keys and content_ok
            and (calls is None or within(arg.tool_calls, calls))
            and all(within(arg.ident, m[k]) for k in ("tool_call_id", "name") if k in m))


def _json_within(v) -> bool:
    """v is made of dicts with str keys, lists, str, int, finite float, bool and None."""
    if v is None or type(v) in (bool, int, str):
        return True
    if type(v) is float:
        return math.isfinite(v)
    if type(v) is list:
        return all(map(_json_within, v))
    return type(v) is dict and all(type(k) is str and _json_within(x) for k, x in v.items())


def parsed_within(spec: Spec, out: dict) -> bool:
    """A validated map: every declared name present, each absent (None/default) or within limits."""
    return set(out) == set(spec.fields) and all(
        out[n] is None or within(a, out[n]) for n, a in spec.fields.items())


# ---- request frames --------------------------------------------------------------------------

ext = st.builds(msgpack.ExtType, st.integers(0, 127), st.binary(max_size=8)) \
    | st.builds(msgpack.Timestamp, st.integers(0, 1 << 33), st.integers(0, 999_999_999))
wire_values = st.recursive(scalars | ext, lambda kids: st.lists(kids, max_size=4)
                           | st.dictionaries(TEXT | st.binary(max_size=4), kids, max_size=4),
                           max_leaves=12)
"""Any msgpack value, ext types included (which the kernel refuses)."""

_header_values = {"v": st.just(1) | wire_values, "id": st.integers(0, wire.MAX_ID) | wire_values,
                  "nr": st.integers(-1, 40) | wire_values,
                  "a": st.dictionaries(TEXT, wire_values, max_size=4) | wire_values}


@st.composite
def headers(draw):
    """Request headers that are right but for some fields: each kept, dropped or replaced."""
    h = {}
    for key, values in _header_values.items():
        how = draw(st.sampled_from(["keep", "keep", "drop", "junk"]))
        if how == "keep":
            h[key] = {"v": 1, "id": 7, "nr": 0, "a": {}}[key]
        elif how == "junk":
            h[key] = draw(values)
    if draw(st.integers(0, 7)) == 0:
        h[draw(TEXT | st.binary(max_size=4) | st.integers(0, 9))] = draw(wire_values)
    return h


def _pack(obj) -> bytes:
    return msgpack.packb(obj, use_bin_type=True, strict_types=False)


def _nest(depth: int, kind: str) -> bytes:
    """depth nested one-element arrays or maps around 0: deeper than any decoder stack."""
    return (b"\x91" * depth if kind == "array" else b"\x81\xa1k" * depth) + b"\x00"


def _damage(frame: bytes, writes) -> bytes:
    """frame with some bytes overwritten: (position, byte) pairs."""
    b = bytearray(frame)
    for pos, byte in writes:
        if b:
            b[pos % len(b)] = byte
    return bytes(b)


frames = st.one_of(
    st.binary(max_size=64),
    headers().map(_pack),
    st.builds(_pack, wire_values),
    st.builds(_nest, st.integers(1, 5000), st.sampled_from(["array", "map"])),
    st.builds(_damage, headers().map(_pack),
              st.lists(st.tuples(st.integers(0, 1 << 16), st.integers(0, 255)), min_size=1,
                       max_size=4)),
    headers().map(_pack).flatmap(lambda f: st.integers(0, len(f)).map(lambda n: f[:n])),
    # a string, a binary or an array announced longer than what follows (or than allowed)
    st.sampled_from([b"\xdb\xff\xff\xff\xff", b"\xc6\xff\xff\xff\xff", b"\xdd\xff\xff\xff\xff",
                     b"\xdf\xff\xff\xff\xff", b"\xc9\x7f\xff\xff\xff\x05"]),
)
"""Single request frames: junk bytes, wrong headers, junk maps, deep nesting, damage."""
