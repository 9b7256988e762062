"""Nothing the kernel starts outlives it: neither its agents nor what they leave behind.

Three ways a process could be left behind, and what stops each:

  an agent, when the kernel     popen() starts it through util-linux `setpriv --pdeathsig
  is SIGKILLed                  KILL -- argv`: setpriv sets PR_SET_PDEATHSIG and execs the
                                agent (same pid, process group, pidfd and exit status), so
                                the OS kills it when its parent dies. (No preexec_fn: it is
                                unsafe in a threaded process.) Without a setpriv that knows
                                --pdeathsig, the kernel log says so once and agents go without.
  a descendant whose parent     boot makes the kernel a child subreaper: orphans below it
  exited (setsid or not)        (PR_SET_CHILD_SUBREAPER) come to it, not to init, and
                                reap_strays() collects them when they exit.
  anything alive at shutdown    kill_descendants(): SIGTERM, a grace, SIGKILL, reaped.

PR_SET_PDEATHSIG fires when the *thread* that forked the child exits, not the process.
The agents' natural forker, the I/O thread, ends in server.close(), one step before
procs.shutdown() gives the agents SIGTERM and a grace: forked there, every agent would
be SIGKILLed at every clean shutdown. So all of them are forked on one thread of this
module, whose life is the process's (an idle ThreadPoolExecutor worker; it leaves at
interpreter exit, after boot() has returned and the agents are gone).

reap_strays() never waits for "any child": waitpid(-1) would steal the process table's
children from their Popen objects, which reap them. It waits only for a child that is
(a) not a live row of the table (`births`, held from a fork until the table knows the
pid, closes the gap between the two), and (b) not in the kernel's own session: every
agent starts a session of its own, so a child in ours was forked by a library inside
the kernel, which will wait for it itself.

Limits: a grandchild of an agent outlives a SIGKILLed kernel (it goes to init: pdeathsig
is not inherited); an agent that execs a set-user-ID program loses its pdeathsig; a
kernel killed between a fork and setpriv's prctl leaves that one agent.
"""
from __future__ import annotations

import ctypes
import errno
import functools
import logging
import os
import signal
import stat
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import psutil

log = logging.getLogger("llmos.proc")

SETPRIV = "/usr/bin/setpriv"   # util-linux; a fixed path: $PATH must not choose what root runs
REAP_PERIOD = 1.0              # s between reap_strays() runs: how long an exited stray stays a zombie
KILL_WAIT = 5.0                # s kill_descendants() waits for the dead after SIGKILL
PR_SET_CHILD_SUBREAPER = 36    # <linux/prctl.h>

births = threading.Lock()      # held from popen() until the table has the child's os pid
_forker = ThreadPoolExecutor(1, "llmos-fork")   # forks every agent; lives as long as we do


def become_subreaper() -> bool:
    """Make this process the reaper of its orphaned descendants. False (and a log line)
    where the OS cannot: then an orphan goes to init, and shutdown cannot find it."""
    if not sys.platform.startswith("linux"):
        log.info("not Linux: orphaned descendants of agents go to init, not to the kernel")
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        log.warning("prctl(PR_SET_CHILD_SUBREAPER): %s; orphans go to init",
                    os.strerror(ctypes.get_errno()))
        return False
    return True


