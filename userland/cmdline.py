"""What every `llmos` client command shares, the shell, top and the gateway too: --home
and how SDK errors become one line, signals and durations as people write them, exit
statuses, the argv and name of a program to run, and small looks at a process.

Light: click and the SDK's client half only (no torch, no kernel engine).
"""
from __future__ import annotations

import functools
import os
import sys

import click

HOME_HELP = "The kernel's home (default: $LLMOS_HOME, else ~/.llmos)."
INTERRUPTED = 130         # exit status of a command the user stopped with Ctrl-C (128 + SIGINT)


def client(fn):
    """Add --home to a command and turn SDK errors into a one-line error (exit 1)."""
    return click.option("--home", default=None, help=HOME_HELP)(sdk_errors(fn))


def sdk_errors(fn):
    """Turn SDK errors into a one-line error (exit 1)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from llmos.userland.sdk import KernelNotRunning, SyscallError
        try:
            return fn(*args, **kwargs)
        except KernelNotRunning as e:
            raise click.ClickException(e.msg) from None
        except SyscallError as e:
            raise click.ClickException(error_line(e)) from None
    return wrapper


def error_line(e) -> str:
    """An SDK error as one line: "ESRCH: no process 9"."""
    return f"{e.code}: {e.msg}" if e.msg else e.code


def signal_arg(text: str) -> str | int:
    """A signal as people write it (TERM, sigterm, 15) as kill() takes it."""
    sig = text.strip().upper().removeprefix("SIG")
    return int(sig) if sig.isdigit() else sig


class Duration(click.ParamType):
    """A duration as people write it: 300, 30s, 5m, 1h; -1 for ever."""
    name = "duration"

    def convert(self, value, param, ctx):
        if isinstance(value, float):
            return value
        from llmos.syscalls.args import duration
        try:
            return duration(value)
        except ValueError as e:
            self.fail(str(e), param, ctx)


DURATION = Duration()


def connect_home(home):
    """The kernel of home, attached as a process named after the command (ps shows `top`)."""
    from llmos.userland import connect
    ctx = click.get_current_context(silent=True)
    return connect(home, name=ctx.command_path.removeprefix("llmos ") if ctx else None)


def exit_code(status) -> int:
    """A shell's exit code for a process status: 128+N when killed by signal N."""
    if status is None:
        return 1
    if status < 0:
        return 128 - status
    return status if status <= 255 else 1


def program_argv(program: str, args, module: bool = False) -> list[str]:
    """The argv that runs PROGRAM ARGS: a module (-m) or a .py file with this Python; a
    path is made absolute (the kernel's cwd differs)."""
    if module:
        return [sys.executable, "-m", program, *args]
    if os.sep in program and os.path.exists(program):
        program = os.path.abspath(program)
    if program.endswith(".py"):
        return [sys.executable, program, *args]
    return [program, *args]


def proc_name(program: str, module: bool) -> str:
    """What ps calls a program run without --name: a file's name, a module's last part."""
    return program.rsplit(".", 1)[-1] if module else os.path.basename(program)


def copy_new(f, out) -> bool:
    """Copy what was appended to f since the last call; True if anything was."""
    data = f.read()
    if data:
        out.write(data)
        out.flush()
    return bool(data)


def alive(k, pid: int) -> bool:
    """pid is in the process table and not a zombie (asking, not waiting: a wait would
    collect it from under its parent)."""
    from llmos.syscalls.types import ProcState
    return any(p.pid == pid and p.state != ProcState.ZOMBIE for p in k.ps())
