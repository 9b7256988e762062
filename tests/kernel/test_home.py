"""The kernel's home: layout (syscalls/home.py), the kernel's claim on it (kernel/home.py):
modes, the pid-file lock, stale takeover, the token for clients, and the homes it refuses
(not ours alone, a symlink planted in run/)."""
from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from llmos.kernel.home import HomeLock
from llmos.syscalls.home import Home, HomeError, NoKernel, read_token

# A second kernel, in another process: claim the home (no torch loaded), say so, hold the
# lock until stdin closes.
HOLDER = """
import sys
from llmos.kernel.home import HomeLock
from llmos.syscalls.home import Home
lock = HomeLock(Home(sys.argv[1])); lock.acquire()
print("locked", "torch" in sys.modules, flush=True)
sys.stdin.read()
lock.release()
"""


def claim(path) -> HomeLock:
    return HomeLock(Home(path))


def mode(p: Path) -> int:
    return stat.S_IMODE(os.stat(p).st_mode)


@pytest.fixture
def holder(tmp_path):
    """A subprocess holding the lock on tmp_path/h; stopped at the end."""
    procs = []

    def start(path):
        p = subprocess.Popen([sys.executable, "-c", HOLDER, str(path)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
        procs.append(p)
        assert p.stdout.readline().split() == ["locked", "False"]   # home.py imports alone
        return p

    yield start
    for p in procs:
        p.stdin.close()
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(timeout=10)


def test_layout_modes_and_release(tmp_path):
    h = Home(tmp_path / "h")
    lock = HomeLock(h)
    token = lock.acquire()
    try:
        assert len(token) == 64 and int(token, 16) >= 0
        assert mode(h.run_dir) == 0o700 and mode(h.log_dir) == 0o700
        assert mode(h.token_path) == 0o600
        assert h.pid_path.read_text().strip() == str(os.getpid())
        assert h.socket_path == h.path / "run" / "kernel.sock"
        assert h.kernel_log == h.path / "log" / "kernel.log"
        assert h.proc_log(7) == h.path / "log" / "7.log"
        assert h.socket_url == f"ipc://{h.socket_path}"
        assert read_token(h.path) == token and read_token(Home(h.path)) == token
        assert Home(h.path).running_pid() == os.getpid()
        h.socket_path.write_text("")                 # stands for the bound socket
    finally:
        lock.release()
    assert not h.pid_path.exists() and not h.token_path.exists()
    assert not h.socket_path.exists()
    assert Home(h.path).running_pid() is None
    with pytest.raises(NoKernel, match="no llmos kernel is running"):
        read_token(h.path)
    lock.release()                                   # idempotent


def test_token_regenerated_at_each_boot(tmp_path):
    lock = claim(tmp_path / "h")
    first = lock.acquire()
    lock.release()
    assert lock.acquire() != first
    lock.release()


def test_second_kernel_in_another_process_refused_naming_pid(tmp_path, holder):
    path = tmp_path / "h"
    other = holder(path)
    with pytest.raises(HomeError, match=f"already running .*pid {other.pid}"):
        claim(path).acquire()
    assert Home(path).running_pid() == other.pid
    assert len(read_token(path)) == 64               # a client finds the other kernel's token
    other.stdin.close()
    assert other.wait(timeout=10) == 0
    lock = claim(path)
    lock.acquire()                                   # free again once it released
    lock.release()


def test_second_acquire_in_same_process_refused(tmp_path):
    lock = claim(tmp_path / "h")
    lock.acquire()
    try:
        with pytest.raises(HomeError, match=f"pid {os.getpid()}"):
            claim(tmp_path / "h").acquire()
        with pytest.raises(HomeError, match="already acquired"):
            lock.acquire()
    finally:
        lock.release()


def test_stale_pid_file_taken_over(tmp_path):
    h = Home(tmp_path / "h")
    h.run_dir.mkdir(parents=True, mode=0o700)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait(timeout=10)
    h.pid_path.write_text(f"{dead.pid}\n")           # a kernel that died without release()
    h.token_path.write_text("old\n")
    h.socket_path.write_text("")
    assert h.running_pid() is None
    with pytest.raises(NoKernel):
        read_token(h.path)
    lock = HomeLock(h)
    token = lock.acquire()
    try:
        assert h.pid_path.read_text().strip() == str(os.getpid())
        assert not h.socket_path.exists()
        assert read_token(h.path) == token != "old"
    finally:
        lock.release()


def test_loose_run_dir_fixed_foreign_or_odd_refused(tmp_path, monkeypatch):
    h = Home(tmp_path / "h")
    h.run_dir.mkdir(parents=True, mode=0o755)
    os.chmod(h.run_dir, 0o755)
    lock = HomeLock(h)
    lock.acquire()
    lock.release()
    assert mode(h.run_dir) == 0o700

    real_uid = os.getuid()
    monkeypatch.setattr(os, "getuid", lambda: real_uid + 4242)   # as if another user owned it
    with pytest.raises(HomeError, match="owned by uid"):
        claim(h.path).acquire()
    monkeypatch.undo()

    odd = Home(tmp_path / "odd")
    odd.path.mkdir()
    (odd.path / "elsewhere").mkdir()
    os.symlink(odd.path / "elsewhere", odd.run_dir)
    with pytest.raises(HomeError, match="not a directory"):
        HomeLock(odd).acquire()


def test_a_home_not_ours_alone_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    h = Home(tmp_path / "h")
    h.path.mkdir(mode=0o700)
    at = "^" + re.escape(str(h.path))
    real_uid = os.getuid()
    monkeypatch.setattr(os, "getuid", lambda: real_uid + 4242)   # as if another user owned it
    with pytest.raises(HomeError, match=f"{at}: owned by uid {real_uid}, not by us"):
        claim(h.path).acquire()
    monkeypatch.undo()
    for loose in (0o777, 0o775, 0o757, 0o1777):
        os.chmod(h.path, loose)
        with pytest.raises(HomeError, match=f"{at}: mode {loose:04o} lets group or others write"):
            claim(h.path).acquire()
        assert os.listdir(h.path) == []          # refused before run/ or log/ was made
    os.chmod(h.path, 0o755)                      # others may look, not write: fine
    lock = claim(h.path)
    lock.acquire()
    lock.release()
    if real_uid == 0:                            # a run/ really someone else's (root may chown)
        os.chown(h.run_dir, 4242, 4242)
        with pytest.raises(HomeError, match=f"^{re.escape(str(h.run_dir))}: owned by uid 4242"):
            claim(h.path).acquire()


@pytest.mark.parametrize("name", ["kernel.pid", "token"])
def test_a_symlink_planted_in_run_is_refused_and_its_target_untouched(tmp_path, name):
    for target in (tmp_path / "victim", tmp_path / "absent"):
        h = Home(tmp_path / f"h-{target.name}")
        h.run_dir.mkdir(parents=True, mode=0o700)
        if target.name == "victim":
            target.write_text("precious\n")
        (h.run_dir / name).symlink_to(target)
        with pytest.raises(HomeError, match=re.escape(f"{h.run_dir / name}: is a symlink")):
            claim(h.path).acquire()
        if target.name == "victim":
            assert target.read_text() == "precious\n"
        else:
            assert not target.exists()           # not created through a dangling link
        assert h.running_pid() is None           # no lock left behind


def test_socket_path_too_long_refused(tmp_path):
    with pytest.raises(HomeError, match="too long"):
        claim(tmp_path / ("x" * 120)).acquire()


def test_read_token_without_home(tmp_path):
    with pytest.raises(NoKernel, match=str(tmp_path / "nothing")):
        read_token(tmp_path / "nothing")


def test_resolution_order(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMOS_HOME", str(tmp_path / "env"))
    assert Home(tmp_path / "arg").path == tmp_path / "arg"
    assert Home().path == tmp_path / "env"
    monkeypatch.delenv("LLMOS_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    assert Home().path == tmp_path / "user" / ".llmos"
    assert Home("~/x").path == tmp_path / "user" / "x"
    monkeypatch.chdir(tmp_path)
    assert Home("rel").path == tmp_path / "rel"       # absolute, whatever the cwd later is
