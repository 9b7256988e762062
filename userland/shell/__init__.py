"""`llmos shell`: an interactive shell on the kernel, itself one of its processes (ps
shows it as `shell`). Jobs, signals and the model from one prompt:

    llmos> run -m llmos.userland.examples.worker 12+47= &
    [1] 7
    llmos> jobs
    llmos> gen 12+47=
    llmos> chat

Interactive on a terminal (prompt_toolkit: history in HOME/shell_history with Ctrl-R,
Tab completion, a status line at the bottom, notices of background jobs above the
prompt); with -c, a script file, or a pipe on stdin, it runs the commands with no prompt
and exits with the last one's status.
"""
from __future__ import annotations

import sys

import click

from llmos.userland.cmdline import client
from llmos.userland.shell.core import Shell, ShellExit, split  # noqa: F401 (the shell's API)

PROMPT = "llmos> "


def repl(sh: Shell, history: str | None) -> int:
    """Read and run commands at a prompt until `exit` or Ctrl-D; the last status."""
    from prompt_toolkit import PromptSession
    from prompt_toolkit.history import FileHistory, InMemoryHistory

    from llmos.userland.shell.complete import ShellCompleter
    from llmos.userland.shell.status import REFRESH, StatusLine
    sh.status_line = StatusLine(sh).start()
    session = PromptSession(
        history=FileHistory(history) if history else InMemoryHistory(),
        completer=ShellCompleter(sh), complete_while_typing=False,
        bottom_toolbar=lambda: sh.status_line.text, refresh_interval=REFRESH,
        input=sh.input, output=sh.output)
    sh.echo(f"llmos shell, pid {sh.k.pid}: `help` lists the commands, Ctrl-D leaves")
    warned = False
    try:
        while True:
            try:
                sh.execute(session.prompt(PROMPT))
                continue
            except KeyboardInterrupt:               # at the prompt, or between commands
                continue
            except EOFError:
                pass
            except ShellExit as e:
                sh.status = e.status
            if warned or not sh.stopped_jobs():
                break
            warned = True                           # as bash: the second exit leaves
            sh.echo("llmos: there are stopped jobs (leaving ends them: exit again to leave)")
    finally:
        sh.status_line.stop()
        sh.close()
    return sh.status


@click.command()
@click.option("-c", "command", metavar="COMMANDS",
              help="Run COMMANDS (separated by ;) and exit with the last one's status.")
@click.argument("script", required=False, type=click.File("r"))
@client
def shell(command, script, home) -> None:
    """An interactive shell on the kernel: run, jobs, fg, bg, kill, ps, top, gen, chat...
    (`help` inside lists them). With -c COMMANDS, a SCRIPT file, or commands on stdin, it
    runs them without a prompt and exits with the last one's status."""
    from llmos.userland import connect
    k = connect(home, name="shell")
    if command is not None or script is not None or not sys.stdin.isatty():
        lines = command.splitlines() if command is not None else (script or sys.stdin)
        status = Shell(k).run_script(lines)
        k.close()
        sys.exit(status)
    from prompt_toolkit.input import create_input
    from prompt_toolkit.output import create_output
    from prompt_toolkit.patch_stdout import patch_stdout
    history = str(k.home / "shell_history") if k.home else None
    with patch_stdout(raw=True):
        # A shell the kernel spawned says hello with its secret, which it can read once:
        # only an attached one (the owner's token, or a key) can connect again.
        again = (lambda: connect(home, name="shell")) if k.attached else None
        sh = Shell(k, sys.stdout, create_input(), create_output(), tty=True, reconnect=again)
        status = repl(sh, history)
    sh.k.close()
    sys.exit(status)
