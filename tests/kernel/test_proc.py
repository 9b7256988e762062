"""The process table with real OS processes: spawn, death, wait, signals, ps, shutdown.

Every wait has a timeout; every process a test starts is stopped by the `table` fixture
(shutdown) or by the test itself.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from llmos.kernel import proc as proc_mod
from llmos.kernel.proc import ProcError, ProcTable, State, parse_signal

PY = sys.executable
T = 10.0                     # generous bound for anything that should happen "soon"


class Recorder:
    """on_exit / on_signal hooks that remember what they saw, and when."""

    def __init__(self):
        self.cond = threading.Condition()
        self.exits: dict[int, tuple[int | None, float, State]] = {}   # os_pid or pid -> ...
        self.signals: list[tuple[int, int]] = []

    def on_exit(self, p):
        with self.cond:
            self.exits[p.pid] = (p.exit_status, time.monotonic(), p.state)
            self.cond.notify_all()

    def on_signal(self, p, sig):
        with self.cond:
            self.signals.append((p.pid, sig))

    def wait_exit(self, pid, timeout=T):
        with self.cond:
            assert self.cond.wait_for(lambda: pid in self.exits, timeout), f"no exit of {pid}"
            return self.exits[pid]


@pytest.fixture
def rec():
    return Recorder()


@pytest.fixture
def table(rec):
    t = ProcTable(on_exit=rec.on_exit, on_signal=rec.on_signal)
    yield t
    t.shutdown(grace=2)
    assert not any(p.alive for p in t.procs() if p.os_pid and not p.attached)


@pytest.fixture
def shell(table):
    """An attached process standing for the shell: the parent of what tests spawn."""
    return table.attach(None, "sh")


def spawn(table, tmp_path, code, parent, **kw):
    return table.spawn([PY, "-c", code], parent=parent, socket_path="/s.sock",
                       log_dir=tmp_path, **kw)


def until(pred, timeout=T):
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


def log_line(tmp_path, pid, timeout=T) -> str:
    """The first full line the process wrote to its log."""
    f = Path(tmp_path) / f"{pid}.log"
    until(lambda: f.read_text().endswith("\n"), timeout)
    return f.read_text().splitlines()[0]


SLEEP = "import time; print('up', flush=True); time.sleep(60)"


# ---- spawn ---------------------------------------------------------------------------

def test_spawn_env_log_stdin_and_own_group(table, shell, tmp_path):
    code = ("import os, sys; print(os.environ['LLMOS_SOCKET'], os.environ['LLMOS_TOKEN'], "
            "os.environ['LLMOS_PID'], os.environ['EXTRA'], os.getpgid(0) == os.getpid(), "
            "os.getsid(0) == os.getpid(), repr(sys.stdin.read())); "
            "print('oops', file=sys.stderr)")
    p = spawn(table, tmp_path, code, shell.pid, env_extra={"EXTRA": "x"}, name="envcheck")
    pid, token = p.pid, p.token
    assert p.state is State.SLEEPING and p.ppid == shell.pid and p.name == "envcheck"
    assert p.os_pid and p.argv[0] == PY and not p.attached and len(token) == 64
    assert token != shell.token
    assert table.wait(pid, shell.pid, timeout=T) == 0
    log = tmp_path / f"{pid}.log"
    assert log.read_text().split() == ["/s.sock", token, str(pid), "x", "True", "True",
                                       "''", "oops"]
    assert os.stat(log).st_mode & 0o777 == 0o600


def test_spawn_failure_frees_the_slot(table, shell, tmp_path):
    with pytest.raises(ProcError) as e:
        table.spawn(["/nonexistent/prog"], parent=shell.pid, log_dir=tmp_path)
    assert e.value.code == "ENOENT"
    assert [p.pid for p in table.procs()] == [shell.pid]
    with pytest.raises(ProcError, match="EINVAL"):
        table.spawn([], log_dir=tmp_path)
    with pytest.raises(ProcError) as e:
        spawn(table, tmp_path, "pass", parent=999)
    assert e.value.code == "ESRCH"


def test_by_token_and_children(table, shell, tmp_path):
    a = spawn(table, tmp_path, SLEEP, shell.pid)
    b = spawn(table, tmp_path, SLEEP, a.pid)
    assert table.by_token(a.token) is a and table.by_token("nope") is None
    assert table.children(shell.pid) == [a] and table.children(a.pid) == [b]
    assert table.is_descendant(b.pid, shell.pid) and table.is_descendant(b.pid, a.pid)
    assert not table.is_descendant(a.pid, b.pid) and not table.is_descendant(a.pid, a.pid)
    table.kill(a.pid, "KILL", caller=shell.pid)
    table.wait(a.pid, shell.pid, timeout=T)
    assert table.by_token(a.token) is None
    assert table.get(b.pid).ppid == 0                # orphan re-parented to the kernel


# ---- death -------------------------------------------------------------------------

def test_exit_seen_at_once(table, rec, shell, tmp_path):
    p = spawn(table, tmp_path, SLEEP, shell.pid)
    log_line(tmp_path, p.pid)
    t0 = time.monotonic()
    os.kill(p.os_pid, signal.SIGKILL)                # behind the table's back
    status, seen, state = rec.wait_exit(p.pid)
    assert seen - t0 < 1.0, f"exit seen after {seen - t0:.3f} s"
    assert status == -signal.SIGKILL and state is State.ZOMBIE
    assert table.get(p.pid).state is State.ZOMBIE
    assert table.kill(p.pid, "TERM", caller=shell.pid) is False      # zombie: no-op


def test_exit_codes_and_signal_status(table, shell, tmp_path):
    a = spawn(table, tmp_path, "import sys; sys.exit(3)", shell.pid)
    b = spawn(table, tmp_path, "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)",
              shell.pid)
    c = spawn(table, tmp_path, SLEEP, shell.pid)
    log_line(tmp_path, c.pid)
    assert table.kill(c.pid, "SIGTERM", caller=shell.pid) is True
    assert table.wait(a.pid, shell.pid, timeout=T) == 3
    assert table.wait(b.pid, shell.pid, timeout=T) == -signal.SIGSEGV
    assert table.wait(c.pid, shell.pid, timeout=T) == -signal.SIGTERM


def test_wait_rules_and_slot_reset(table, shell, tmp_path):
    other = table.attach(None, "other")
    p = spawn(table, tmp_path, SLEEP, shell.pid, nice=5)
    pid = p.pid
    for caller, code in ((other.pid, "EPERM"), (pid, "EINVAL"), (0, "ECHILD")):
        with pytest.raises(ProcError) as e:
            table.wait(pid, caller, timeout=T)
        assert e.value.code == code, caller
    with pytest.raises(ProcError) as e:
        table.wait(999, shell.pid, timeout=T)
    assert e.value.code == "ESRCH"
    t0 = time.monotonic()
    with pytest.raises(ProcError) as e:
        table.wait(pid, shell.pid, timeout=0.2)
    assert e.value.code == "ETIMEDOUT" and time.monotonic() - t0 < T
    p.contexts.add(1)
    p.requests.add(2)
    p.tokens_in = 10
    table.kill(pid, "KILL", caller=shell.pid)
    assert table.wait(pid, shell.pid, timeout=T) == -signal.SIGKILL
    # freed: every field reset, the pid unknown, then reused by the next process
    assert p.pid == 0 and p.state is State.UNUSED and p.token == "" and p.os_pid is None
    assert p.contexts == set() and p.requests == set() and p.tokens_in == 0 and p.nice == 0
    assert p.exit_status is None and p.argv == [] and p._popen is None
    with pytest.raises(ProcError, match="ESRCH"):
        table.get(pid)
    with pytest.raises(ProcError, match="ESRCH"):
        table.wait(pid, shell.pid, timeout=T)
    again = table.attach(None, "again")
    assert again.pid == pid and again is not p


def test_waiter_gets_echild_when_the_parent_dies(table, shell, tmp_path):
    p = spawn(table, tmp_path, SLEEP, shell.pid)
    got = []
    th = threading.Thread(target=lambda: got.append(_wait_code(table, p.pid, shell.pid)))
    th.start()
    table.detach(shell.pid)                          # the shell went away mid-wait
    th.join(timeout=T)
    assert got == ["ECHILD"]
    assert table.get(p.pid).ppid == 0


def _wait_code(table, pid, caller):
    try:
        table.wait(pid, caller, timeout=T)
        return "ok"
    except ProcError as e:
        return e.code


def test_orphan_zombie_freed_automatically(table, rec, tmp_path):
    p = spawn(table, tmp_path, "pass", parent=None)
    pid = p.pid
    rec.wait_exit(pid)
    until(lambda: all(q.pid != pid for q in table.procs()))
    assert p.state is State.UNUSED


# ---- signals -------------------------------------------------------------------------

def test_kill_permissions(table, rec, shell, tmp_path):
    a = spawn(table, tmp_path, SLEEP, shell.pid)
    b = spawn(table, tmp_path, SLEEP, a.pid)
    stranger = table.attach(None, "stranger")
    ok = [(a.pid, a.pid), (b.pid, a.pid), (b.pid, shell.pid), (a.pid, shell.pid)]
    for target, caller in ok:
        assert table.kill(target, "CONT", caller=caller) is True
    for target, caller in ((a.pid, b.pid), (shell.pid, a.pid), (a.pid, stranger.pid),
                           (b.pid, None)):
        with pytest.raises(ProcError) as e:
            table.kill(target, "CONT", caller=caller)
        assert e.value.code == "EPERM", (target, caller)
    assert table.kill(a.pid, "CONT", caller=stranger.pid, owner=True) is True
    assert table.kill(a.pid, 0, caller=shell.pid) is True
    with pytest.raises(ProcError, match="ESRCH"):
        table.kill(999, "TERM", caller=None, owner=True)
    with rec.cond:
        assert rec.signals == [(t, signal.SIGCONT) for t, _ in ok] + [(a.pid, signal.SIGCONT)]


def test_parse_signal():
    assert parse_signal("TERM") == parse_signal("SIGTERM") == parse_signal("sigterm") == 15
    assert parse_signal(9) == parse_signal("9") == signal.SIGKILL
    assert parse_signal("STOP") == signal.SIGSTOP and parse_signal(0) == 0
    for bad in ("FOO", "SEGV", -1, "-9", None, 99):
        with pytest.raises(ProcError, match="EINVAL"):
            parse_signal(bad)


def test_stop_and_cont(table, shell, tmp_path):
    p = spawn(table, tmp_path, SLEEP, shell.pid)
    log_line(tmp_path, p.pid)
    ps = psutil.Process(p.os_pid)
    table.kill(p.pid, "STOP", caller=shell.pid)
    assert p.state is State.STOPPED
    until(lambda: ps.status() == psutil.STATUS_STOPPED)
    assert table.set_state(p.pid, State.RUNNING) is False      # the scheduler cannot run it
    assert p.state is State.STOPPED
    table.kill(p.pid, "CONT", caller=shell.pid)
    assert p.state is State.SLEEPING
    until(lambda: ps.status() != psutil.STATUS_STOPPED)
    assert table.set_state(p.pid, State.READY) is True and p.state is State.READY
    p.requests.add(1)
    table.kill(p.pid, "STOP", caller=shell.pid)
    table.kill(p.pid, "CONT", caller=shell.pid)
    assert p.state is State.READY                    # it still has LLM work queued


GRANDPARENT = """
import subprocess, sys, time
g = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
print(g.pid, flush=True)
time.sleep(60)
"""


def test_kill_reaches_the_whole_group(table, rec, shell, tmp_path):
    p = spawn(table, tmp_path, GRANDPARENT, shell.pid)
    grandchild = psutil.Process(int(log_line(tmp_path, p.pid)))
    assert os.getpgid(grandchild.pid) == p.os_pid
    table.kill(p.pid, "KILL", caller=shell.pid)
    assert table.wait(p.pid, shell.pid, timeout=T) == -signal.SIGKILL
    # Gone, or a zombie nobody reaps (pid 1 of a container may not reap).
    until(lambda: not grandchild.is_running() or grandchild.status() == psutil.STATUS_ZOMBIE)


# ---- attached processes --------------------------------------------------------------

def test_heartbeat_and_silent_reaping(table, rec, shell):
    nb = table.attach(None, "notebook", parent=shell.pid)
    assert nb.attached and nb.os_pid is None and nb.state is State.SLEEPING
    assert table.reap_silent(timeout=60) == []
    nb.last_seen -= 120                              # as if silent for two minutes
    table.heartbeat(nb.pid)                          # ...but it just spoke
    assert table.reap_silent(timeout=60) == []
    nb.last_seen -= 120
    assert table.reap_silent(timeout=60) == [nb]
    status, _, state = rec.wait_exit(nb.pid)
    assert status is None and state is State.ZOMBIE
    assert table.reap_silent(timeout=60) == []       # once only
    assert table.wait(nb.pid, shell.pid, timeout=T) is None
    with pytest.raises(ProcError, match="ESRCH"):
        table.heartbeat(999)


def test_attached_os_process_death_seen_at_once(table, rec, shell, tmp_path):
    outside = subprocess.Popen([PY, "-c", "import time; time.sleep(60)"])
    try:
        p = table.attach(outside.pid, "outside", parent=shell.pid)
        t0 = time.monotonic()
        outside.kill()
        status, seen, _ = rec.wait_exit(p.pid)
        assert status is None and seen - t0 < 1.0
    finally:
        outside.kill()
        outside.wait(timeout=T)
    with pytest.raises(ProcError, match="ESRCH"):
        table.attach(outside.pid, "gone")
    with pytest.raises(ProcError, match="EINVAL"):
        table.detach(table.spawn(["sleep", "60"], parent=shell.pid, log_dir=tmp_path).pid)


# ---- ps and shutdown ----------------------------------------------------------------

def test_ps_and_procdump(table, shell, tmp_path):
    busy = spawn(table, tmp_path, "print('up', flush=True)\nwhile True: pass", shell.pid)
    log_line(tmp_path, busy.pid)
    busy.tokens_in, busy.tokens_out, busy.kv_blocks = 12, 34, 5
    table.ps()                                       # primes cpu_percent
    seen = []
    until(lambda: seen.append(table.ps()) or seen[-1][1]["cpu_percent"] > 0)
    rows = {r["pid"]: r for r in seen[-1]}
    r = rows[busy.pid]
    assert set(r) >= {"pid", "ppid", "name", "state", "nice", "kv_blocks", "tokens_in",
                      "tokens_out", "cpu_percent", "rss", "age"}
    assert (r["ppid"], r["state"], r["tokens_in"], r["tokens_out"], r["kv_blocks"]) == \
        (shell.pid, "sleeping", 12, 34, 5)
    assert r["rss"] > 1 << 20 and 0 < r["cpu_percent"] <= 200 and 0 <= r["age"] < 60
    assert rows[shell.pid]["rss"] is None and rows[shell.pid]["cpu_percent"] == 0.0
    dump = table.procdump()
    assert dump.splitlines()[0].split()[:3] == ["PID", "PPID", "STATE"]
    assert len(dump.splitlines()) == 3 and "sh" in dump
    table.kill(busy.pid, "KILL", caller=shell.pid)
    until(lambda: table.get(busy.pid).state is State.ZOMBIE)
    r = {r["pid"]: r for r in table.ps()}[busy.pid]
    assert r["state"] == "zombie" and r["rss"] is None and r["cpu_percent"] == 0.0


def test_shutdown_escalates_to_kill(rec, tmp_path):
    table = ProcTable(on_exit=rec.on_exit)
    stubborn = spawn(table, tmp_path, "import signal, time; signal.signal(signal.SIGTERM, "
                     "signal.SIG_IGN); print('up', flush=True); time.sleep(60)", None)
    polite = spawn(table, tmp_path, SLEEP, None)
    stopped = spawn(table, tmp_path, SLEEP, None)
    pids = [stubborn.pid, polite.pid, stopped.pid]
    for p in (stubborn, polite, stopped):
        log_line(tmp_path, p.pid)
    table.kill(stopped.pid, "STOP", caller=None, owner=True)
    t0 = time.monotonic()
    table.shutdown(grace=0.5)
    assert time.monotonic() - t0 < T
    assert [rec.exits[pid][0] for pid in pids] == \
        [-signal.SIGKILL, -signal.SIGTERM, -signal.SIGTERM]
    assert table.procs() == []                       # orphans: freed once dead
    with pytest.raises(ProcError, match="EAGAIN"):
        spawn(table, tmp_path, "pass", None)


def test_module_imports_without_torch():
    code = "import sys, llmos.kernel.proc, llmos.kernel.home; print('torch' in sys.modules)"
    out = subprocess.run([PY, "-c", code], capture_output=True, text=True, timeout=T)
    assert out.stdout.strip() == "False", out.stderr
