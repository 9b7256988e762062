"""The client commands of `llmos`: run, ps, kill, wait, logs, mem, models, sysinfo, syscalls,
sched, limit.

Each talks to a running kernel through the SDK (attaching with the owner token of
--home), so each stays light: no torch, no kernel engine. Any syscall error, or no
kernel at all, is one line on stderr and exit status 1, never a traceback. Listings print
aligned columns, or one JSON document with --json (userland/listing.py).
"""
from __future__ import annotations

import os
import signal
import sys
import time

import click

from llmos.userland import listing
from llmos.userland.cmdline import (DURATION, INTERRUPTED, alive, client, connect_home,
                                    copy_new, exit_code, program_argv, proc_name, sdk_errors,
                                    signal_arg)
from llmos.userland.kernelctl import LIMIT_HELP, check_limits

FOLLOW_POLL = 0.1         # seconds between reads of a followed log
ALIVE_POLL = 1.0          # seconds between `logs -f` checks that the process still runs


@click.command(context_settings={"ignore_unknown_options": True,
                                 "allow_interspersed_args": False})
@click.option("-d", "--detach", is_flag=True, help="Print the pid and return at once.")
@click.option("--name", default=None, help="Process name shown by ps (default: PROGRAM's name).")
@click.option("--nice", default=None, type=click.IntRange(-20, 19),
              help="Nice value, -20 (first served) to 19 (last).")
@click.option("-m", "--module", is_flag=True, help="PROGRAM is a Python module (python -m).")
@click.option("--limit", "limits", multiple=True, callback=lambda ctx, param, v: check_limits(v),
              metavar="NAME=VALUE", help="A limit of the process (yours otherwise). " + LIMIT_HELP)
@click.argument("program")
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
@client
def run(program, args, detach, name, nice, module, limits, home) -> None:
    """Run PROGRAM [ARGS...] as an llmos process (a .py file or -m module runs with this Python).

    Follows its output and exits with its status; Ctrl-C sends it INT (twice: KILL), waits
    for it and exits 130.
    """
    k = connect_home(home)
    argv = program_argv(program, args, module)
    pid = k.spawn(argv, name=name or proc_name(program, module), nice=nice, limits=limits or None)
    if detach:
        click.echo(pid)
        return
    status, interrupted = _follow(k, pid)
    sys.exit(INTERRUPTED if interrupted else exit_code(status))


def _follow(k, pid: int) -> tuple[int | None, bool]:
    """Copy pid's log to stdout until pid exits; return (its status, whether the user
    interrupted). Ctrl-C sends INT to pid, a second one KILL.

    SIGINT only counts while this runs: raising KeyboardInterrupt in the middle of a
    wait could lose the status the kernel is sending back.
    """
    interrupts = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: interrupts.append(signum))
    path, f, sent = k.log_path(pid), None, 0
    try:
        while True:
            done = k.wait_status(pid, timeout=FOLLOW_POLL)
            if f is None and path is not None and path.exists():
                f = open(path, "rb")
            if f is not None:
                copy_new(f, sys.stdout.buffer)
            if done.exited:
                return done.status, bool(interrupts)
            if len(interrupts) > sent:
                sent = len(interrupts)
                sig = "INT" if sent == 1 else "KILL"
                click.echo(f"\n[llmos: sending {sig} to pid {pid}]", err=True)
                _signal_unless_gone(k, pid, sig)
    finally:
        signal.signal(signal.SIGINT, previous)
        if f is not None:
            f.close()


def _signal_unless_gone(k, pid: int, sig: str) -> None:
    """Send sig to pid; one that exited meanwhile (ESRCH) is told by the next wait."""
    from llmos.userland.sdk import SyscallError
    try:
        k.kill(pid, sig)
    except SyscallError as e:
        if e.code != "ESRCH":
            raise


@click.command()
@click.option("-l", "--long", "long", is_flag=True,
              help="Also the scheduler's view: service, queued and running time, "
                   "preemptions, KV swapped out and on disk.")
@listing.json_option
@client
def ps(long, as_json, home) -> None:
    """List the kernel's processes."""
    procs = connect_home(home).ps()
    click.echo(listing.to_json(procs) if as_json else listing.ps_text(procs, long))


@click.command()
@click.option("-s", "--signal", "sig", default="TERM", show_default=True,
              help="TERM, KILL, INT, STOP or CONT (name, with or without SIG, or number).")
@click.argument("pids", metavar="PID...", nargs=-1, type=int, required=True)
@client
def kill(sig, pids, home) -> None:
    """Send a signal to processes (the owner may signal any process)."""
    k = connect_home(home)
    for pid in pids:
        k.kill(pid, signal_arg(sig))


@click.command()
@click.option("--timeout", "-t", default=None, type=float,
              help="Give up after this many seconds (exit 1 if PID still runs).")
@click.argument("pid", type=int)
@client
def wait(pid, timeout, home) -> None:
    """Wait for PID to exit (any process: you are its owner); print its status and exit
    with it (128+N when killed by signal N)."""
    done = connect_home(home).wait_status(pid, timeout=timeout)
    if not done.exited:
        raise click.ClickException(f"pid {pid} is still running after {timeout:g}s")
    if done.status is None:
        raise click.ClickException(f"pid {pid} exited; its status is unknown "
                                   f"(an attached program that vanished)")
    click.echo(done.status)
    sys.exit(exit_code(done.status))


