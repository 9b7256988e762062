"""Nothing a kernel starts outlives it (kernel/subreaper.py): a real kernel process, real
agents, real grandchildren. A SIGKILLed kernel takes its agents along, `llmos down`
(SIGTERM) leaves nothing behind and still gives agents their grace, a stray that exits
meanwhile is reaped, and exit statuses, pids and exec errors come through setpriv;
without setpriv, spawn still works and says so once."""
import logging
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time

import psutil
import pytest

from llmos.kernel import subreaper
from llmos.kernel.proc import ProcTable
from llmos.syscalls import Connection, Sys, SyscallError
from llmos.syscalls.home import Home, read_token

T = 60           # seconds: the bound on every wait here

# Starts a grandchild in a session of its own and one in its process group, says their
# pids, and exits: both are orphans.
PARENT_OF_STRAYS = textwrap.dedent("""
    import subprocess
    own = subprocess.Popen(["/bin/sleep", "600"], start_new_session=True)
    plain = subprocess.Popen(["/bin/sleep", "600"])
    print(own.pid, plain.pid, flush=True)
""")

# Says its pdeathsig, pid and whether it leads its process group; then exits with
# argv[1], or, given "sleep", waits for a signal.
REPORTER = textwrap.dedent("""
    import ctypes, os, sys, time
    sig = ctypes.c_int()
    ctypes.CDLL(None).prctl(2, ctypes.byref(sig), 0, 0, 0)      # PR_GET_PDEATHSIG
    print("pdeathsig", sig.value, "pid", os.getpid(), "leader", os.getpgid(0) == os.getpid(),
          flush=True)
    if sys.argv[1] == "sleep":
        time.sleep(600)
    sys.exit(int(sys.argv[1]))
""")

# Leaves SIGTERM a trace in its log: shows it got the signal, not a SIGKILL.
TERM_CATCHER = textwrap.dedent("""
    import signal, sys, time
    def bye(*_):
        print("got TERM", flush=True)
        sys.exit(0)
    signal.signal(signal.SIGTERM, bye)
    print("up", flush=True)
    time.sleep(600)
""")


def until(pred, what: str, timeout: float = T):
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, f"not reached in {timeout} s: {what}"
        time.sleep(0.05)


