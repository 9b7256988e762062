"""The shell itself: one attached process of the kernel that reads command lines and
runs them, interactively (a prompt_toolkit prompt) or from a script.

A line is commands separated by `;`, each ending in `&` to run in the background;
`!CMD` hands the rest of the line to the host's shell. Builtins are click commands
(userland/shell/builtins.py), so each has --help and the same options as the `llmos`
command of its name. A command's exit status is what `$?` would be: the last one's is
the shell's at exit.

Threads: the main thread reads and runs commands; each job has a waiter thread
(jobs.py) whose exit notices, and the status line's thread (status.py), only write
through echo(), which holds a lock so that lines never interleave.
"""
from __future__ import annotations

import codecs
import shlex
import sys
import threading
from contextlib import redirect_stdout

import click

from llmos.syscalls import KernelDead, SyscallError
from llmos.userland.cmdline import INTERRUPTED, error_line, exit_code
from llmos.userland.shell.foreground import Keys, host
from llmos.userland.shell.jobs import JobError, JobTable

USAGE = 2           # exit status of a command used wrongly (bash's for a builtin)
NOT_FOUND = 127     # exit status of an unknown command


class ShellExit(Exception):
    """`exit [N]` (or Ctrl-D): leave with status N."""

    def __init__(self, status: int):
        self.status = status


class Shell:
    """A shell on kernel connection k (an SDK Kernel). `out` gets everything the shell
    prints (a text stream); `input`/`output` are the prompt_toolkit terminal (None: no
    terminal, as in a script); `tty`: a person's terminal, which a host command (`!CMD`)
    and top may take over. `reconnect`: a function that connects to the kernel anew
    (connect()); with it, the status line connects to the next kernel when this one goes
    away (see attach)."""

    def __init__(self, k, out=None, input=None, output=None, tty: bool = False,
                 reconnect=None):
        self.k, self.tty, self.reconnect = k, tty, reconnect
        self.out = out or sys.stdout
        self.input, self.output = input, output
        self.keys = Keys(input)
        self.jobs = JobTable(k, self._job_done)
        self.status = 0                       # of the last command
        self.lines = None                     # a script's remaining lines (chat reads them)
        self.status_line = None               # status.StatusLine while a prompt runs
        self.background = False               # the command being run ended in `&`
        self.words: list[str] = []            # the command being run, as typed
        self._lock = threading.Lock()         # one writer at a time on out
        self._reader = None                   # the prompt of read_line
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")

    # ---- output ---------------------------------------------------------------------
    def echo(self, text: str = "", nl: bool = True) -> None:
        with self._lock:
            self.out.write(text + ("\n" if nl else ""))
            self.out.flush()

    def write(self, text: str) -> None:
        self.echo(text, nl=False)

    def write_bytes(self, data: bytes) -> None:
        """A job's output, decoded as it comes (a character may span two reads)."""
        if data:
            self.write(self._decoder.decode(data))

    def error(self, text: str) -> None:
        self.echo(f"llmos: {text}")

    def _job_done(self, job, current: bool) -> None:
        self.echo(job.line(job.describe(), current))

    def report_end(self, job, line: bool = False) -> int:
        """An exited job's end, told here unless its waiter told it already: its job line
        (line=True), else (a job in the foreground) a word if a signal ended it. Returns
        its exit code."""
        if self.jobs.take_report(job):
            if line:
                self.echo(job.line(job.describe()))
            elif job.lost:
                self.error(f"pid {job.pid}: {job.lost}")
            elif job.status is not None and job.status < 0:
                self.echo(job.describe())
        return 1 if job.lost else exit_code(job.status)

    def attach(self, k) -> None:
        """Go on on connection k, a kernel started after this one's went away: what runs
        from now on (commands, new jobs, the status line) talks to it. The old kernel's
        jobs were lost with it (their waiters said so); the old connection is closed."""
        old, self.k = self.k, k
        self.jobs.k = k
        old.close()

    # ---- acting on processes ----------------------------------------------------------
    def signal(self, pid: int, sig, quiet: bool = False) -> bool:
        """Send sig to pid; False if it failed (said on out unless quiet), e.g. it exited meanwhile."""
        try:
            self.k.kill(pid, sig)
            return True
        except SyscallError as e:
            if not quiet:
                self.error(f"kill {pid}: {e.code}: {e.msg}")
            return False

    # ---- running lines ----------------------------------------------------------------
    def execute(self, line: str) -> int:
        """Run one line; its status (also kept in .status). Raises ShellExit."""
        line = line.strip()
        if not line or line.startswith("#"):
            return self.status
        if line.startswith("!"):
            self.status = host(self, line[1:])
            return self.status
        try:
            commands = split(line)
        except ValueError as e:
            self.error(f"syntax error: {e}")
            self.status = USAGE
            return self.status
        for words, background in commands:
            self.status = self.run_command(words, background)
        return self.status

    def run_command(self, words: list[str], background: bool = False) -> int:
        from llmos.userland.shell.builtins import BUILTINS
        name, args = words[0], words[1:]
        cmd = BUILTINS.commands.get(name)
        if cmd is None:
            self.error(f"{name}: command not found (help lists the commands; `run` starts a "
                       f"program, `!` runs a host command)")
            return NOT_FOUND
        if background and name != "run":
            self.error(f"{name}: only `run` can go in the background")
            return USAGE
        self.background, self.words = background, words
        try:
            with redirect_stdout(_Writer(self)):
                status = cmd.main(args, prog_name=name, standalone_mode=False, obj=self)
        except click.exceptions.Exit as e:
            return e.exit_code
        except click.exceptions.Abort:                 # Ctrl-C in a builtin, off raw mode
            self.keys.interrupted = True
            self.echo("^C")
            return INTERRUPTED
        except click.ClickException as e:
            self.error(f"{name}: {e.format_message()}")
            return USAGE if isinstance(e, click.UsageError) else 1
        except JobError as e:
            self.error(f"{name}: {e}")
            return 1
        except KernelDead as e:
            then = " (the shell goes on with it)" if self.reconnect else ""
            self.error(f"{name}: the kernel is gone ({e.msg}); start one with `llmos up`{then}")
            return 1
        except SyscallError as e:
            self.error(f"{name}: {error_line(e)}")
            return 1
        return status if isinstance(status, int) else 0

    def run_script(self, lines) -> int:
        """Run lines (an iterable of str) with no prompt; the last command's status. A
        `chat` reads its turns from the lines that follow it. Ctrl-C (SIGINT) ends the
        script, after the command it interrupted, with status 130."""
        self.lines = iter(lines)
        try:
            for line in self.lines:
                self.execute(line)
                if self.keys.interrupted:
                    self.status = INTERRUPTED
                    break
        except ShellExit as e:
            self.status = e.status
        except KeyboardInterrupt:
            self.status = INTERRUPTED
        finally:
            self.close()
        return self.status

    def read_line(self, prompt: str) -> str:
        """The next line of input (raises EOFError at the end; KeyboardInterrupt on Ctrl-C
        at a prompt): from the script when there is one, else from a prompt."""
        if self.lines is not None:
            line = next(self.lines, None)
            if line is None:
                raise EOFError
            return line.rstrip("\n")
        if self._reader is None:
            from prompt_toolkit import PromptSession
            self._reader = PromptSession(input=self.input, output=self.output)
        return self._reader.prompt(prompt)

    def stopped_jobs(self) -> list:
        pids = self.stopped_pids()
        return [j for j in self.jobs.jobs() if j.pid in pids]

    def stopped_pids(self) -> set[int]:
        """The processes stopped now (the kernel's word; none if it cannot say)."""
        from llmos.syscalls.types import ProcState
        try:
            return {p.pid for p in self.k.ps() if p.state is ProcState.STOPPED}
        except SyscallError:
            return set()

    def close(self) -> None:
        """Leaving: stopped jobs get TERM and CONT (bash's HUP and CONT); running ones go
        on, the kernel's children now."""
        stopped = self.stopped_jobs()
        for j in stopped:
            self.signal(j.pid, "TERM", quiet=True)
            self.signal(j.pid, "CONT", quiet=True)
        live = [j for j in self.jobs.jobs() if not j.exited.is_set() and j not in stopped]
        if live:
            self.echo(f"llmos: {len(live)} job(s) left running: pid(s) "
                      f"{' '.join(str(j.pid) for j in live)} (the kernel keeps them; see ps)")
        self.jobs.close()


