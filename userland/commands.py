"""The client commands of `llmos`: run, ps, kill, wait, logs, mem, models.

Each talks to a running kernel through the SDK (attaching with the owner token of
--home), so each stays light: no torch, no kernel engine. Any syscall error, or no
kernel at all, is one line on stderr and exit status 1, never a traceback.
"""
from __future__ import annotations

import functools
import os
import sys
import threading
import time

import click

HOME_HELP = "The kernel's home (default: $LLMOS_HOME, else ~/.llmos)."
FOLLOW_POLL = 0.1         # seconds between reads of a followed log
ALIVE_POLL = 1.0          # seconds between `logs -f` checks that the process still runs


def client(fn):
    """Add --home to a command and turn SDK errors into a one-line error (exit 1)."""
    @click.option("--home", default=None, help=HOME_HELP)
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from llmos.userland.sdk import KernelNotRunning, SyscallError
        try:
            return fn(*args, **kwargs)
        except KernelNotRunning as e:
            raise click.ClickException(e.msg) from None
        except SyscallError as e:
            raise click.ClickException(f"{e.code}: {e.msg}" if e.msg else e.code) from None
    return wrapper


def _connect(home):
    from llmos.userland.sdk import connect
    return connect(home)


def _exit_code(status) -> int:
    """A shell's exit code for a process status: 128+N when killed by signal N."""
    if status is None:
        return 1
    if status < 0:
        return 128 - status
    return status if status <= 255 else 1


def _argv(program: str, args) -> list[str]:
    """A .py program runs with this Python; a path is made absolute (the kernel's cwd differs)."""
    if os.sep in program and os.path.exists(program):
        program = os.path.abspath(program)
    if program.endswith(".py"):
        return [sys.executable, program, *args]
    return [program, *args]


def _copy_new(f, out) -> bool:
    """Copy what was appended to f since the last call; True if anything was."""
    data = f.read()
    if data:
        out.write(data)
        out.flush()
    return bool(data)


@click.command(context_settings={"ignore_unknown_options": True,
                                 "allow_interspersed_args": False})
@click.option("-d", "--detach", is_flag=True, help="Print the pid and return at once.")
@click.option("--name", default=None, help="Process name shown by ps.")
@click.option("--nice", default=None, type=click.IntRange(-20, 19), help="Nice value.")
@click.option("-m", "--module", is_flag=True, help="PROGRAM is a Python module (python -m).")
@click.argument("program")
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
@client
def run(program, args, detach, name, nice, module, home) -> None:
    """Run PROGRAM [ARGS...] as an llmos process (a .py file or -m module runs with this Python).

    Follows its output and exits with its status; Ctrl-C sends it INT (twice: KILL).
    """
    k = _connect(home)
    argv = [sys.executable, "-m", program, *args] if module else _argv(program, args)
    pid = k.spawn(argv, name=name or os.path.basename(program), nice=nice)
    if detach:
        click.echo(pid)
        return
    outcome: dict = {}

    def waiter():
        try:
            outcome["status"] = k.wait(pid)
        except Exception as e:        # handed to the main thread
            outcome["error"] = e
    t = threading.Thread(target=waiter, name=f"wait {pid}", daemon=True)
    t.start()
    _follow(k, pid, t)
    if "error" in outcome:
        raise outcome["error"]
    sys.exit(_exit_code(outcome["status"]))


def _follow(k, pid: int, waiter: threading.Thread) -> None:
    """Copy pid's log to stdout until waiter ends (then the rest of it)."""
    path, f, interrupts = k.log_path(pid), None, 0
    try:
        while True:
            try:
                done = not waiter.is_alive()
                if f is None and path is not None and path.exists():
                    f = open(path, "rb")
                if f is not None:
                    _copy_new(f, sys.stdout.buffer)
                if done:
                    return
                waiter.join(FOLLOW_POLL)
            except KeyboardInterrupt:
                interrupts += 1
                sig = "INT" if interrupts == 1 else "KILL"
                click.echo(f"\n[llmos: sending {sig} to pid {pid}]", err=True)
                k.kill(pid, sig)
    finally:
        if f is not None:
            f.close()


@click.command()
@client
def ps(home) -> None:
    """List the kernel's processes."""
    from rich.console import Console
    Console().print(ps_table(_connect(home).ps()))


