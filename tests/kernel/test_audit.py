"""The audit log (kernel/audit.py) and the size-rotated log files under it (kernel/logfile.py):
unit tests on a temporary directory, then one real kernel whose audit log must show a
refused hello, a spawn, a signal, an EPERM, a share-group join and a flood held back."""
from __future__ import annotations

import json
import logging
import os
import stat
import sys
import textwrap
import time

import msgpack
import pytest
import zmq

from llmos.kernel import tunables
from llmos.kernel.audit import AuditLog
from llmos.kernel.logfile import LogFile, LogHandler
from llmos.syscalls import Connection, Sys, SyscallError, wire
from llmos.syscalls.home import Home, HomeError, read_token
from tests.kernels import running_kernel, stop_kernel

T = 60


def lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_records_are_json_lines_and_rotate_by_size(tmp_path):
    audit = AuditLog(LogFile(tmp_path, "audit.log", max_bytes=1000, keep=2))
    for i in range(40):
        audit.record("spawn", pid=1, uid=1000, target=i, name="x\ny", argv0="/bin/" + "z" * 500)
    audit.close()
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["audit.log", "audit.log.1", "audit.log.2"]     # keep=2: older dropped
    kept = lines(tmp_path / "audit.log.2") + lines(tmp_path / "audit.log.1") \
        + lines(tmp_path / "audit.log")
    assert [r["target"] for r in kept] == list(range(40 - len(kept), 40))   # newest last
    for p in tmp_path.iterdir():
        assert p.stat().st_size <= 1000 and stat.S_IMODE(p.stat().st_mode) == 0o600
    r = kept[-1]
    assert r["event"] == "spawn" and r["name"] == "x\ny" and len(r["argv0"]) == 256 + 3
    assert abs(r["ts"] - time.time()) < 60


