"""The `llmos` command.

Client-side commands must stay light: torch and the kernel are imported inside the
commands that run the engine in-process, never at module level.
"""
from __future__ import annotations

import sys
import time

import click


DRIVER_HELP = 'cpu, cuda, an installed plugin, or "auto" (the best available); see `llmos drivers`.'


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """llmos: an operating system for LLM agents."""


def _engine(model: str, driver: str):
    from llmos.kernel import Engine
    from llmos.kernel.config import CheckpointError
    try:
        return Engine.from_pretrained(model, driver=driver)
    except (CheckpointError, ValueError) as e:
        raise click.ClickException(str(e)) from None


@main.command()
@click.argument("prompt")
@click.option("--model", "-m", default=None,
              help='Model directory in Hugging Face format, or "tiny" (embedded); runs in '
                   'this process. Default: the running kernel, else "tiny" in this process.')
@click.option("--home", default=None, help="The kernel's home (default $LLMOS_HOME or ~/.llmos).")
@click.option("--chat", is_flag=True, help="Apply the model's chat template to PROMPT.")
@click.option("--system", default=None, help="System message (with --chat).")
@click.option("--max-tokens", "-n", default=64, show_default=True, type=int)
@click.option("--temperature", "-t", default=0.0, show_default=True, type=float)
@click.option("--top-k", default=0, type=int)
@click.option("--top-p", default=1.0, type=float)
@click.option("--min-p", default=0.0, type=float)
@click.option("--seed", default=None, type=int)
@click.option("--stop", multiple=True, help="Stop string (repeatable).")
@click.option("--ignore-eos", is_flag=True)
@click.option("--driver", default="cpu", show_default=True, help=DRIVER_HELP)
def generate(prompt, model, home, chat, system, driver, **sampling) -> None:
    """Stream a completion of PROMPT: through the kernel when one is up (and no --model
    is given), else from an engine in this process."""
    sampling["stop"] = list(sampling["stop"])
    if chat:
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": prompt}]
        source = {"messages": messages}
    else:
        source = {"prompt": prompt}
    start = time.perf_counter()
    if model is None and _kernel_is_up(home):
        completion = _generate_through_kernel(home, source, sampling)
    else:
        completion = _generate_here(model or "tiny", driver, source, sampling)
    u = completion.usage
    click.echo()
    click.echo(f"[{completion.finish_reason}; {u.prompt_tokens} prompt + "
               f"{u.completion_tokens} completion tokens in {time.perf_counter() - start:.2f}s]",
               err=True)


def _kernel_is_up(home) -> bool:
    from llmos.kernel.home import Home
    return Home(home).running_pid() is not None


def _generate_through_kernel(home, source, sampling):
    from llmos.userland import SyscallError, connect
    try:
        with connect(home) as k:
            stream = k.generate(**source, stream=True, **sampling)
            for delta in stream:
                click.echo(delta.text, nl=False)
                sys.stdout.flush()
            return stream.completion
    except SyscallError as e:
        raise click.ClickException(f"{e.code}: {e.msg}") from None


def _generate_here(model, driver, source, sampling):
    from llmos.kernel import EngineError
    engine = _engine(model, driver)
    out = []
    try:
        engine.add_request(**source, on_event=out.append, stream=True, **sampling)
    except EngineError as e:
        raise click.ClickException(f"{e.code}: {e}") from None
    while engine.has_work():
        engine.step()
        for delta in out:
            click.echo(delta.text, nl=False)
            sys.stdout.flush()
            if delta.finished:
                return delta.completion
        out.clear()
    raise click.ClickException("the engine stopped without finishing the request")


@main.command()
@click.option("--model", "-m", default="tiny", show_default=True)
@click.option("--driver", default="cpu", show_default=True, help=DRIVER_HELP)
def demo(model, driver) -> None:
    """Boot a kernel on MODEL in a temporary home, run the example agents at once (hello,
    parallel with its workers, chat), show a live process table and their output, and
    shut the kernel down."""
    import shutil
    import subprocess
    import tempfile

    from rich.console import Console
    from rich.live import Live
    from rich.panel import Panel

    from llmos.kernel.home import Home
    from llmos.userland import connect
    from llmos.userland.commands import ps_table
    console = Console()
    home = Home(tempfile.mkdtemp(prefix="llmos-demo-"))
    argv = [sys.executable, "-m", "llmos.kernel.daemon", "--home", str(home.path),
            "--model", model, "--driver", driver, "--kv-memory", "256M"]
    home.log_dir.mkdir(parents=True, exist_ok=True)
    with open(home.log_dir / "kernel.out", "ab") as out:
        kernel = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                  start_new_session=True)
    failed = True
    try:
        with console.status(f"booting a kernel on {model!r} in {home.path}"):
            _await_kernel(home, kernel)
        with connect(home.path, timeout=120) as k:
            agents = {"hello": [], "parallel": ["-n", "6"], "chat": []}
            start = time.perf_counter()
            pids = {k.spawn([sys.executable, "-m", f"llmos.userland.examples.{name}", *args],
                            name=name): name for name, args in agents.items()}
            with Live(ps_table(k.ps()), console=console, refresh_per_second=8) as live:
                while any(r["state"].lower() != "zombie" for r in k.ps() if r["pid"] in pids):
                    live.update(ps_table(k.ps()))
                    time.sleep(0.1)
                live.update(ps_table(k.ps()))
            console.print()
            statuses = {pid: k.wait(pid, timeout=60) for pid in pids}
            secs = time.perf_counter() - start
            for pid, name in pids.items():
                console.print(Panel(home.proc_log(pid).read_text().rstrip() or "(no output)",
                                    title=f"pid {pid} {name}: exit {statuses[pid]}",
                                    title_align="left"))
            console.print(f"3 agents and their workers done in {secs:.1f}s; "
                          f"KV blocks in use now: {k.meminfo()['kv']['used']}")
        failed = any(st != 0 for st in statuses.values())
    finally:
        kernel.terminate()
        kernel.wait(30)
        shutil.rmtree(home.path, ignore_errors=True)
    console.print(f"kernel {kernel.pid} shut down (exit {kernel.returncode})")
    if failed or kernel.returncode:
        sys.exit(1)