def ps_table(procs: list[dict]):
    """ps rows as a rich Table (also the live table of `llmos demo`)."""
    from rich.table import Table
    table = Table(box=None, header_style="bold")
    cols = ("PID", "PPID", "NAME", "STATE", "NI", "KV", "TOK IN", "TOK OUT", "CPU%", "RSS",
            "AGE", "OS PID")
    for c in cols:
        table.add_column(c, justify="left" if c in ("NAME", "STATE") else "right")
    for p in procs:
        table.add_row(*map(str, (p.get("pid"), p.get("ppid"))), str(p.get("name", "")),
                      str(p.get("state", "")), str(p.get("nice", "")), str(p.get("kv_blocks", "")),
                      str(p.get("tokens_in", "")), str(p.get("tokens_out", "")),
                      f"{p.get('cpu_percent') or 0:.1f}", _bytes(p.get("rss")),
                      _duration(p.get("age")), str(p.get("os_pid") or "-"))
    return table


@click.command()
@click.option("-s", "--signal", "sig", default="TERM", show_default=True,
              help="TERM, KILL, INT, STOP or CONT (name or number).")
@click.argument("pids", metavar="PID...", nargs=-1, type=int, required=True)
@client
def kill(sig, pids, home) -> None:
    """Send a signal to processes."""
    k = _connect(home)
    for pid in pids:
        k.kill(pid, int(sig) if sig.isdigit() else sig)


@click.command()
@click.option("--timeout", "-t", default=None, type=float, help="Give up after this many seconds.")
@click.argument("pid", type=int)
@client
def wait(pid, timeout, home) -> None:
    """Wait for child PID to exit; print its status and exit with it."""
    status = _connect(home).wait(pid, timeout=timeout)
    if status is None:
        raise click.ClickException(f"pid {pid} still running after {timeout}s")
    click.echo(status)
    sys.exit(_exit_code(status))


@click.command()
@click.option("-f", "--follow", is_flag=True, help="Keep printing new output until PID exits.")
@click.argument("pid", type=int)
@client
def logs(pid, follow, home) -> None:
    """Print the output (stdout and stderr) of process PID."""
    from llmos.kernel.home import Home          # no torch: paths only
    path = Home(home).proc_log(pid)
    if not path.exists():
        raise click.ClickException(f"no log for pid {pid} ({path})")
    k = _connect(home) if follow else None
    with open(path, "rb") as f:
        _copy_new(f, sys.stdout.buffer)
        if not follow:
            return
        try:
            checked = time.monotonic()
            while True:
                if not _copy_new(f, sys.stdout.buffer):
                    time.sleep(FOLLOW_POLL)
                if time.monotonic() - checked > ALIVE_POLL:
                    checked = time.monotonic()
                    if not any(p["pid"] == pid and str(p.get("state")).upper() != "ZOMBIE"
                               for p in k.ps()):
                        _copy_new(f, sys.stdout.buffer)
                        return
        except KeyboardInterrupt:
            sys.exit(130)


@click.command()
@client
def mem(home) -> None:
    """Show KV memory: blocks in the pool, in swap, and per process."""
    from rich.console import Console
    from rich.table import Table
    info = _connect(home).meminfo()
    kv, bs = info["kv"], info["kv"].get("block_size") or 0
    table = Table(title=f"KV memory (blocks of {bs} tokens)", box=None, header_style="bold")
    for c in ("", "blocks", "tokens"):
        table.add_column(c, justify="right" if c else "left")
    for key in ("total", "used", "cached", "free", "swap_total", "swap_free"):
        n = kv.get(key)
        table.add_row(key.replace("_", " "), str(n), "" if n is None else str(n * bs))
    console = Console()
    console.print(table)
    if info.get("procs"):
        per = Table(box=None, header_style="bold")
        for c in ("PID", "KV blocks", "tokens"):
            per.add_column(c, justify="right")
        for pid, n in sorted(info["procs"].items(), key=lambda kv_: int(kv_[0])):
            per.add_row(str(pid), str(n), str(n * bs))
        console.print(per)


@click.command()
@client
def models(home) -> None:
    """List the models the kernel has loaded."""
    from rich.console import Console
    from rich.table import Table
    table = Table(box=None, header_style="bold")
    keys = ("name", "model_type", "layers", "hidden", "heads", "kv_heads", "vocab", "dtype",
            "max_len", "path")
    for key in keys:
        table.add_column(key.upper().replace("_", " "))
    for m in _connect(home).models():
        table.add_row(*(str(m.get(key, "")) for key in keys))
    Console().print(table)


def _bytes(n) -> str:
    if not n:
        return "-"
    for unit, size in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return f"{n}B"


def _duration(s) -> str:
    if s is None:
        return "-"
    s = int(s)
    return f"{s}s" if s < 60 else f"{s // 60}m{s % 60:02d}s" if s < 3600 else f"{s // 3600}h{s % 3600 // 60:02d}m"


COMMANDS = (run, ps, kill, wait, logs, mem, models)


def register(group: click.Group) -> None:
    """Add the client commands to the `llmos` group."""
    for cmd in COMMANDS:
        group.add_command(cmd)
