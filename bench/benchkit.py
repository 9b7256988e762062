"""Helpers shared by the benchmarks (agent_workload.py, fairness.py, oversubscribe.py,
gateway.py): boot a kernel on a short temp home and always stop it, start an HTTP server
and stop its whole process group, CPU used by process groups, percentiles, and the
"goal met / not met" cell. Not a benchmark itself.

A kernel's stdout and stderr go to a file in its temp dir (never a pipe nobody reads), the
boot waits for its "listening on" line, and `kernel()` stops it (SIGTERM, then SIGKILL)
and removes the home however the block is left.
"""
from __future__ import annotations

import contextlib
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BOOT_TIMEOUT = 120     # s: a 2-core box running other work can take tens of seconds
STOP_TIMEOUT = 30      # s after SIGTERM before SIGKILL


class BootFailed(RuntimeError):
    pass


def kernel_help() -> str:
    """`python -m llmos.kernel --help`, to see which flags this tree's kernel has."""
    out = subprocess.run([sys.executable, "-m", "llmos.kernel", "--help"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    return out.stdout


def has_flag(flag: str, help_text: str | None = None) -> bool:
    return flag in (help_text if help_text is not None else kernel_help()).split()


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(STOP_TIMEOUT)


@contextlib.contextmanager
def kernel(*args: str, env: dict | None = None, label: str = "kernel", threads: int | None = 1):
    """Boot `python -m llmos.kernel --home TMP ARGS...`; yield (home path, Popen). Its output
    is in TMP/kernel.out. Stopped and removed on leaving. Raises BootFailed with its output.

    threads: OMP_NUM_THREADS of the kernel (None: torch's default, one per core). On a
    2-core box that other jobs share, torch's 2 OpenMP threads wait on each other at every
    op whenever one is descheduled: the tiny model's steps ran 10-30x slower and varied as
    much from run to run; with 1 thread they are steady, hence the default."""
    tmp = Path(tempfile.mkdtemp(prefix="lb-", dir="/tmp"))     # short: a unix socket path
    home = tmp / "h"
    out_path = tmp / "kernel.out"
    clean = {k: v for k, v in os.environ.items() if not k.startswith("LLMOS_")}
    if threads is not None:
        clean["OMP_NUM_THREADS"] = str(threads)
    argv = [sys.executable, "-m", "llmos.kernel", "--home", str(home), *args]
    proc = None
    try:
        with open(out_path, "w") as out:
            proc = subprocess.Popen(argv, cwd=ROOT, env={**clean, **(env or {})},
                                    stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + BOOT_TIMEOUT
        while "listening on" not in out_path.read_text():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise BootFailed(f"{label} did not boot ({' '.join(args)}): "
                                 f"{out_path.read_text()[-2000:]!r}")
            time.sleep(0.1)
        yield home, proc
    finally:
        if proc is not None:
            _stop(proc)
            crashed = proc.returncode not in (0, -signal.SIGTERM, None)
            if crashed:
                print(f"  !! {label} exited with status {proc.returncode}: "
                      f"{out_path.read_text()[-1500:]}", flush=True)
        shutil.rmtree(tmp, ignore_errors=True)


def kernel_log_tail(home: Path, n: int = 30) -> str:
    try:
        return "\n".join((Path(home) / "log" / "kernel.log").read_text().splitlines()[-n:])
    except OSError:
        return ""


def percentile(xs, q: float) -> float:
    """The q-th percentile (0..100), nearest rank; nan for no data."""
    xs = sorted(xs)
    if not xs:
        return math.nan
    k = max(0, min(len(xs) - 1, math.ceil(q / 100 * len(xs)) - 1))
    return xs[k]


def mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else math.nan


def goal(ok: bool | None) -> str:
    return "n/a" if ok is None else "[green]met[/green]" if ok else "[red]not met[/red]"


def load_line() -> str:
    """One line on what else the machine is doing (the load average and busy processes)."""
    la = os.getloadavg()
    try:
        top = subprocess.run(["top", "-bn2", "-d", "0.5", "-c", "-w", "200"], capture_output=True,
                             text=True, timeout=20).stdout.splitlines()
        last = max(i for i, r in enumerate(top) if r.lstrip().startswith("PID"))
        rows = [r.split(None, 11) for r in top[last + 1:]]
        busy = [f"{r[0]} {r[11][:60]} ({r[8]}%)" for r in rows if len(r) == 12 and _num(r[8]) >= 10
                and int(r[0]) != os.getpid()]
    except (OSError, subprocess.SubprocessError):
        busy = []
    return (f"load {la[0]:.2f} {la[1]:.2f} {la[2]:.2f}; busy: {', '.join(busy) or 'none'}")


def _num(s: str) -> float:
    try:
        return float(s)
    except ValueError:
        return 0.0


def close_all(conns) -> None:
    """Close every connection; one that fails to close does not stop the others."""
    for c in conns:
        try:
            c.close()
        except Exception:       # noqa: BLE001 — a benchmark's cleanup must go on
            pass


def group_cpu(pgids) -> float:
    """CPU seconds (user + system) used so far by the live processes of these process
    groups (a kernel or server started in a session of its own: its pid)."""
    tick, total = os.sysconf("SC_CLK_TCK"), 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue                     # gone meanwhile
        if int(fields[2]) in pgids:      # fields: state ppid pgrp ... utime(11) stime(12)
            total += int(fields[11]) + int(fields[12])
    return total / tick


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def http_server(argv: list[str], health_url: str, log: Path, *, env: dict | None = None,
                timeout: float = BOOT_TIMEOUT, label: str = "server"):
    """Start argv (output to `log`) in a session of its own; yield its Popen once GET
    health_url answers 200. On leaving, the whole process group (a server's workers too)
    gets SIGTERM, then SIGKILL. Raises BootFailed with the log's tail if it exits or does
    not answer within `timeout` s."""
    proc = None
    try:
        with open(log, "w") as out:
            proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdin=subprocess.DEVNULL,
                                    stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while not _answers(health_url):
            if proc.poll() is not None or time.monotonic() > deadline:
                why = (f"exited with status {proc.returncode}" if proc.poll() is not None
                       else f"no answer from {health_url} in {timeout:.0f} s")
                raise BootFailed(f"{label} {why}: {log.read_text()[-1500:]}")
            time.sleep(0.5)
        yield proc
    finally:
        if proc is not None:
            _stop_group(proc)


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status == 200
    except (OSError, ValueError):
        return False


def _stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM to proc's process group; SIGKILL to whatever of it is left after STOP_TIMEOUT."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT
    while _group_alive(proc) and time.monotonic() < deadline:
        time.sleep(0.2)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(STOP_TIMEOUT)


def _group_alive(proc: subprocess.Popen) -> bool:
    if proc.poll() is None:
        return True
    try:
        os.killpg(proc.pid, 0)
        return True
    except ProcessLookupError:
        return False