def gone(os_pid: int) -> bool:
    """Dead: no such process, or a zombie nobody has reaped yet (a dead kernel's child
    goes to init, which may take its time)."""
    try:
        return psutil.Process(os_pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def log_line(home: Home, pid: int) -> str:
    path = home.proc_log(pid)
    until(lambda: path.read_text().endswith("\n"), f"a line in {path}")
    return path.read_text()


class Kernel:
    """A real kernel on a short home in /tmp, and every OS pid a test saw under it."""

    def __init__(self):
        self.home = Home(tempfile.mkdtemp(prefix="llmos-", dir="/tmp"))
        self.proc = subprocess.Popen([sys.executable, "-m", "llmos.kernel", "--home",
                                      str(self.home.path), "--kv-memory", "16M"],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.seen: list[psutil.Process] = []      # killed at the end if still there
        ready, _, _ = select.select([self.proc.stdout], [], [], T)
        line = self.proc.stdout.readline() if ready else ""
        if "listening on" not in line:
            self.stop()
            shutil.rmtree(self.home.path, ignore_errors=True)
            raise AssertionError(f"kernel did not boot: {line!r}")
        self.c = self.connect()

    def connect(self) -> Connection:
        return Connection(self.home.socket_url, read_token(self.home), timeout=T)

    def spawn(self, *argv, name=None) -> int:
        pid = self.c.call(Sys.SPAWN, argv=list(argv), name=name)["pid"]
        self.see(self.os_pid(pid))
        return pid

    def see(self, os_pid: int) -> None:
        try:
            self.seen.append(psutil.Process(os_pid))
        except psutil.NoSuchProcess:
            pass

    def os_pid(self, pid: int) -> int:
        return next(p["os_pid"] for p in self.c.call(Sys.PS)["procs"] if p["pid"] == pid)

    def status(self, pid: int) -> int:
        r = self.c.call(Sys.WAIT, pid=pid, timeout=T)
        assert r["exited"], f"pid {pid} still running after {T} s"
        return r["status"]

    def children(self) -> list[psutil.Process]:
        return psutil.Process(self.proc.pid).children()

    def stop(self) -> None:
        """SIGTERM (as `llmos down`), then SIGKILL; then SIGKILL what is left of what the
        test saw."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(T)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(T)
        self.proc.stdout.close()
        for p in self.seen:
            try:
                p.kill()                  # psutil checks that the pid was not reused
            except psutil.Error:
                pass


def run_kernel():
    k = Kernel()
    try:
        yield k
    finally:
        k.c.close()
        k.stop()
        shutil.rmtree(k.home.path, ignore_errors=True)


kernel = pytest.fixture(run_kernel)                      # a test's own, which it may kill
shared_kernel = pytest.fixture(run_kernel, scope="module")


@pytest.fixture
def shared(shared_kernel):
    """The module's kernel, for tests that do not end it, on a connection of the test's
    own (a silent one is taken for dead after the heartbeat timeout)."""
    shared_kernel.c.close()
    shared_kernel.c = shared_kernel.connect()
    return shared_kernel


def test_an_agent_that_never_calls_dies_with_a_sigkilled_kernel(kernel):
    pid = kernel.spawn("/bin/sleep", "600", name="quiet")
    os_pid = kernel.os_pid(pid)
    until(lambda: psutil.Process(os_pid).cmdline() == ["/bin/sleep", "600"],
          "setpriv exec'd the agent in place")
    kernel.proc.kill()
    kernel.proc.wait(T)
    until(lambda: gone(os_pid), f"agent os pid {os_pid} dead")


def test_sigterm_leaves_no_stray_and_gives_agents_their_grace(kernel):
    parent = kernel.spawn(sys.executable, "-c", PARENT_OF_STRAYS, name="parent")
    catcher = kernel.spawn(sys.executable, "-c", TERM_CATCHER, name="catcher")
    assert kernel.status(parent) == 0
    strays = [int(w) for w in log_line(kernel.home, parent).split()]
    for s in strays:
        kernel.see(s)
    for s in strays:                       # orphans come to the kernel, not to init
        assert psutil.Process(s).ppid() == kernel.proc.pid
    assert log_line(kernel.home, catcher) == "up\n"

    kernel.proc.send_signal(signal.SIGTERM)                      # as `llmos down` does
    assert kernel.proc.wait(T) == 0
    for s in strays:
        until(lambda: gone(s), f"stray os pid {s} dead")
    # The agent got SIGTERM and its grace: not a SIGKILL when the I/O thread that
    # handled its spawn ended (pdeathsig follows the forking thread).
    assert kernel.home.proc_log(catcher).read_text() == "up\ngot TERM\n"


def test_a_stray_that_exits_while_the_kernel_runs_is_reaped(shared):
    parent = shared.spawn(sys.executable, "-c", PARENT_OF_STRAYS, name="parent")
    assert shared.status(parent) == 0
    strays = [int(w) for w in log_line(shared.home, parent).split()]
    for s in strays:
        shared.see(s)
    until(lambda: {c.pid for c in shared.children()} >= set(strays), "strays adopted")
    for s in strays:
        os.kill(s, signal.SIGKILL)
    until(lambda: not {c.pid for c in shared.children()} & set(strays), "strays reaped")

    def no_zombie():
        try:
            return all(c.status() != psutil.STATUS_ZOMBIE for c in shared.children())
        except psutil.NoSuchProcess:
            return False
    until(no_zombie, "no zombie child of the kernel")
    assert shared.proc.poll() is None


def test_exit_statuses_and_identity_come_through_setpriv(shared):
    quick = [shared.spawn(sys.executable, "-c", REPORTER, str(code)) for code in (0, 3)]
    sleeper = shared.spawn(sys.executable, "-c", REPORTER, "sleep")
    line = log_line(shared.home, sleeper).split()
    os_pid = shared.os_pid(sleeper)
    assert line == ["pdeathsig", str(int(signal.SIGKILL)), "pid", str(os_pid), "leader", "True"]
    agent = psutil.Process(os_pid)
    assert agent.ppid() == shared.proc.pid and agent.cmdline()[1:3] == ["-c", REPORTER]
    # Spawns race the periodic stray reaper here: a status it stole would read 0.
    shells = [shared.spawn("/bin/sh", "-c", "exit 3") for _ in range(40)]
    shared.c.call(Sys.KILL, pid=sleeper, sig="TERM")                # to its process group
    assert [shared.status(p) for p in (*quick, sleeper)] == [0, 3, -signal.SIGTERM]
    assert [shared.status(p) for p in shells] == [3] * 40
    for p in quick:
        assert log_line(shared.home, p).split()[:2] == ["pdeathsig", str(int(signal.SIGKILL))]
    # setpriv does the exec, yet a failed one is still the spawn's error, and the PATH
    # search is the same.
    assert shared.status(shared.spawn("true")) == 0
    for argv, code in ((["no-such-program-here"], "ENOENT"), (["/nonexistent/prog"], "ENOENT"),
                       ([os.path.dirname(sys.executable)], "EACCES")):
        with pytest.raises(SyscallError) as e:
            shared.c.call(Sys.SPAWN, argv=argv)
        assert e.value.code == code, argv


def test_without_setpriv_agents_start_and_the_log_says_so_once(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(subreaper, "SETPRIV", str(tmp_path / "no-setpriv"))
    subreaper.pdeathsig_prefix.cache_clear()
    table = ProcTable()
    try:
        with caplog.at_level(logging.INFO, logger="llmos.proc"):
            rows = [table.spawn([sys.executable, "-c", REPORTER, "3"], log_dir=tmp_path)
                    for _ in range(2)]
            until(lambda: not any(r.alive for r in rows), "both exited")
        assert [r.exit_status for r in rows] == [3, 3]
        for r in rows:
            assert (tmp_path / f"{r.pid}.log").read_text().split()[:2] == ["pdeathsig", "0"]
        said = [m for m in caplog.messages if "--pdeathsig" in m]
        assert len(said) == 1 and said[0].startswith(f"no {tmp_path / 'no-setpriv'} with")
    finally:
        table.shutdown(grace=2)
        subreaper.pdeathsig_prefix.cache_clear()      # the next spawn probes the real one
