"""The `llmos` command.

Client-side commands must stay light: torch and the kernel are imported inside the
commands that run the engine in-process, never at module level.
"""
from __future__ import annotations

import sys
import time

import click

from llmos.userland import commands, gateway, kernelctl, keys, listing, shell, top
from llmos.userland.kernelctl import DRIVER_HELP, absolute_model, await_kernel, kernel_argv, launch



@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="llmos", prog_name="llmos",
                      help="Print the llmos version and exit.")
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
              help='The model: through a running kernel, a name it knows (`llmos models`), '
                   'a directory or .gguf file; in this process, a directory, a .gguf file '
                   'or "tiny" (the default).')
@click.option("--driver", default=None,
              help="Driver of an engine in this process (default cpu); " + DRIVER_HELP)
@click.option("--home", default=None, help="The kernel's home (default $LLMOS_HOME or ~/.llmos).")
@click.option("--chat", is_flag=True, help="Apply the model's chat template to PROMPT.")
@click.option("--system", default=None, help="System message (with --chat).")
@click.option("--max-tokens", "-n", default=64, show_default=True, type=int,
              help="Most tokens to generate.")
@click.option("--temperature", "-t", default=0.0, show_default=True, type=float,
              help="Sampling temperature; 0 is greedy.")
@click.option("--top-k", default=0, type=int, help="Sample from the k likeliest tokens (0: all).")
@click.option("--top-p", default=1.0, type=float,
              help="Sample from the likeliest tokens up to this probability mass.")
@click.option("--min-p", default=0.0, type=float,
              help="Drop tokens less likely than this fraction of the likeliest.")
@click.option("--seed", default=None, type=int, help="Seed of the sampler (repeatable output).")
@click.option("--stop", multiple=True, help="Stop string (repeatable).")
@click.option("--ignore-eos", is_flag=True, help="Keep generating past end-of-sequence.")
def generate(prompt, model, home, chat, system, driver, **sampling) -> None:
    """Stream a completion of PROMPT.

    Through the kernel of --home when one is up (on its default model, or --model); with
    --driver, or when no kernel is up, from an engine in this process (--model default
    "tiny", --driver default cpu).
    """
    sampling["stop"] = list(sampling["stop"])
    if chat:
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": prompt}]
        source = {"messages": messages}
    else:
        source = {"prompt": prompt}
    start = time.perf_counter()
    if driver is None and _kernel_is_up(home):
        if model is not None:
            source["model"] = absolute_model(model)
        completion = _generate_through_kernel(home, source, sampling)
    else:
        completion = _generate_here(model or "tiny", driver or "cpu", source, sampling)
    u = completion.usage
    click.echo()
    click.echo(f"[{completion.finish_reason}; {u.prompt_tokens} prompt + "
               f"{u.completion_tokens} completion tokens in {time.perf_counter() - start:.2f}s]",
               err=True)


def _kernel_is_up(home) -> bool:
    from llmos.syscalls.home import Home
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
@click.option("--model", "-m", default="tiny", show_default=True,
              help='Model directory in Hugging Face format, or "tiny" (embedded).')
@click.option("--driver", default="cpu", show_default=True, help=DRIVER_HELP)
def demo(model, driver) -> None:
    """Boot a kernel on MODEL in a temporary home, run the example agents at once (hello,
    parallel with its workers, chat), show a live process table and their output, and
    shut the kernel down."""
    import shutil
    import tempfile

    from rich.console import Console
    from rich.live import Live
    from rich.panel import Panel
    from rich.text import Text

    from llmos.syscalls.home import Home
    from llmos.syscalls.types import ProcState
    from llmos.userland import connect
    from llmos.userland.listing import ps_text
    console = Console()
    home = Home(tempfile.mkdtemp(prefix="llmos-demo-"))
    kernel, since = launch(home, kernel_argv(home, model, driver, "256M"))
    failed = True
    try:
        with console.status(f"booting a kernel on {model!r} in {home.path}"):
            await_kernel(home, kernel, since)
        with connect(home.path, timeout=120) as k:
            agents = {"hello": [], "parallel": ["-n", "6"], "chat": []}
            start = time.perf_counter()
            pids = {k.spawn([sys.executable, "-m", f"llmos.userland.examples.{name}", *args],
                            name=name): name for name, args in agents.items()}
            with Live(Text(ps_text(k.ps())), console=console, refresh_per_second=8) as live:
                while any(p.state != ProcState.ZOMBIE for p in k.ps() if p.pid in pids):
                    live.update(Text(ps_text(k.ps())))
                    time.sleep(0.1)
                live.update(Text(ps_text(k.ps())))
            console.print()
            statuses = {pid: k.wait(pid, timeout=60) for pid in pids}
            secs = time.perf_counter() - start
            for pid, name in pids.items():
                console.print(Panel(home.proc_log(pid).read_text().rstrip() or "(no output)",
                                    title=f"pid {pid} {name}: exit {statuses[pid]}",
                                    title_align="left"))
            console.print(f"3 agents and their workers done in {secs:.1f}s; "
                          f"KV blocks in use now: {k.meminfo().kv.used}")
        failed = any(st != 0 for st in statuses.values())
    finally:
        kernel.terminate()
        kernel.wait(30)
        shutil.rmtree(home.path, ignore_errors=True)
    console.print(f"kernel {kernel.pid} shut down (exit {kernel.returncode})")
    if failed or kernel.returncode:
        sys.exit(1)


@main.command()
@listing.json_option
def drivers(as_json) -> None:
    """List the drivers: availability, device, memory free/total, and why one cannot be
    used (unavailable, or its plugin failed to load); then the one "auto" picks."""
    import dataclasses

    from llmos.drivers import list_drivers
    from llmos.drivers.registry import current
    try:
        auto = current().auto()
    except ValueError:
        auto = None
    infos = list_drivers()
    if as_json:
        click.echo(listing.to_json([dataclasses.asdict(d) | {"auto": d.name == auto}
                                    for d in infos]))
    else:
        click.echo(listing.drivers_text(infos, auto or "none available"))


# The client commands (run, ps, kill, wait, logs, mem, models, sysinfo, syscalls) talk to
# a running kernel; up and down start and stop one.
commands.register(main)
main.add_command(kernelctl.up)
main.add_command(kernelctl.down)
main.add_command(keys.keys)
main.add_command(top.top)
main.add_command(shell.shell)
main.add_command(gateway.serve)


if __name__ == "__main__":
    main()