@functools.cache
def pdeathsig_prefix() -> tuple[str, ...]:
    """The argv prefix that makes an agent die with its parent, or () if this machine has
    no setpriv that knows --pdeathsig (util-linux 2.33+); either is logged, once."""
    try:
        usage = subprocess.run([SETPRIV, "--help"], capture_output=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        usage = b""
    if b"--pdeathsig" not in usage:
        log.warning("no %s with --pdeathsig: spawned processes will outlive a SIGKILLed "
                    "kernel (install util-linux 2.33 or later)", SETPRIV)
        return ()
    log.info("spawned processes die with the kernel (%s --pdeathsig KILL)", SETPRIV)
    return (SETPRIV, "--pdeathsig", "KILL", "--")


def popen(argv: list[str], user=None, **kw) -> subprocess.Popen:
    """subprocess.Popen(argv, **kw), started so that it dies with this process; with user
    (an AgentUser, kernel/agentuser.py), as that user in its cwd. The caller holds
    `births` until its table knows the pid. Raises what Popen raises, including the
    OSError of a failed exec of argv[0] (ENOENT, EACCES, ...) though setpriv does the exec."""
    prefix = pdeathsig_prefix()
    if user is not None:       # one setpriv: it changes the uid, then sets the death signal
        prefix = (SETPRIV, *user.setpriv_opts, *(prefix[1:] or ("--",)))
        kw["cwd"] = user.cwd
    if prefix:
        check_exec(argv[0], kw.get("env"))
    return _forker.submit(subprocess.Popen, [*prefix, *argv], **kw).result()


def check_exec(prog: str, env: dict | None) -> None:
    """Raise the OSError that exec of prog would (searching env's PATH as execvp does):
    FileNotFoundError, PermissionError (not an executable regular file), ValueError (NUL)."""
    paths = [prog] if os.path.dirname(prog) else [os.path.join(d, prog)
                                                   for d in os.get_exec_path(env)]
    denied = None
    for path in paths:
        try:
            st = os.stat(path)
        except (FileNotFoundError, NotADirectoryError):
            continue
        if stat.S_ISREG(st.st_mode) and os.access(path, os.X_OK):
            return
        denied = denied or path
    if denied:
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), denied)
    raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), prog)


def adopt(procs, timers) -> None:
    """Boot, before any spawn: become the subreaper of every descendant, reap strays every
    REAP_PERIOD on the timer thread, and log whether agents die with the kernel."""
    if become_subreaper():
        timers.every(REAP_PERIOD, functools.partial(reap_strays, procs))
    pdeathsig_prefix()


def reap_strays(procs) -> int:
    """Reap every exited child that is neither a live row of procs (its Popen reaps it)
    nor in our session (a library's, which waits for it); return how many."""
    reaped = 0
    with births:
        with procs.lock:
            table = {p.os_pid for p in procs.procs() if p.alive and p.os_pid}
        ours = os.getsid(0)
        for child in _children(recursive=False):
            try:
                if child.pid in table or os.getsid(child.pid) == ours:
                    continue
                pid, status = os.waitpid(child.pid, os.WNOHANG)
            except (ProcessLookupError, ChildProcessError):
                continue
            if pid:
                reaped += 1
                log.info("os pid %d: a stray descendant, exited with status %d; reaped",
                         pid, os.waitstatus_to_exitcode(status))
    return reaped


def kill_descendants(procs, grace: float) -> None:
    """Shutdown, after procs.shutdown(): SIGTERM (and SIGCONT, so a stopped one acts on it)
    to every live descendant, up to grace seconds for them to exit, then SIGKILL; the
    strays among them are reaped."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, KILL_WAIT)):
        left = _live_descendants()
        if not left:
            break
        log.info("shutdown: SIG%s to %d processes left behind: os pids %s",
                 signal.Signals(sig).name[3:], len(left), " ".join(str(p.pid) for p in left))
        for p in left:
            for s in (sig, signal.SIGCONT) if sig == signal.SIGTERM else (sig,):
                try:
                    p.send_signal(s)
                except psutil.Error:
                    pass
        deadline = time.monotonic() + wait
        while _live_descendants() and time.monotonic() < deadline:
            reap_strays(procs)
            time.sleep(0.05)
    reap_strays(procs)
    if left := _live_descendants():
        log.warning("shutdown: os pids %s survived SIGKILL", " ".join(str(p.pid) for p in left))


def _children(recursive: bool) -> list[psutil.Process]:
    try:
        return psutil.Process().children(recursive=recursive)
    except psutil.Error:
        return []


def _live_descendants() -> list[psutil.Process]:
    live = []
    for p in _children(recursive=True):
        try:
            if p.status() != psutil.STATUS_ZOMBIE:
                live.append(p)
        except psutil.Error:
            pass
    return live