class _Writer:
    """sys.stdout for a builtin: click's own output (help, usage) goes through echo()."""

    def __init__(self, sh: Shell):
        self.sh = sh

    def write(self, text: str) -> int:
        self.sh.write(text)
        return len(text)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return False


def split(line: str) -> list[tuple[list[str], bool]]:
    """A line's commands: (words, in the background) for each, split at `;` and `&`
    outside quotes. Words are as sh makes them (quotes, backslashes; `#` is a character).
    Raises ValueError (an open quote, an empty command, `&&`)."""
    commands, start, quote, i = [], 0, None, 0
    while i < len(line):
        c = line[i]
        if quote:
            if c == quote:
                quote = None
            elif c == "\\" and quote == '"':
                i += 1
        elif c in "'\"":
            quote = c
        elif c == "\\":
            i += 1
        elif c in ";&":
            if line[i + 1:i + 2] == c:
                raise ValueError(f"`{c}{c}` is not supported (use `;` between commands)")
            words = _words(line[start:i])
            if not words:
                raise ValueError(f"unexpected `{c}`")
            commands.append((words, c == "&"))
            start = i + 1
        i += 1
    if quote:
        raise ValueError("no closing quotation")
    if words := _words(line[start:]):
        commands.append((words, False))
    return commands


def _words(text: str) -> list[str]:
    lex = shlex.shlex(text, posix=True)
    lex.whitespace_split, lex.commenters = True, ""
    return list(lex)