def test_a_planted_symlink_is_never_followed(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    logs = tmp_path / "log"
    logs.mkdir()
    (logs / "audit.log").symlink_to(victim)
    with pytest.raises(HomeError, match="symlink"):
        AuditLog.open(logs)
    (logs / "audit.log").unlink()
    audit = AuditLog(LogFile(logs, "audit.log", max_bytes=100, keep=1))
    audit.record("hello", pid=1, uid=0)
    # Swapped for a link while open: rotation moves the link aside, opens a new file.
    (logs / "audit.log").unlink()
    (logs / "audit.log").symlink_to(victim)
    for i in range(3):
        audit.record("hello", pid=2 + i, uid=0, os_pid=12345)
    audit.close()
    assert victim.read_text() == "precious\n"
    assert not (logs / "audit.log").is_symlink()
    assert lines(logs / "audit.log")[-1]["pid"] == 4


def test_a_failing_write_never_raises_and_is_logged_once(tmp_path, caplog, monkeypatch):
    audit = AuditLog(LogFile(tmp_path, "audit.log", max_bytes=1 << 20, keep=1))

    def broken(data):
        raise OSError(28, "No space left on device")
    good = audit.file.write
    monkeypatch.setattr(audit.file, "write", broken)
    with caplog.at_level(logging.WARNING, logger="llmos.kernel"):
        for i in range(5):
            audit.record("signal", pid=1, uid=0, target=i, signal="KILL")
        monkeypatch.setattr(audit.file, "write", good)
        audit.record("signal", pid=1, uid=0, target=9, signal="KILL")
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2, messages
    assert "No space left" in messages[0] and "5 record(s) lost" in messages[1]
    assert [r["target"] for r in lines(tmp_path / "audit.log")] == [9]
    audit.close()
    audit.record("signal", pid=1, uid=0, target=10, signal="KILL")     # closed: dropped


def test_refusals_of_one_key_are_rate_limited(tmp_path):
    audit = AuditLog(LogFile(tmp_path, "audit.log", max_bytes=1 << 20, keep=1),
                     burst=3, period=0.2)
    for _ in range(10):
        audit.record("hello_refused", limited=True, pid=None, uid=1000, os_pid=7,
                     code="EACCES", reason="hello: wrong token")
    audit.record("denied", limited=True, pid=5, uid=1000, syscall="kill", code="EPERM",
                 reason="no")
    audit.record("spawn", pid=1, uid=1000, target=6)          # never limited
    time.sleep(0.3)
    audit.tick()                                               # the period is over
    audit.record("hello_refused", limited=True, pid=None, uid=1000, os_pid=8,
                 code="EACCES", reason="hello: wrong token")  # a new period: written
    audit.close()
    events = [r["event"] for r in lines(tmp_path / "audit.log")]
    assert events == ["hello_refused"] * 3 + ["denied", "spawn", "suppressed", "hello_refused"]
    summary = lines(tmp_path / "audit.log")[-2]
    assert summary == {**summary, "of": "hello_refused", "count": 7, "uid": 1000,
                       "code": "EACCES", "pid": None}


def test_the_dispatcher_reports_each_denial_once_and_nothing_else():
    from llmos.kernel.syscall import Call, ConnState, SyscallTable
    from llmos.syscalls.errors import EAGAIN, EPERM, ESRCH
    table, seen, sent = SyscallTable(), [], []
    table.on_denied = lambda call, code, msg: seen.append((call.nr, code, msg))
    codes = iter([EPERM, EAGAIN, ESRCH])

    def refuse(call, args):
        raise SyscallError(next(codes), "because")
    table.register(Sys.GETPID, refuse)
    member, guest = ConnState(b"member"), ConnState(b"guest")
    member.authenticated, member.pid = True, 3
    for i in range(3):
        table.dispatch(Call(member, i, Sys.GETPID, lambda *m: sent.append(m)), {})
    table.dispatch(Call(guest, 9, Sys.SYSCALLS, lambda *m: sent.append(m)), {})
    assert seen == [(Sys.GETPID, EPERM, "because"), (Sys.GETPID, EAGAIN, "because"),
                    (Sys.SYSCALLS, "EACCES", "syscalls: say hello first")]
    assert len(sent) == 4                                 # every call still answered
    table.on_denied = lambda call, code, msg: 1 / 0       # a broken hook: still answered
    table.dispatch(Call(guest, 10, Sys.SYSCALLS, lambda *m: sent.append(m)), {})
    assert len(sent) == 5


def test_the_kernel_log_handler_rotates_and_refuses_a_symlink(tmp_path):
    handler = LogHandler(LogFile(tmp_path, "kernel.log", max_bytes=1000, keep=3))
    logger = logging.getLogger("llmos.test_audit")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        for i in range(200):
            logger.warning("line %d %s", i, "x" * 40)
    finally:
        logger.removeHandler(handler)
        handler.close()
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["kernel.log", "kernel.log.1", "kernel.log.2", "kernel.log.3"]
    assert all(p.stat().st_size <= 1000 for p in tmp_path.iterdir())
    assert (tmp_path / "kernel.log").read_text().splitlines()[-1].startswith("line 199 ")
    (tmp_path / "kernel.log").unlink()
    (tmp_path / "kernel.log").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(HomeError):
        LogFile(tmp_path, "kernel.log", max_bytes=1000, keep=3)
    assert not (tmp_path / "elsewhere").exists()


def test_a_real_kernel_audits_hello_spawn_signal_eperm_share_and_floods():
    with running_kernel() as (path, proc):
        home = Home(path)
        guest = zmq.Context.instance().socket(zmq.DEALER)
        guest.setsockopt(zmq.LINGER, 0)
        guest.connect(home.socket_url)
        flood = tunables.AUDIT_BURST + 10
        for i in range(flood):                                 # bad tokens, one peer
            guest.send(wire.encode_request(i, Sys.HELLO, {"token": "guess"}))
            assert guest.poll(T * 1000), "no reply"
            assert msgpack.unpackb(guest.recv(), raw=False)["e"]["code"] == "EACCES"
        guest.close()

        c = Connection(home.socket_url, read_token(home), timeout=T)
        me = c.hello["pid"]
        sibling = c.call(Sys.SPAWN, argv=["/bin/sleep", "60"])["pid"]
        agent = textwrap.dedent(f"""
            from llmos.syscalls import SyscallError
            from llmos.userland import connect
            k = connect(timeout=60)
            try:
                k.kill({sibling}, "KILL")
            except SyscallError as e:
                print(e.code, flush=True)
            for system in ("You are tiny.", "Again."):
                k.context(system, share="team")
        """)
        pid = c.call(Sys.SPAWN, argv=[sys.executable, "-c", agent], name="agent")["pid"]
        assert c.call(Sys.WAIT, pid=pid, timeout=T)["status"] == 0, \
            home.proc_log(pid).read_text()
        assert home.proc_log(pid).read_text().split() == ["EPERM"]
        c.call(Sys.KILL, pid=sibling, sig="KILL")
        with pytest.raises(SyscallError):
            c.call(Sys.KILL, pid=999_999, sig="KILL")           # ESRCH: not audited
        c.close()
        stop_kernel(proc)                 # shutdown writes what the rate limit held back

        assert stat.S_IMODE(home.audit_log.stat().st_mode) == 0o600
        recs = lines(home.audit_log)
        uid = os.getuid()

        def find(event, **match):
            return [r for r in recs if r["event"] == event
                    and all(r.get(k) == v for k, v in match.items())]
        refused = find("hello_refused", code="EACCES", uid=uid, os_pid=os.getpid(), pid=None)
        assert len(refused) == tunables.AUDIT_BURST and "wrong token" in refused[0]["reason"]
        assert find("suppressed", of="hello_refused", count=flood - tunables.AUDIT_BURST)
        assert find("hello", pid=me, uid=uid, owner=True)
        assert find("hello", pid=pid, uid=uid, owner=False)
        assert find("spawn", pid=me, uid=uid, target=pid, name="agent", argv0=sys.executable)
        assert find("spawn", pid=me, target=sibling, name="sleep", argv0="/bin/sleep")
        denied = find("denied", pid=pid, uid=uid, syscall="kill", code="EPERM")
        assert len(denied) == 1 and str(sibling) in denied[0]["reason"]
        assert len(find("share", pid=pid, uid=uid, syscall="context_create",
                        group="team")) == 1                      # the first time only
        assert find("signal", pid=me, uid=uid, target=sibling, signal="KILL")
        assert not find("signal", target=999_999)
        assert all(isinstance(r["ts"], float) for r in recs)
