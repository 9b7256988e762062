"""The shell's builtins, as click commands: each gets the Shell as its obj, prints through
it, and returns its exit status. Listings are the `llmos` commands' own (listing.py);
gen and chat live in userland/shell/talk.py.
"""
from __future__ import annotations

import shlex
import time

import click

from llmos.userland import listing
from llmos.userland.cmdline import (INTERRUPTED, alive, proc_name, program_argv,
                                    signal_arg)
from llmos.userland.kernelctl import LIMIT_HELP, check_limits
from llmos.userland.shell.core import ShellExit
from llmos.userland.shell import talk
from llmos.userland.shell.foreground import STOPPED, follow

pass_shell = click.pass_obj
SETTINGS = talk.HELP
STOPPED_CHECK = 1.0     # s between wait's looks at whether the job it waits for is stopped


@click.group(context_settings=SETTINGS)
def BUILTINS():
    """The shell's commands."""


def show(sh, data, as_json: bool, text) -> None:
    """A listing: text(data), or with --json the data as JSON (listing.py)."""
    sh.echo(listing.to_json(data) if as_json else text(data))


def builtin(**kwargs):
    return BUILTINS.command(context_settings=SETTINGS | kwargs.pop("context_settings", {}),
                            **kwargs)


# ---- processes and jobs -------------------------------------------------------------------

