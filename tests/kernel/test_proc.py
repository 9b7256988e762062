"""The process table (kernel/proc.py) with real OS processes: spawn, pids and logs, death
and release, wait, signals, attached processes, shutdown.

Every wait has a timeout; every table a test makes is shut down by the `make_table`
fixture (grace 2 s), which stops whatever the test left running.
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
from llmos.kernel import tunables
from llmos.kernel.proc import ProcTable, first_free_pid
from llmos.kernel.signals import parse_signal
from llmos.syscalls.errors import SyscallError
from llmos.syscalls.types import ProcState

T = 10.0                        # generous bound for anything that should happen "soon"
KILLED = -signal.SIGKILL
SLEEPER = "echo up; exec sleep 60"


# ---- helpers -------------------------------------------------------------------------

class Hooks:
    """on_exit / on_signal that record what they saw. on_exit calls released() at once,
    unless hold (then the test plays the engine and releases)."""

    def __init__(self, hold: bool = False):
        self.hold = hold
        self.table: ProcTable | None = None
        self.cond = threading.Condition()
        self.exits: dict[int, tuple] = {}   # pid -> (status, request ids, context ids, locked)
        self.signals: list[tuple] = []      # (pid, sig, request ids, locked)

    def on_exit(self, p, rids, cids):
        locked = lock_held(self.table)
        with self.cond:
            self.exits[p.pid] = (p.exit_status, sorted(rids), set(cids), locked)
            self.cond.notify_all()
        if not self.hold:
            self.table.released(p)

    def on_signal(self, p, sig, rids):
        self.signals.append((p.pid, sig, sorted(rids), lock_held(self.table)))

    def wait_exit(self, pid: int) -> tuple:
        with self.cond:
            assert self.cond.wait_for(lambda: pid in self.exits, T), f"no exit of pid {pid}"
            return self.exits[pid]


def lock_held(table: ProcTable) -> bool:
    """True if another thread cannot take the table's lock right now."""
    got = []
    th = threading.Thread(target=lambda: got.append(table.lock.acquire(blocking=False)))
    th.start()
    th.join(T)
    if got[0]:
        table.lock.release()
    return not got[0]


class Reply:
    """The answer to one wait call: reply(status) or fail(err), once."""

    def __init__(self):
        self.done = threading.Event()
        self.status = self.error = None
        self.calls = 0

    def reply(self, status):
        self.status, self.calls = status, self.calls + 1
        self.done.set()

    def fail(self, err):
        self.error, self.calls = err, self.calls + 1
        self.done.set()

    def get(self):
        assert self.done.wait(T), "wait not answered in time"
        assert self.calls == 1
        if self.error is not None:
            raise self.error
        return self.status


def start_wait(table, pid, caller, owner=False) -> tuple[Reply, object]:
    r = Reply()
    return r, table.wait(pid, caller, owner, r.reply, r.fail)


def wait_status(table, pid, caller, owner=False):
    """Wait for pid as caller; its status (raises the SyscallError of a failed wait)."""
    r, w = start_wait(table, pid, caller, owner)
    try:
        return r.get()
    finally:
        if w is not None:
            table.cancel_wait(pid, w)


def code_of(fn, *args, **kw) -> str:
    with pytest.raises(SyscallError) as e:
        fn(*args, **kw)
    return e.value.code


def until(pred, timeout=T):
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


def sh(table, log_dir, script, parent=0, **kw):
    return table.spawn(["/bin/sh", "-c", script], parent=parent, log_dir=log_dir,
                       socket_path="/s.sock", **kw)


def sleeper(table, log_dir, parent=0):
    """A process that says "up" and sleeps a minute (after exec, still in its group)."""
    p = sh(table, log_dir, SLEEPER, parent)
    log_text(log_dir, p.pid, "up\n")
    return p