@click.command()
@click.option("-f", "--follow", is_flag=True, help="Keep printing new output until PID exits.")
@click.argument("pid", type=int)
@client
def logs(pid, follow, home) -> None:
    """Print the output (stdout and stderr) of process PID."""
    from llmos.syscalls.home import Home
    path = Home(home).proc_log(pid)
    if not path.exists():
        raise click.ClickException(f"no log for pid {pid} ({path})")
    k = connect_home(home) if follow else None
    with open(path, "rb") as f:
        copy_new(f, sys.stdout.buffer)
        if not follow:
            return
        try:
            checked = time.monotonic()
            while True:
                if not copy_new(f, sys.stdout.buffer):
                    time.sleep(FOLLOW_POLL)
                if time.monotonic() - checked > ALIVE_POLL:
                    checked = time.monotonic()
                    if not alive(k, pid):
                        copy_new(f, sys.stdout.buffer)
                        return
        except KeyboardInterrupt:
            sys.exit(INTERRUPTED)


@click.command()
@listing.json_option
@client
def mem(as_json, home) -> None:
    """Show KV memory: blocks in the pool, in swap, and per process."""
    info = connect_home(home).meminfo()
    click.echo(listing.to_json(info) if as_json else listing.mem_text(info))


@click.group(invoke_without_command=True)
@listing.json_option
@client
@click.pass_context
def models(ctx, as_json, home) -> None:
    """List the models: loaded, loading and registered (subcommands change them)."""
    ctx.obj = home
    if ctx.invoked_subcommand is None:
        found = connect_home(home).models()
        click.echo(listing.to_json(found) if as_json else listing.models_text(found))


@models.command("add")
@click.argument("name")
@click.argument("path", type=click.Path(exists=True))
@click.option("--dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]),
              default=None, help="the dtype it loads in (default: auto)")
@click.option("--quantize", type=click.Choice(["int8"]), default=None,
              help="weight-only quantization at load")
@click.option("--keep-alive", type=DURATION, default=None,
              help="how long it stays loaded once idle (5m, 1h, -1 for ever)")
@click.pass_obj
@sdk_errors
def models_add(home, name, path, dtype, quantize, keep_alive) -> None:
    """Register NAME for the model directory or .gguf file PATH (owner)."""
    m = connect_home(home).model_add(name, os.path.abspath(path), dtype, quantize, keep_alive)
    click.echo(f"{m.name}: {m.path} ({m.model_type or 'model'}, {m.layers} layers)")


@models.command("rm")
@click.argument("name")
@click.pass_obj
@sdk_errors
def models_rm(home, name) -> None:
    """Forget the registered name NAME (owner; a loaded model stays loaded)."""
    connect_home(home).model_rm(name)


@models.command("load")
@click.argument("name")
@click.option("--keep-alive", type=DURATION, default=None,
              help="how long it stays loaded once idle (5m, 1h, -1 for ever)")
@click.pass_obj
@sdk_errors
def models_load(home, name, keep_alive) -> None:
    """Load model NAME now (owner): a registered name, a directory, a .gguf file, tiny."""
    m = connect_home(home).model_load(name, keep_alive)
    click.echo(f"{m.name}: loaded in {m.load_seconds:.2f} s, {listing.size(m.weight_bytes)} "
               f"of weights, {m.kv_blocks} KV blocks ({listing.size(m.kv_bytes)})")


@models.command("unload")
@click.argument("name")
@click.pass_obj
@sdk_errors
def models_unload(home, name) -> None:
    """Unload model NAME now (owner; refused while a request or context uses it)."""
    connect_home(home).model_unload(name)


@click.command()
@listing.json_option
@client
def sysinfo(as_json, home) -> None:
    """Show the kernel: release, driver, device, model, uptime and engine counters."""
    info = connect_home(home).sysinfo()
    click.echo(listing.to_json(info) if as_json else listing.sysinfo_text(info))


@click.command()
@listing.json_option
@client
def syscalls(as_json, home) -> None:
    """List the kernel's syscall table: number, name, implemented, arguments."""
    table = connect_home(home).syscalls()
    click.echo(listing.to_json(table) if as_json else listing.syscalls_text(table))


@click.command()
@click.argument("policy", required=False)
@listing.json_option
@client
def sched(policy, as_json, home) -> None:
    """List the scheduling policies, the one in force marked *; with POLICY, switch to it."""
    info = connect_home(home).sched(policy)
    click.echo(listing.to_json(info) if as_json else listing.sched_text(info))


@click.command(help="Show the limits of PID, or without PID those a process without a "
                    "parent starts with (the kernel's defaults); with NAME=VALUE settings, "
                    "set them first (a process may lower its own and its descendants'; "
                    "raising one is the owner's). " + LIMIT_HELP.replace(" Repeatable.", ""))
@click.argument("args", nargs=-1, metavar="[PID] [NAME=VALUE...]")
@listing.json_option
@client
def limit(args, as_json, home) -> None:
    pid = int(args[0]) if args and args[0].isdigit() else None
    settings = check_limits(args[1:] if pid is not None else args)
    if settings and pid is None:
        raise click.UsageError("which process? give its PID before NAME=VALUE")
    k = connect_home(home)
    limits = k.setrlimit(pid, **settings) if settings else k.getrlimit(pid)
    click.echo(listing.to_json(limits) if as_json else listing.limits_text(limits))


COMMANDS = (run, ps, kill, wait, logs, mem, models, sysinfo, syscalls, sched, limit)


def register(group: click.Group) -> None:
    """Add the client commands to the `llmos` group."""
    for cmd in COMMANDS:
        group.add_command(cmd)