@builtin(context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@click.option("--name", default=None, help="Process name shown by ps (default: PROGRAM's name).")
@click.option("--nice", default=None, type=click.IntRange(-20, 19), help="Nice value, -20..19.")
@click.option("-m", "--module", is_flag=True, help="PROGRAM is a Python module (python -m).")
@click.argument("program")
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
@pass_shell
def run(sh, program, args, name, nice, module):
    """Run PROGRAM [ARGS...] as a child of the shell: in the foreground, showing its output
    (Ctrl-C interrupts it, Ctrl-Z stops it), or, with a trailing `&`, in the background
    ("[1] 7": job 1, pid 7). A .py file or -m module runs with this Python."""
    job = sh.jobs.start(program_argv(program, args, module), name or proc_name(program, module),
                        shlex.join(sh.words), sh.background, nice)
    if sh.background:
        sh.echo(f"[{job.id}] {job.pid}")
        return 0
    status = follow(sh, job)
    return STOPPED if status is None else status


@builtin()
@pass_shell
def jobs(sh):
    """List the shell's jobs: number, state (the kernel's), pid and command."""
    states = {p.pid: p.state.value for p in sh.k.ps()}
    current = sh.jobs.current()
    for job in sh.jobs.jobs():
        state = job.describe() if job.exited.is_set() else states.get(job.pid, "gone")
        sh.echo(job.line(state, current=job is current))


@builtin()
@click.argument("job", required=False)
@pass_shell
def fg(sh, job):
    """Bring JOB (%N or a pid; default the newest) to the foreground, continuing it if stopped."""
    j = sh.jobs.find(job)
    if not sh.jobs.set_background(j, False):          # it has just exited
        return sh.report_end(j, line=True)
    sh.echo(j.command)
    sh.signal(j.pid, "CONT", quiet=True)
    status = follow(sh, j)
    return STOPPED if status is None else status


@builtin()
@click.argument("jobs", nargs=-1)
@pass_shell
def bg(sh, jobs):
    """Continue stopped JOBs (%N or pids; default the current one) in the background."""
    stopped = sh.stopped_pids()
    for spec in jobs or (None,):
        j = sh.jobs.find(spec)
        if j.pid not in stopped:
            sh.echo(f"bg: job {j.id} already in background")
        elif sh.jobs.set_background(j, True) and sh.signal(j.pid, "CONT"):
            sh.echo(f"[{j.id}]+ {j.command} &")


@builtin(name="wait")
@click.argument("jobs", nargs=-1)
@pass_shell
def wait_(sh, jobs):
    """Wait for JOBs (%N or pids; default all the shell's jobs) to exit or stop; the status
    is the last one's (148 for a stopped one). Ctrl-C stops waiting (the jobs go on)."""
    chosen = [sh.jobs.find(s) for s in jobs] if jobs else sh.jobs.jobs()
    status = 0
    with sh.keys.watching() as keys:
        for job in chosen:
            status = _wait_one(sh, job, keys)
            if status == INTERRUPTED:
                break
    return status


def _wait_one(sh, job, keys) -> int:
    """Until job exits (its exit code), is stopped (STOPPED) or Ctrl-C (INTERRUPTED)."""
    look = time.monotonic() + STOPPED_CHECK
    while not job.exited.is_set():
        if "c-c" in keys.poll():
            sh.echo("^C")
            return INTERRUPTED
        if time.monotonic() >= look:
            if job.pid in sh.stopped_pids():
                return STOPPED
            look = time.monotonic() + STOPPED_CHECK
    return sh.report_end(job)


@builtin(context_settings={"ignore_unknown_options": True})
@click.option("-s", "--signal", "sig", default=None, help="TERM (default), KILL, INT, STOP, CONT, "
                                                         "a name with or without SIG, or a number.")
@click.argument("targets", nargs=-1, required=True, type=click.UNPROCESSED)
@pass_shell
def kill(sh, sig, targets):
    """Send a signal to processes: PIDs or jobs (%N). `kill -STOP %1` works too. A stopped
    process that gets TERM, INT or HUP is continued too, to act on it (as bash does)."""
    if sig is None and targets[0].startswith("-") and len(targets) > 1:
        sig, targets = targets[0][1:], targets[1:]
    sig = signal_arg(sig or "TERM")
    pids = [sh.jobs.pid_of(spec) for spec in targets]
    stopped = sh.stopped_pids() if sig not in ("STOP", "CONT", "KILL", 19, 18, 9) else set()
    failed = 0
    for pid in pids:
        failed += not sh.signal(pid, sig)
        if pid in stopped:
            sh.signal(pid, "CONT")
    return 1 if failed else 0


@builtin(context_settings={"ignore_unknown_options": True})   # nice -5 PID
@click.argument("value", type=click.IntRange(-20, 19))
@click.argument("targets", nargs=-1, required=True)
@pass_shell
def nice(sh, value, targets):
    """Set the nice value of processes (PIDs or jobs %N), -20 (first served) to 19 (last)."""
    for spec in targets:
        sh.k.nice(value, pid=sh.jobs.pid_of(spec))


@builtin()
@click.option("-f", "--follow", "follow_", is_flag=True, help="Keep printing until it exits (Ctrl-C stops).")
@click.argument("target")
@pass_shell
def logs(sh, target, follow_):
    """Print the output of a process (PID or job %N)."""
    pid = sh.jobs.pid_of(target)
    path = sh.k.log_path(pid)
    if path is None or not path.exists():
        raise click.ClickException(f"no log for pid {pid}")
    with open(path, "rb") as f, sh.keys.watching() as keys:
        sh.write_bytes(f.read())
        while follow_ and alive(sh.k, pid):
            if "c-c" in keys.poll(0.25):
                return INTERRUPTED
            sh.write_bytes(f.read())
        sh.write_bytes(f.read())


# ---- the kernel's state ------------------------------------------------------------------

@builtin()
@click.option("-l", "--long", "long_", is_flag=True, help="Also the scheduler's view.")
@listing.json_option
@pass_shell
def ps(sh, long_, as_json):
    """List the kernel's processes (the shell is one of them)."""
    show(sh, sh.k.ps(), as_json, lambda procs: listing.ps_text(procs, long_))


@builtin()
@click.option("-b", "--batch", is_flag=True, help="Plain text snapshots (needs -n in a script).")
@click.option("-n", "--iterations", type=click.IntRange(min=1), default=None, help="Stop after N.")
@click.option("-d", "--delay", type=click.FloatRange(min=0.1), default=0.5, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per snapshot.")
@pass_shell
def top(sh, batch, iterations, delay, as_json):
    """The live view of processes, tokens/s, KV and models (q quits; keys: s k n f t)."""
    from llmos.userland import top as view
    if sh.tty and not (batch or as_json):
        view.show(sh.k, delay, input=sh.input, output=sh.output, iterations=iterations)
    else:          # without a terminal, one snapshot unless -n says more
        view.batch(sh.k, iterations or (None if sh.tty else 1), delay, as_json, sh.echo)


@builtin()
@listing.json_option
@pass_shell
def mem(sh, as_json):
    """KV memory: blocks in the pool, in swap, per process and per model."""
    show(sh, sh.k.meminfo(), as_json, listing.mem_text)


@builtin()
@click.argument("action", required=False, type=click.Choice(["load", "unload"]))
@click.argument("name", required=False)
@listing.json_option
@pass_shell
def models(sh, action, name, as_json):
    """List the models; `models load NAME` / `models unload NAME` change them (owner)."""
    if action and not name:
        raise click.UsageError(f"models {action} needs a NAME")
    if action == "load":
        m = sh.k.model_load(name)
        sh.echo(f"{m.name}: loaded in {m.load_seconds:.2f} s")
    elif action == "unload":
        sh.k.model_unload(name)
    else:
        show(sh, sh.k.models(), as_json, listing.models_text)


@builtin()
@click.argument("policy", required=False)
@listing.json_option
@pass_shell
def sched(sh, policy, as_json):
    """List the scheduling policies (* in force); with POLICY, switch to it."""
    show(sh, sh.k.sched(policy), as_json, listing.sched_text)


@builtin(help="Show the limits of a process (PID or job %N; default: the kernel's defaults); "
              "with NAME=VALUE settings, set them first. " + LIMIT_HELP.replace(" Repeatable.", ""))
@click.argument("args", nargs=-1, metavar="[PID] [NAME=VALUE...]")
@listing.json_option
@pass_shell
def limit(sh, args, as_json):
    pid = sh.jobs.pid_of(args[0]) if args and "=" not in args[0] else None
    settings = check_limits(args[1:] if pid is not None else args)
    if settings and pid is None:
        raise click.UsageError("which process? give its PID before NAME=VALUE")
    limits = sh.k.setrlimit(pid, **settings) if settings else sh.k.getrlimit(pid)
    show(sh, limits, as_json, listing.limits_text)


@builtin()
@listing.json_option
@pass_shell
def sysinfo(sh, as_json):
    """The kernel: release, driver, device, model, uptime and counters."""
    show(sh, sh.k.sysinfo(), as_json, listing.sysinfo_text)


# ---- the shell ---------------------------------------------------------------------------

@builtin(name="help")
@click.argument("command", required=False)
@pass_shell
def help_(sh, command):
    """List the commands, or show COMMAND's help."""
    if command:
        cmd = BUILTINS.commands.get(command)
        if cmd is None:
            raise click.UsageError(f"no command {command!r}")
        with click.Context(cmd, info_name=command, help_option_names=["-h", "--help"]) as ctx:
            sh.echo(cmd.get_help(ctx))
        return
    width = max(map(len, BUILTINS.commands))
    for name, cmd in sorted(BUILTINS.commands.items()):
        sh.echo(f"  {name:<{width}}  {cmd.get_short_help_str(70)}")
    sh.echo(f"  {'!CMD':<{width}}  Run CMD in the host's shell.\n"
            "A line holds commands separated by `;`; `run ... &` runs in the background.\n"
            "Keys: Ctrl-C interrupts, Ctrl-Z stops the foreground job, Ctrl-D exits, "
            "Ctrl-R searches the history, Tab completes.")


@builtin(name="exit")
@click.argument("status", required=False, type=int)
@pass_shell
def exit_(sh, status):
    """Leave the shell (with STATUS, else the last command's). Jobs left go on running."""
    raise ShellExit(sh.status if status is None else status)


BUILTINS.add_command(talk.gen)
BUILTINS.add_command(talk.chat)
