"""Agents under another uid (kernel/agentuser.py, `llmos up --agent-user USER`): a real
kernel running as root starts its agents as `nobody`; they reach the socket and nothing
else of the kernel's. The real-kernel test needs root, setpriv and a `nobody` user."""
from __future__ import annotations

import json
import os
import pwd
import signal
import stat
import subprocess
import sys
import textwrap
import time

import pytest

from llmos.kernel import agentuser, boot
from llmos.kernel.subreaper import SETPRIV
from llmos.syscalls import Connection, Sys
from llmos.syscalls.home import Home, read_token
from tests.kernels import ROOT, running_kernel, short_home

T = 60


def _nobody():
    try:
        return pwd.getpwnam("nobody")
    except KeyError:
        return None


NOBODY = _nobody()
as_root = pytest.mark.skipif(os.geteuid() != 0 or NOBODY is None
                             or not os.access(SETPRIV, os.X_OK),
                             reason="needs root, util-linux setpriv and a user nobody")


def test_a_kernel_not_running_as_root_refuses_the_option(monkeypatch, capsys):
    monkeypatch.setattr(agentuser.os, "geteuid", lambda: 1000)
    assert boot.main(["--home", "/nonexistent/llmos", "--agent-user", "nobody"]) == 2
    assert "only a kernel running as root can start agents as another user" in \
        capsys.readouterr().err


@as_root
def test_an_unknown_user_root_and_an_unreachable_home_are_refused(capsys):
    assert boot.main(["--home", "/nonexistent/llmos", "--agent-user", "no-such-user-x"]) == 2
    assert "--agent-user no-such-user-x: no such user" in capsys.readouterr().err
    with pytest.raises(ValueError, match="uid 0 isolates nothing"):
        agentuser.lookup("root", "/tmp/llmos-home")
    private = short_home()                       # 0700, root's: nobody may not search it
    try:
        with pytest.raises(ValueError, match=f"nobody may not search {private},"):
            agentuser.lookup("nobody", os.path.join(private, "home"))
    finally:
        os.rmdir(private)


AGENT = textwrap.dedent("""
    import ctypes, errno, json, os, sys
    from llmos.userland import connect
    token, kernel, sibling = sys.argv[1:4]
    k = connect()
    r = k.generate("12+47=", max_tokens=4)

    def tries(path):
        try:
            with open(path, "rb") as f:
                f.read(1)
            return "read"
        except OSError as e:
            return errno.errorcode[e.errno]

    sig = ctypes.c_int()
    ctypes.CDLL(None).prctl(2, ctypes.byref(sig), 0, 0, 0)        # PR_GET_PDEATHSIG
    print(json.dumps({"uid": os.getuid(), "gid": os.getgid(), "pid": k.pid, "text": r.text,
                      "cwd": os.getcwd(), "pdeathsig": sig.value, "token": tries(token),
                      "kernel environ": tries(f"/proc/{kernel}/environ"),
                      "kernel mem": tries(f"/proc/{kernel}/mem"),
                      "sibling environ": tries(f"/proc/{sibling}/environ"),
                      "root's secret": os.environ.get("ROOT_SECRET"),
                      "home": os.environ.get("HOME"), "user": os.environ.get("USER")}))
""")
SIBLING = textwrap.dedent("""
    import time
    from llmos.userland import connect
    print(connect().pid, flush=True)
    time.sleep(60)
""")


def _nobody_runs_this_python() -> bool:
    """nobody may run this interpreter and import llmos (not kept where only root enters)."""
    run = subprocess.run([SETPRIV, "--reuid", str(NOBODY.pw_uid), "--regid", str(NOBODY.pw_gid),
                          "--init-groups", sys.executable, "-c", "import llmos.userland"],
                         cwd="/", capture_output=True, timeout=T)
    return run.returncode == 0


@as_root
def test_agents_run_as_the_agent_user_and_reach_only_the_socket():
    if not _nobody_runs_this_python():
        pytest.skip(f"nobody may not run {sys.executable}")
    with running_kernel("--agent-user", "nobody", env={"ROOT_SECRET": "s3cret"}) as (path, kernel):
        home = Home(path)
        c = Connection(home.socket_url, read_token(home), timeout=T)
        info = c.call(Sys.SYSINFO)
        assert (info["agent_user"], info["isolation"]) == ("nobody", "uid")
        sock, run = os.stat(home.socket_path), os.stat(home.run_dir)
        assert (sock.st_uid, sock.st_gid, stat.S_IMODE(sock.st_mode)) == (0, NOBODY.pw_gid, 0o660)
        assert stat.S_IMODE(run.st_mode) == 0o711
        assert stat.S_IMODE(os.stat(home.token_path).st_mode) == 0o600
        sibling = c.call(Sys.SPAWN, argv=[sys.executable, "-c", SIBLING])["pid"]
        deadline = time.monotonic() + T
        while home.proc_log(sibling).read_text().strip() != str(sibling):
            assert time.monotonic() < deadline, home.proc_log(sibling).read_text()
            time.sleep(0.05)
        sibling_os = next(r["os_pid"] for r in c.call(Sys.PS)["procs"] if r["pid"] == sibling)
        pid = c.call(Sys.SPAWN, argv=[sys.executable, "-c", AGENT, str(home.token_path),
                                      str(kernel.pid), str(sibling_os)])["pid"]
        assert c.call(Sys.WAIT, pid=pid, timeout=T)["status"] == 0, home.proc_log(pid).read_text()
        seen = json.loads(home.proc_log(pid).read_text())
        c.call(Sys.KILL, pid=sibling, sig="KILL")
        c.close()
    user = agentuser.lookup("nobody", "/tmp/llmos-home")
    assert "59" in seen.pop("text")
    assert seen == {"uid": NOBODY.pw_uid, "gid": NOBODY.pw_gid, "pid": pid,
                    "cwd": "/" if user.blocker(ROOT) else str(ROOT),
                    "pdeathsig": signal.SIGKILL,     # kept across setpriv's change of uid
                    "token": "EACCES", "kernel environ": "EACCES", "kernel mem": "EACCES",
                    "sibling environ": "EACCES",     # the sibling made itself non-dumpable
                    "root's secret": None,           # root's environment stays out...
                    "home": NOBODY.pw_dir, "user": "nobody"}     # ...the user's is there