def log_text(log_dir, pid, expect="\n") -> str:
    """The log of pid once it holds expect."""
    f = Path(log_dir) / f"{pid}.log"
    until(lambda: expect in f.read_text())
    return f.read_text()


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def os_gone(os_pid) -> bool:
    """The OS process exited (a zombie nobody reaps counts: pid 1 of a container may not)."""
    try:
        return psutil.Process(os_pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


NOOP = (lambda status: None, lambda err: None)


@pytest.fixture
def make_table():
    """make(hooks=None, **ProcTable kwargs): a table, shut down after the test. Without
    hooks it has the default ones (on_exit releases at once)."""
    made = []

    def make(hooks=None, **kw):
        if hooks is None:
            t = ProcTable(**kw)
        else:
            t = ProcTable(on_exit=hooks.on_exit, on_signal=hooks.on_signal, **kw)
            hooks.table = t
        made.append(t)
        return t

    yield make
    for t in made:
        t.shutdown(grace=2)
        assert not any(p.alive for p in t.procs() if not p.attached)


@pytest.fixture
def hooks():
    return Hooks()


@pytest.fixture
def table(make_table, hooks):
    return make_table(hooks)


@pytest.fixture
def shell(table):
    """An attached process standing for the shell: the parent of what tests spawn."""
    return table.attach("sh")


# ---- spawn ---------------------------------------------------------------------------

ENV_SCRIPT = ('read -r secret < /proc/self/fd/$LLMOS_TOKEN_FD; '
              'echo "$LLMOS_SOCKET $secret $LLMOS_PID $EXTRA $FROM_US"; '
              'readlink /proc/$$/fd/0; cat; echo oops >&2; echo up; exec sleep 60')


def test_spawn_environment_stdin_group_and_log(table, shell, tmp_path, monkeypatch):
    monkeypatch.setenv("FROM_US", "inherited")
    extra = {"EXTRA": "x", "LLMOS_TOKEN_FD": "0"}         # cannot forge its own secret
    p = sh(table, tmp_path, ENV_SCRIPT, shell.pid, env_extra=extra, name="envcheck")
    assert (p.name, p.ppid, p.state, p.attached, p.owner) == \
        ("envcheck", shell.pid, ProcState.SLEEPING, False, os.getuid())
    assert p.argv[0] == "/bin/sh" and len(p.token) == 64 and p.token != shell.token
    assert table.by_token(p.token) is p and table.by_token("nope") is None
    log = log_text(tmp_path, p.pid, "up\n")
    assert log.splitlines() == [f"/s.sock {p.token} {p.pid} x inherited", "/dev/null",
                                "oops", "up"]
    assert os.stat(tmp_path / f"{p.pid}.log").st_mode & 0o777 == 0o600
    assert p.token.encode() not in Path(f"/proc/{p.os_pid}/environ").read_bytes()
    assert os.getpgid(p.os_pid) == p.os_pid and os.getsid(p.os_pid) == p.os_pid
    table.kill(p.pid, "KILL", caller=shell.pid)
    assert wait_status(table, p.pid, shell.pid) == KILLED


def test_spawn_never_follows_a_symlink_planted_at_its_log(make_table, tmp_path):
    table = make_table(Hooks(), first_pid=100)
    target = tmp_path / "victim"
    target.write_text("precious\n")
    (tmp_path / "100.log").symlink_to(target)
    p = table.spawn(["/bin/echo", "hello"], log_dir=tmp_path)
    assert wait_status(table, p.pid, 0) == 0
    assert target.read_text() == "precious\n"
    assert (tmp_path / "100.log.old").is_symlink()
    assert not (tmp_path / "100.log").is_symlink()
    assert (tmp_path / "100.log").read_text() == "hello\n"


def bad_spawns(tmp_path, dead_parent):
    noexec = tmp_path / "noexec"
    noexec.write_text("#!/bin/sh\n")
    noexec.chmod(0o644)
    return [
        (["/nonexistent/prog"], {}, "ENOENT"),
        ([str(noexec)], {}, "EACCES"),
        ([], {}, "EINVAL"),
        (["/bin/echo", "a\0b"], {}, "EINVAL"),
        (["/bin/echo"], {"env_extra": {"K": "a\0b"}}, "EINVAL"),
        (["/bin/echo"], {"env_extra": {"K=V": "x"}}, "EINVAL"),
        (["/bin/echo"], {"parent": 9999}, "ESRCH"),
        (["/bin/echo"], {"parent": dead_parent}, "ESRCH"),
        (["/bin/echo"], {"log_dir": tmp_path / "missing"}, "ENOENT"),
    ]


def test_failed_spawns_free_their_rows(table, tmp_path, monkeypatch):
    monkeypatch.setattr(proc_mod, "MAX_PROCS", 4)
    shell = table.attach("shell")
    ghost = table.attach("ghost", parent=shell.pid)
    table.detach(ghost.pid, 0)                      # a zombie (its parent lives): a dead parent
    logs = tmp_path / "logs"
    logs.mkdir()
    fds = open_fds()
    for _ in range(3):                              # 27 failures: more than MAX_PROCS rows
        for argv, kw, code in bad_spawns(tmp_path, ghost.pid):
            assert code_of(table.spawn, argv, **{"log_dir": logs, **kw}) == code, (argv, kw)
            assert table.procs() == [shell, ghost]
    assert open_fds() <= fds + 3
    assert table.attach("owner-shell").alive        # the table still has room


def test_5000_failed_spawns_leave_room(table, tmp_path):
    for _ in range(5000):                           # more than MAX_PROCS rows
        assert code_of(table.spawn, ["/bin/echo"], log_dir=tmp_path / "missing") == "ENOENT"
    assert table.procs() == []
    assert table.attach("owner-shell").alive


def test_table_full_is_eagain(table, monkeypatch):
    monkeypatch.setattr(proc_mod, "MAX_PROCS", 3)
    a, b = (table.attach(n) for n in "ab")
    c = table.attach("c", parent=a.pid)
    assert code_of(table.attach, "d") == "EAGAIN"
    table.detach(c.pid, 0)                          # a zombie still holds its row
    assert code_of(table.attach, "d") == "EAGAIN"
    assert wait_status(table, c.pid, a.pid) == 0    # its parent collects it
    assert table.attach("d").pid == c.pid + 1


def test_live_agents_are_capped_by_memory_and_a_zombie_does_not_count(make_table, hooks,
                                                                     tmp_path):
    # Finding 7 of the protection issue: 300 real processes spawned in 0.4 s, and the only cap
    # was the 4,096-row table (~80 GiB of Python agents). Live agents are capped by memory.
    default = proc_mod.default_max_agents()
    assert tunables.MIN_AGENTS <= default <= tunables.MAX_AGENTS
    assert default <= max(tunables.MIN_AGENTS, psutil.virtual_memory().total // tunables.AGENT_MEMORY)
    table = make_table(hooks, max_agents=2)
    a, b = (table.spawn(["sleep", "60"], log_dir=tmp_path) for _ in range(2))
    assert code_of(table.spawn, ["sleep", "60"], log_dir=tmp_path) == "EAGAIN"
    assert table.attach("the-shell").alive          # attached programs are not agents
    table.kill(a.pid, "KILL", caller=0, owner=True)
    hooks.wait_exit(a.pid)                          # a zombie holds no OS process
    assert table.spawn(["sleep", "60"], log_dir=tmp_path).alive


# ---- pids and logs -------------------------------------------------------------------

def test_pids_count_up_and_every_log_keeps_its_own_output(make_table, tmp_path):
    table = make_table()                            # default hooks: released at once
    fds = open_fds()
    pids = []
    for n in range(1000):
        p = table.spawn(["/bin/echo", str(n)], log_dir=tmp_path)
        assert wait_status(table, p.pid, 0) == 0
        pids.append(p.pid)
    assert pids == list(range(1, 1001))
    for n, pid in enumerate(pids):
        assert (tmp_path / f"{pid}.log").read_text() == f"{n}\n"
    assert table.procs() == [] and open_fds() <= fds + 3
    assert first_free_pid(tmp_path) == 1001

    again = make_table(first_pid=first_free_pid(tmp_path))     # as a new boot would
    p = again.spawn(["/bin/echo", "next boot"], log_dir=tmp_path)
    assert p.pid == 1001 and wait_status(again, p.pid, 0) == 0
    assert (tmp_path / "1001.log").read_text() == "next boot\n"
    assert (tmp_path / "1.log").read_text() == "0\n"


def test_first_free_pid(tmp_path, monkeypatch):
    assert first_free_pid(tmp_path / "missing") == 1
    assert first_free_pid(tmp_path) == 1
    for name in ("3.log", "10.log", "11.log.old", "x.log", "99.txt", "12"):
        (tmp_path / name).touch()
    assert first_free_pid(tmp_path) == 11
    monkeypatch.setattr(proc_mod, "PID_MAX", 11)
    assert first_free_pid(tmp_path) == 1            # 11 is past the last pid: wrap


def test_pid_wrap_skips_live_pids_and_keeps_the_older_log(make_table, tmp_path, monkeypatch):
    monkeypatch.setattr(proc_mod, "PID_MAX", 5)     # pids 1..4
    table = make_table(Hooks())
    shell = table.attach("sh")                      # pid 1, alive throughout
    pids = []
    for word in ("one", "two", "three", "four", "five"):
        p = table.spawn(["/bin/echo", word], parent=shell.pid, log_dir=tmp_path)
        assert wait_status(table, p.pid, shell.pid) == 0
        pids.append(p.pid)
    assert pids == [2, 3, 4, 2, 3]                  # 1 is taken: skipped
    assert (tmp_path / "2.log").read_text() == "four\n"
    assert (tmp_path / "2.log.old").read_text() == "one\n"
    assert (tmp_path / "3.log").read_text() == "five\n"
    assert (tmp_path / "3.log.old").read_text() == "two\n"
    assert (tmp_path / "4.log").read_text() == "three\n"


def test_first_pid_is_clamped_below_pid_max(make_table, monkeypatch):
    monkeypatch.setattr(proc_mod, "PID_MAX", 5)
    assert make_table(first_pid=99).attach("a").pid == 4
    assert make_table(first_pid=0).attach("a").pid == 1


# ---- death and release ---------------------------------------------------------------

def test_on_exit_gets_what_it_held_and_release_makes_it_waitable(make_table, tmp_path):
    hooks = Hooks(hold=True)
    table = make_table(hooks)
    shell = table.attach("sh")
    p = sleeper(table, tmp_path, shell.pid)
    p.requests.update({("peer", 1): 11, ("peer", 2): 12})
    p.contexts.update({5: None, 6: None})
    early, w = start_wait(table, p.pid, shell.pid)
    assert w is not None and not early.done.is_set()
    table.kill(p.pid, "KILL", caller=shell.pid)
    assert hooks.wait_exit(p.pid) == (KILLED, [11, 12], {5, 6}, True)
    assert p.requests == {} and p.contexts == {}
    assert p.state is ProcState.ZOMBIE and p.releasing and not p.waitable and not p.alive
    assert table.by_token(p.token) is None          # zombies never authenticate
    late, w = start_wait(table, p.pid, shell.pid)
    assert w is not None                            # not waitable yet: no answer
    assert not early.done.is_set() and not late.done.is_set()

    engine = threading.Thread(target=table.released, args=(p,))   # any thread may
    engine.start()
    engine.join(T)
    assert early.get() == late.get() == KILLED
    assert code_of(table.get, p.pid) == "ESRCH"    # the parent's wait collected it
    table.released(p)                               # again: a no-op


def test_exit_status(table, hooks, shell, tmp_path):
    ok = table.spawn(["/bin/true"], parent=shell.pid, log_dir=tmp_path)
    three = sh(table, tmp_path, "exit 3", shell.pid)
    outside = sleeper(table, tmp_path, shell.pid)
    termed = sleeper(table, tmp_path, shell.pid)
    os.kill(outside.os_pid, signal.SIGKILL)         # behind the table's back
    assert table.kill(termed.pid, "TERM", caller=shell.pid) is True
    assert hooks.wait_exit(outside.pid)[0] == KILLED
    assert [wait_status(table, p.pid, shell.pid) for p in (ok, three, outside, termed)] == \
        [0, 3, KILLED, -signal.SIGTERM]


def test_default_on_exit_releases_at_once(make_table, tmp_path):
    table = make_table()
    p = table.spawn(["/bin/true"], log_dir=tmp_path)
    until(lambda: p.waitable)
    assert p.exit_status == 0 and not p.releasing
    assert wait_status(table, p.pid, 0, owner=True) == 0


def test_a_failing_on_exit_still_releases(make_table, tmp_path):
    def broken(proc, rids, cids):
        raise RuntimeError("engine on fire")
    table = make_table()
    table.on_exit = broken
    p = table.spawn(["/bin/true"], log_dir=tmp_path)
    until(lambda: p.waitable)
    assert wait_status(table, p.pid, 0) == 0


# ---- wait ----------------------------------------------------------------------------

def test_wait_errors(table, shell, tmp_path):
    other = table.attach("other")
    p = sleeper(table, tmp_path, shell.pid)
    assert code_of(table.wait, p.pid, p.pid, False, *NOOP) == "EINVAL"
    assert code_of(table.wait, p.pid, p.pid, True, *NOOP) == "EINVAL"
    assert code_of(table.wait, 9999, shell.pid, True, *NOOP) == "ESRCH"
    assert code_of(table.wait, p.pid, other.pid, False, *NOOP) == "EPERM"
    assert code_of(table.wait, p.pid, 0, False, *NOOP) == "EPERM"
    assert code_of(table.wait, shell.pid, p.pid, False, *NOOP) == "EPERM"   # not its child


def test_the_parent_collects(table, shell, tmp_path):
    p = sh(table, tmp_path, "exit 4", shell.pid)
    assert wait_status(table, p.pid, shell.pid) == 4
    assert code_of(table.get, p.pid) == "ESRCH"
    assert code_of(table.wait, p.pid, shell.pid, False, *NOOP) == "ESRCH"
    assert table.procs() == [shell]


def test_the_owner_sees_a_status_the_parent_still_collects(table, shell, tmp_path):
    p = sleeper(table, tmp_path, shell.pid)
    owner, w = start_wait(table, p.pid, 0, owner=True)
    assert w is not None
    table.kill(p.pid, "TERM", caller=shell.pid)
    assert owner.get() == -signal.SIGTERM
    assert table.get(p.pid) is p and p.waitable     # not collected by the owner
    assert wait_status(table, p.pid, 0, owner=True) == -signal.SIGTERM   # again, at once
    parent, w = start_wait(table, p.pid, shell.pid)
    assert w is None and parent.get() == -signal.SIGTERM
    assert code_of(table.get, p.pid) == "ESRCH"


def test_the_owner_collects_orphans(table, hooks, shell, tmp_path):
    live = sleeper(table, tmp_path, shell.pid)
    dead = sh(table, tmp_path, "exit 6", shell.pid)
    hooks.wait_exit(dead.pid)                       # a zombie its parent never waits for
    owner, w = start_wait(table, live.pid, 0, owner=True)
    table.detach(shell.pid, 5)                      # the parent exits first
    assert live.ppid == 0 and dead.ppid == 0
    assert wait_status(table, dead.pid, 0, owner=True) == 6
    assert code_of(table.get, dead.pid) == "ESRCH"
    table.kill(live.pid, "KILL", caller=0, owner=True)
    assert owner.get() == KILLED
    assert code_of(table.get, live.pid) == "ESRCH"
    assert code_of(table.get, shell.pid) == "ESRCH"  # an attached orphan is freed at once
    assert table.procs() == []


def test_a_waiter_whose_caller_dies_gets_echild(table, shell, tmp_path):
    p = sleeper(table, tmp_path, shell.pid)
    r, w = start_wait(table, p.pid, shell.pid)
    table.detach(shell.pid, 0)                      # the shell went away mid-wait
    with pytest.raises(SyscallError) as e:
        r.get()
    assert e.value.code == "ECHILD" and p.ppid == 0
    assert table.cancel_wait(p.pid, w) is False     # it is gone already
    table.kill(p.pid, "KILL", caller=0, owner=True)
    assert wait_status(table, p.pid, 0, owner=True) == KILLED
    assert r.calls == 1                             # answered once only


def test_cancel_wait(table, shell, tmp_path):
    p = sleeper(table, tmp_path, shell.pid)
    r, w = start_wait(table, p.pid, shell.pid)
    assert table.cancel_wait(p.pid, w) is True
    assert table.cancel_wait(p.pid, w) is False
    assert table.cancel_wait(9999, w) is False
    table.kill(p.pid, "KILL", caller=shell.pid)
    assert wait_status(table, p.pid, shell.pid) == KILLED
    assert not r.done.is_set()                      # the cancelled waiter never hears


def orphan_exits(table, hooks, tmp_path, status):
    """A child of the kernel exits and nobody waits: a zombie kept for the owner."""
    p = sh(table, tmp_path, f"exit {status}")
    hooks.wait_exit(p.pid)
    return p


def test_max_orphans_frees_the_oldest(table, hooks, tmp_path, monkeypatch):
    monkeypatch.setattr(proc_mod, "MAX_ORPHANS", 3)
    ps = [orphan_exits(table, hooks, tmp_path, n) for n in range(5)]
    for p in ps[:2]:
        assert code_of(table.get, p.pid) == "ESRCH"
    assert [wait_status(table, p.pid, 0, owner=True) for p in ps[2:]] == [2, 3, 4]
    assert table.procs() == []


def test_max_orphans_counts_only_uncollected_ones(table, hooks, tmp_path, monkeypatch):
    monkeypatch.setattr(proc_mod, "MAX_ORPHANS", 2)
    kept = orphan_exits(table, hooks, tmp_path, 7)
    for n in range(3):                              # each collected by the owner at once
        p = orphan_exits(table, hooks, tmp_path, n)
        assert wait_status(table, p.pid, 0, owner=True) == n
    # Never more than two uncollected orphans: the first one is still there.
    assert wait_status(table, kept.pid, 0, owner=True) == 7


# ---- signals -------------------------------------------------------------------------

def test_kill_and_nice_permissions(table, hooks, shell, tmp_path):
    a = sleeper(table, tmp_path, shell.pid)
    b = sleeper(table, tmp_path, a.pid)
    stranger = table.attach("stranger")
    for target, caller in ((a, a), (b, a), (b, shell), (a, shell)):
        assert table.kill(target.pid, 0, caller=caller.pid) is True
        assert table.may_act(caller.pid, target.pid, owner=False)
        table.set_nice(target.pid, 3, caller.pid, owner=False)
    for target, caller in ((a, b), (shell, a), (a, stranger), (b, stranger)):
        assert code_of(table.kill, target.pid, "TERM", caller=caller.pid) == "EPERM"
        assert code_of(table.set_nice, target.pid, 1, caller.pid, False) == "EPERM"
        assert not table.may_act(caller.pid, target.pid, owner=False)
    assert code_of(table.kill, a.pid, "TERM", caller=0) == "EPERM"
    assert table.kill(a.pid, 0, caller=stranger.pid, owner=True) is True
    table.set_nice(a.pid, -2, stranger.pid, owner=True)
    assert (a.nice, b.nice) == (-2, 3)
    assert code_of(table.kill, 9999, "TERM", caller=0, owner=True) == "ESRCH"
    assert code_of(table.set_nice, 9999, 0, 0, True) == "ESRCH"
    assert code_of(table.kill, a.pid, "SEGV", caller=shell.pid) == "EINVAL"
    assert hooks.signals == []                      # kill 0 only probes
    assert os_gone(a.os_pid) is False and os_gone(b.os_pid) is False


GROUP = "sleep 60 & echo $!; wait"


def test_kill_reaches_the_whole_group(table, shell, tmp_path):
    p = sh(table, tmp_path, GROUP, shell.pid)
    grandchild = int(log_text(tmp_path, p.pid))
    assert os.getpgid(grandchild) == p.os_pid
    assert table.kill(p.pid, "KILL", caller=shell.pid) is True
    assert wait_status(table, p.pid, shell.pid) == KILLED
    until(lambda: os_gone(grandchild))


def test_stop_and_cont(table, hooks, shell, tmp_path):
    p = sleeper(table, tmp_path, shell.pid)
    p.requests[("peer", 1)] = 7
    ps = psutil.Process(p.os_pid)
    assert table.kill(p.pid, "STOP", caller=shell.pid) is True
    assert p.state is ProcState.STOPPED
    until(lambda: ps.status() == psutil.STATUS_STOPPED)
    assert table.kill(p.pid, "SIGCONT", caller=shell.pid) is True
    assert p.state is ProcState.SLEEPING
    until(lambda: ps.status() != psutil.STATUS_STOPPED)
    assert table.kill(p.pid, signal.SIGKILL, caller=shell.pid) is True
    assert hooks.wait_exit(p.pid)[:2] == (KILLED, [7])
    assert hooks.signals == [(p.pid, signal.SIGSTOP, [7], True),
                             (p.pid, signal.SIGCONT, [7], True),
                             (p.pid, signal.SIGKILL, [7], True)]
    assert table.kill(p.pid, "TERM", caller=shell.pid) is False    # a zombie: no-op
    assert table.kill(p.pid, 0, caller=shell.pid) is False
    assert len(hooks.signals) == 3


def test_signals_to_an_attached_process_reach_the_scheduler_only(table, hooks, shell):
    nb = table.attach("notebook", parent=shell.pid)
    assert table.kill(nb.pid, "STOP", caller=shell.pid) is True
    assert nb.state is ProcState.STOPPED
    assert table.kill(nb.pid, "CONT", caller=shell.pid) is True
    assert nb.state is ProcState.SLEEPING
    assert table.kill(nb.pid, "TERM", caller=shell.pid) is True
    assert nb.alive                                 # it ends by detaching, not by TERM
    assert [s[:2] for s in hooks.signals] == [(nb.pid, signal.SIGSTOP),
                                              (nb.pid, signal.SIGCONT),
                                              (nb.pid, signal.SIGTERM)]


def test_parse_signal():
    assert parse_signal("TERM") == parse_signal("SIGTERM") == parse_signal("sigterm") == 15
    assert parse_signal(15) == parse_signal("15") == signal.SIGTERM
    assert parse_signal("kill") == signal.SIGKILL and parse_signal("STOP") == signal.SIGSTOP
    assert parse_signal(0) == parse_signal("0") == 0
    for bad in ("FOO", "SEGV", signal.SIGSEGV, -1, "-9", None, 99, ""):
        assert code_of(parse_signal, bad) == "EINVAL", bad


# ---- attached processes --------------------------------------------------------------

def test_attach_and_detach(table, hooks, shell, tmp_path):
    nb = table.attach("notebook", parent=shell.pid)
    assert (nb.attached, nb.os_pid, nb.state, nb.ppid, nb.argv) == \
        (True, None, ProcState.SLEEPING, shell.pid, ["notebook"])
    assert table.by_token(nb.token) is nb
    table.detach(nb.pid, 4)
    assert hooks.wait_exit(nb.pid)[0] == 4
    table.detach(nb.pid, 9)                         # dead already: no-op
    assert wait_status(table, nb.pid, shell.pid) == 4
    assert code_of(table.detach, nb.pid) == "ESRCH"
    assert code_of(table.attach, "late", parent=nb.pid) == "ESRCH"
    p = sleeper(table, tmp_path, shell.pid)
    assert code_of(table.detach, p.pid, 0) == "EPERM"
    assert p.alive


def test_heartbeat_and_silent_reaping(table, hooks, shell):
    nb = table.attach("notebook", parent=shell.pid)
    assert table.reap_silent(timeout=60) == []
    nb.last_seen -= 120                             # as if silent for two minutes
    table.heartbeat(nb.pid)                         # ...but it just spoke
    assert table.reap_silent(timeout=60) == []
    nb.last_seen -= 120
    assert table.reap_silent(timeout=60) == [nb]
    assert hooks.wait_exit(nb.pid)[0] is None       # status unknown
    assert table.reap_silent(timeout=60) == []      # once only
    assert shell.alive                              # the shell was not silent that long
    assert wait_status(table, nb.pid, shell.pid) is None
    table.heartbeat(9999)                           # unknown pid: ignored


# ---- shutdown ------------------------------------------------------------------------

def test_shutdown_escalates_to_kill(make_table, tmp_path):
    hooks = Hooks()
    table = make_table(hooks)
    stubborn = sh(table, tmp_path, "trap '' TERM; " + SLEEPER)
    polite = sleeper(table, tmp_path)
    stopped = sleeper(table, tmp_path)
    log_text(tmp_path, stubborn.pid, "up\n")
    table.kill(stopped.pid, "STOP", caller=0, owner=True)
    table.shutdown(grace=0.5)
    assert [hooks.exits[p.pid][0] for p in (stubborn, polite, stopped)] == \
        [KILLED, -signal.SIGTERM, -signal.SIGTERM]
    assert all(os_gone(p.os_pid) for p in (stubborn, polite, stopped))
    assert code_of(table.spawn, ["/bin/true"], log_dir=tmp_path) == "EAGAIN"
    assert code_of(table.attach, "late") == "EAGAIN"


# ---- imports -------------------------------------------------------------------------

def test_module_imports_without_torch():
    code = "import sys, llmos.kernel.proc; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60)
    assert out.stdout.strip() == "False", out.stderr
