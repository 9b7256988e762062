"""Tests that attack the ABI, property-based: any frame through the wire decoder, any
argument map through every syscall's spec, any call through the dispatcher.

Contracts under attack: decode_request returns a WireRequest or raises WireError EPROTO
or E2BIG, bounded (deep nesting is EPROTO, never RecursionError); Spec.validate returns
values inside their declared limits or raises SyscallError EINVAL or E2BIG naming the
argument; SyscallTable.dispatch never raises and answers every call exactly once.
The examples are fixed (tests/fuzz.py FUZZ) so that a CI run is reproducible.
"""
from __future__ import annotations

import msgpack
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from llmos.kernel.syscall import OPEN_BEFORE_HELLO, PENDING, Call, ConnState, SyscallTable
from llmos.syscalls import wire
from llmos.syscalls.errors import CODES, E2BIG, EACCES, EINVAL, EIO, ENOSYS, EPROTO, ESRCH
from llmos.syscalls.errors import SyscallError, WireError
from llmos.syscalls.numbers import Sys
from llmos.syscalls.specs import SPECS
from tests.fuzz import (FUZZ, HUGE_INTS, _nest, call_args, frames, invalid, junk,
                        junk_args, parsed_within, valid, within)

NRS = sorted(SPECS)
ARGS = {nr: call_args(spec) for nr, spec in SPECS.items()}      # built once: hypothesis
JUNK_ARGS = {nr: junk_args(spec) for nr, spec in SPECS.items()}  # validates each new strategy
JUNK_MAP = st.dictionaries(st.text(max_size=8), junk, max_size=4)
by_name = pytest.mark.parametrize("nr", NRS, ids=lambda nr: Sys(nr).name.lower())


# ---- the wire decoder ------------------------------------------------------------------------

@settings(FUZZ, max_examples=120)
@given(frame=frames, rest=st.lists(st.binary(max_size=16), max_size=2),
       max_message=st.sampled_from([wire.MAX_MESSAGE, 4096, 16]))
@example(frame=msgpack.packb({"v": 1, "id": 1, "nr": 0, "a": {"t": msgpack.Timestamp(0, 0)}}),
         rest=[], max_message=wire.MAX_MESSAGE)
def test_any_frame_is_a_request_or_a_wire_error(frame, rest, max_message):
    try:
        req = wire.decode_request([frame, *rest], max_message)
    except WireError as e:
        assert e.code in (EPROTO, E2BIG), e
        assert e.call_id is None or type(e.call_id) is int and 0 <= e.call_id <= wire.MAX_ID
        return
    assert type(req.id) is int and 0 <= req.id <= wire.MAX_ID and type(req.nr) is int
    assert type(req.args) is dict and req.frames == tuple(rest)
    assert len(frame) <= max_message


@pytest.mark.parametrize("kind", ["array", "map"])
@pytest.mark.parametrize("depth", [2_000, 100_000])
def test_deep_nesting_is_eproto_not_a_recursion_error(kind, depth):
    with pytest.raises(WireError) as e:
        wire.decode_request([_nest(depth, kind)])
    assert e.value.code == EPROTO and e.value.call_id is None


@settings(FUZZ, max_examples=40)
@given(frame=frames | st.builds(wire.encode_reply, junk, junk)
       | st.builds(wire.encode_error, junk, junk.map(str), junk.map(str)))
def test_any_reply_frame_is_a_reply_or_a_wire_error(frame):
    """The client's half: a rogue or broken kernel cannot make decode_reply raise anything else."""
    try:
        reply = wire.decode_reply(frame)
    except WireError as e:
        assert e.code in (EPROTO, E2BIG), e
        return
    assert reply.kind in ("ok", "error", "event")


# ---- every syscall's argument spec -----------------------------------------------------------

def over_the_wire(nr: int, args: dict) -> dict | None:
    """args as the kernel receives them: packed by a peer, decoded by the server; None if
    the server refuses the whole message (E2BIG: several huge values together)."""
    try:
        return wire.decode_request([wire.encode_request(1, nr, args)]).args
    except WireError as e:
        assert e.code == E2BIG, e
        return None


def check_parse(spec, args: dict, expected) -> None:
    """validate(args) parses within limits if expected is None, else raises exactly the
    SyscallError (code, start of message) expected."""
    try:
        out = spec.validate(args)
    except SyscallError as e:
        assert type(e) is SyscallError
        assert expected is not None, f"good arguments refused: {e}"
        assert (e.code, e.msg[:len(expected[1])]) == expected, e
    else:
        assert expected is None, f"bad arguments accepted, wanted {expected}"
        assert parsed_within(spec, out), out


def _arguments() -> list:
    """(id, name, arg) of every distinct argument type of every spec ("wait.timeout")."""
    seen = {}
    for nr, spec in SPECS.items():
        for name, arg in spec.fields.items():
            limits = {k: v for k, v in arg.describe().items() if k not in ("required", "default")}
            seen.setdefault(repr(limits), (f"{Sys(nr).name.lower()}.{name}", name, arg))
    return list(seen.values())


ARGUMENTS = _arguments()
VALUES = {key: valid(arg).map(lambda v: (v, None, "")) | invalid(arg) for key, _, arg in ARGUMENTS}