@main.command()
def drivers() -> None:
    """List the drivers: availability, device, memory, and plugins that failed to load."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from llmos.drivers import list_drivers, load_errors
    from llmos.drivers.registry import current
    console = Console()
    table = Table(title="llmos drivers (entry-point group llmos.drivers)")
    for col in ("driver", "status", "device", "memory free / total", "priority"):
        table.add_column(col)
    for d in list_drivers():
        if d.load_error:
            status = "[red]failed to load[/]"
        elif d.available:
            status = "[green]available[/]"
        else:
            status = f"[yellow]unavailable[/]: {escape(d.reason or '')}"
        memory = f"{_size(d.memory[0])} / {_size(d.memory[1])}" if d.memory else ""
        table.add_row(d.name, status, d.device or "", memory,
                      "" if d.load_error else str(d.priority))
    console.print(table)
    try:
        console.print(f"auto: {current().auto()}")
    except ValueError as e:
        console.print(f"auto: [red]{escape(str(e))}[/]")
    for name, error in load_errors().items():
        console.print(f"[red]load error[/] {name}: {escape(error)}")


def _size(n: int) -> str:
    return f"{n / (1 << 30):.1f} GiB" if n >= 1 << 30 else f"{n / (1 << 20):.0f} MiB"


# The client commands (run, ps, kill, wait, logs, mem, models) talk to a running kernel.
from llmos.userland import commands as _commands  # noqa: E402

_commands.register(main)


@main.command()
@click.option("--home", default=None, help="Kernel home (default $LLMOS_HOME or ~/.llmos).")
@click.option("--model", "-m", default="tiny", show_default=True)
@click.option("--driver", default="cpu", show_default=True)
@click.option("--kv-memory", default=None, help="KV pool size, e.g. 512M (default: a share of free memory).")
@click.option("-d", "--detach", is_flag=True, help="Run in the background; return once it answers.")
def up(home, model, driver, kv_memory, detach) -> None:
    """Boot the kernel on MODEL (in the foreground unless -d)."""
    import subprocess

    from llmos.kernel.home import Home
    argv = [sys.executable, "-m", "llmos.kernel.daemon", "--model", model, "--driver", driver]
    argv += ["--home", str(Home(home).path)] + (["--kv-memory", kv_memory] if kv_memory else [])
    if not detach:
        sys.exit(subprocess.call(argv))
    h = Home(home)
    h.log_dir.mkdir(parents=True, exist_ok=True)
    with open(h.log_dir / "kernel.out", "ab") as out:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                start_new_session=True)
    _await_kernel(h, proc)
    click.echo(f"llmos kernel {proc.pid} listening on {h.socket_url}")


def _await_kernel(h, proc, timeout: float = 120.0) -> None:
    """Return once the kernel answers a ping; fail clearly if it exits or stays silent."""
    from llmos.syscalls import Connection, KernelDead, Sys, SyscallError
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise click.ClickException(f"the kernel exited with status {proc.returncode}; "
                                       f"see {h.log_dir / 'kernel.out'}")
        if h.socket_path.exists():
            try:
                with Connection(h.socket_url, timeout=2, dead_after=2) as c:
                    c.call(Sys.PING)
                    return
            except (KernelDead, SyscallError):
                pass
        time.sleep(0.1)
    raise click.ClickException(f"the kernel did not answer within {timeout:.0f}s")


@main.command()
@click.option("--home", default=None)
@click.option("--timeout", default=30.0, show_default=True)
def down(home, timeout) -> None:
    """Shut the kernel down (SIGTERM): calls in flight fail, children are terminated."""
    import os
    import signal

    from llmos.kernel.home import Home
    h = Home(home)
    pid = h.running_pid()
    if pid is None:
        raise click.ClickException(f"no kernel is running on {h.path}")
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while h.running_pid() is not None:
        if time.monotonic() > deadline:
            raise click.ClickException(f"kernel {pid} still running after {timeout:.0f}s")
        time.sleep(0.05)
    click.echo(f"llmos kernel {pid} stopped")


if __name__ == "__main__":
    main()
