"""The syscall table and dispatcher alone, with a list for an outbox: no sockets."""
import logging

import pytest

from llmos.kernel.syscall import PENDING, Call, ConnState, SyscallTable
from llmos.syscalls import Sys, SyscallError, wire


def make_call(nr, authenticated=True, cid=1):
    sent = []
    conn = ConnState(b"peer1")
    conn.authenticated = authenticated
    call = Call(conn, cid, nr, lambda peer, cid, kind, data: sent.append((kind, data)))
    conn.calls[cid] = call
    return call, sent


def replies(sent):
    return [wire.decode_reply(d) if k == "msg" else ("event", d) for k, d in sent]


def test_unknown_and_unimplemented_numbers_are_enosys_with_a_log_line(caplog):
    t = SyscallTable()
    for nr, words in [(99, "no syscall 99"), (Sys.KILL, "kill: not implemented")]:
        call, sent = make_call(nr)
        with caplog.at_level(logging.WARNING, "llmos.syscalls"):
            t.dispatch(call, {})
        assert replies(sent) == [(1, "error", ("ENOSYS", words))]
    assert "peer 7065657231: unknown sys call 99" in caplog.text


def test_auth_gate_then_validation_then_handler():
    t = SyscallTable()
    seen = []
    t.register(Sys.GETPID, lambda call, args: seen.append(args) or 7)
    call, sent = make_call(Sys.GETPID, authenticated=False)
    t.dispatch(call, {})
    assert replies(sent)[0][2][0] == "EACCES" and not seen
    call, sent = make_call(Sys.GETPID)
    t.dispatch(call, {"x": 1})
    assert replies(sent) == [(1, "error", ("EINVAL", "unknown argument 'x'"))] and not seen
    call, sent = make_call(Sys.GETPID)
    t.dispatch(call, {})
    assert replies(sent) == [(1, "ok", 7)] and call.done and not call.conn.calls


def test_hello_authenticates_only_when_it_succeeds():
    t = SyscallTable()

    def hello(call, args):
        if args["token"] != "t":
            raise SyscallError("EACCES", "bad token")
        return {}
    t.register(Sys.HELLO, hello)
    call, _ = make_call(Sys.HELLO, authenticated=False)
    t.dispatch(call, {"token": "x"})
    assert not call.conn.authenticated
    call, _ = make_call(Sys.HELLO, authenticated=False)
    t.dispatch(call, {"token": "t"})
    assert call.conn.authenticated


def test_pending_calls_finish_once(caplog):
    t = SyscallTable()
    calls = []
    t.register(Sys.GENERATE, lambda call, args: calls.append(call) or PENDING)
    call, sent = make_call(Sys.GENERATE)
    t.dispatch(call, {"prompt": "x"})
    assert sent == [] and not call.done
    assert call.event({"text": "a"}) is True
    assert call.reply({"n": 1}) is True
    assert call.error("EIO", "late") is False and call.event({"text": "b"}) is False
    assert replies(sent) == [("event", {"text": "a"}), (1, "ok", {"n": 1})]


def test_a_handler_bug_is_eio_and_logged(caplog):
    t = SyscallTable()
    t.register(Sys.PS, lambda call, args: 1 / 0)
    call, sent = make_call(Sys.PS)
    with caplog.at_level(logging.ERROR, "llmos.syscalls"):
        t.dispatch(call, {})
    assert replies(sent) == [(1, "error", ("EIO", "ps: internal error"))]
    assert "ZeroDivisionError" in caplog.text


def test_register_checks():
    t = SyscallTable()
    with pytest.raises(KeyError):
        t.register(999, lambda c, a: None)
    with pytest.raises(TypeError):
        t.register(Sys.PS, "ps")


def test_the_server_imports_no_torch():
    import subprocess
    import sys
    code = "import sys, llmos.kernel.server, llmos.kernel.syscall; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=30)