@pytest.mark.parametrize("key, name, arg", ARGUMENTS, ids=[a[0] for a in ARGUMENTS])
@settings(FUZZ, max_examples=20)
@given(data=st.data())
def test_every_argument_takes_its_good_values_and_names_the_bad_ones(key, name, arg, data):
    value, code, where = data.draw(VALUES[key], "value, code, where")
    wired = over_the_wire(0, {name: value})
    if wired is None:                # four 4M-character messages: the wire's limit first
        return
    value = wired[name]
    try:
        out = arg.check(name, value)
    except SyscallError as e:
        assert type(e) is SyscallError
        assert code is not None, f"a good value refused: {e}"
        want = f"argument '{name}{where}'"
        assert (e.code, e.msg[:len(want)]) == (code, want), e
    else:
        assert code is None, f"a bad value accepted, wanted {code} naming {name}{where}"
        assert within(arg, out), out


@by_name
@settings(FUZZ, max_examples=10)
@given(data=st.data())
def test_every_spec_takes_its_good_arguments_and_names_the_bad_one(nr, data):
    args, expected = data.draw(ARGS[nr], "args, expected")
    args = over_the_wire(nr, args)
    if args is not None:
        check_parse(SPECS[nr], args, expected)


def names_an_argument(spec, args: dict, msg: str) -> bool:
    rules = [f"argument '{n}{c}" for n in spec.fields for c in "'[. "]
    rules += [f"unknown argument '{k}'" for k in args]
    rules += [f"missing argument '{n}'" for n in spec.fields]
    rules += ["exactly one of ", "at most one of "]
    return any(msg.startswith(r) for r in rules)


@by_name
@settings(FUZZ, max_examples=6)
@given(data=st.data())
def test_any_argument_map_parses_within_limits_or_is_einval_or_e2big(nr, data):
    spec = SPECS[nr]
    args = over_the_wire(nr, data.draw(JUNK_ARGS[nr], "args"))
    if args is None:
        return
    try:
        out = spec.validate(args)
    except SyscallError as e:
        assert type(e) is SyscallError and e.code in (EINVAL, E2BIG), e
        assert names_an_argument(spec, args, e.msg), e
    else:
        assert parsed_within(spec, out), out


@by_name
def test_ints_no_wire_can_carry_are_refused_in_process(nr):
    """Numbers past msgpack's range reach a spec only from an in-process caller; they are
    EINVAL all the same (Float used to raise OverflowError converting 10**400)."""
    for name, arg in SPECS[nr].fields.items():
        of = getattr(arg, "of", arg)
        if of.kind not in ("int", "float", "signal"):
            continue
        for huge in HUGE_INTS:
            with pytest.raises(SyscallError) as e:
                arg.check(name, huge if of is arg else [huge])
            assert e.value.code == EINVAL and e.value.msg.startswith(f"argument '{name}"), e.value


# ---- the dispatcher --------------------------------------------------------------------------

class Handler:
    """Stands for a sys_* function: records the arguments it got and answers as told."""

    def __init__(self, how: str):
        self.how, self.got = how, []

    def __call__(self, call, args):
        self.got.append(args)
        if self.how == "pending":
            return PENDING
        if self.how == "error":
            raise SyscallError(ESRCH, "no such thing")
        if self.how == "bug":
            raise KeyError("a handler's bug")
        return object() if self.how == "unencodable" else {"ok": 1}


@settings(FUZZ, max_examples=80)
@given(nr=st.sampled_from(NRS) | st.integers(-(1 << 63), (1 << 63) - 1),
       authenticated=st.booleans(), dead=st.integers(0, 7),
       how=st.sampled_from(["result", "pending", "error", "bug", "unencodable"]), data=st.data())
def test_dispatch_answers_every_call_once_and_never_raises(nr, authenticated, dead, how, data):
    if nr in SPECS:
        args, expected = data.draw(ARGS[nr], "args, expected")
    else:
        args, expected = data.draw(JUNK_MAP, "args"), None
    args = over_the_wire(nr, args)
    if args is None:
        return
    table, handler = SyscallTable(), Handler(how)
    for n in NRS:
        if n not in (Sys.PING, Sys.SYSCALLS):        # the table's own stay
            table.register(n, handler)
    if dead == 0:                                    # the caller's process has exited
        table.check_caller = lambda conn: (_ for _ in ()).throw(SyscallError(ESRCH, "gone"))
    told = []

    def on_denied(call, code, msg):                  # the audit log's hook may fail too
        told.append(code)
        if dead == 1:
            raise OSError("audit log: disk full")
    table.on_denied = on_denied
    sent = []
    conn = ConnState(b"fuzz")
    conn.authenticated = authenticated
    call = Call(conn, 9, nr, lambda peer, cid, kind, data: sent.append((kind, data)))
    conn.calls[9] = call

    table.dispatch(call, args)                      # never raises
    if handler.got and how == "pending":
        assert not sent
        call.reply({"late": True})                   # as the engine thread would
    replies = [wire.decode_reply(d) for kind, d in sent if kind == "msg"]
    assert len(replies) == 1 and replies[0].id == 9 and call.done and not conn.calls
    kind, body = replies[0].kind, replies[0].body
    assert kind in ("ok", "error") and (kind == "ok" or body[0] in CODES), replies
    code = body[0] if kind == "error" else None
    assert set(told) <= {code}                       # told only of the answer given
    if nr not in SPECS:
        assert code == ENOSYS and not handler.got
    elif not authenticated and nr not in OPEN_BEFORE_HELLO:
        assert code == EACCES and not handler.got
    elif authenticated and dead == 0:
        assert code == ESRCH and not handler.got
    elif expected is not None:
        assert (code, body[1][:len(expected[1])]) == expected and not handler.got
    elif nr in (Sys.PING, Sys.SYSCALLS):
        assert code is None
    else:
        assert len(handler.got) == 1 and parsed_within(SPECS[nr], handler.got[0])
        assert code == {"result": None, "pending": None, "error": ESRCH, "bug": EIO,
                        "unencodable": EIO}[how]
