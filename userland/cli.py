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
@click.option("--model", "-m", default="tiny", show_default=True,
              help='Model directory in Hugging Face format, or "tiny" (embedded).')
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
def generate(prompt, model, chat, system, driver, **sampling) -> None:
    """Stream a completion of PROMPT from the engine, in this process."""
    from llmos.kernel import EngineError
    engine = _engine(model, driver)
    sampling["stop"] = list(sampling["stop"])
    if chat:
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": prompt}]
        source = {"messages": messages}
    else:
        source = {"prompt": prompt}
    out = []
    try:
        engine.add_request(**source, on_event=lambda d: out.append(d), **sampling)
    except EngineError as e:
        raise click.ClickException(f"{e.code}: {e}") from None
    start = time.perf_counter()
    while engine.has_work():
        engine.step()
        while out:
            delta = out.pop(0)
            click.echo(delta.text, nl=False)
            sys.stdout.flush()
            if delta.finished:
                u = delta.completion.usage
                secs = time.perf_counter() - start
                click.echo()
                click.echo(f"[{delta.completion.finish_reason}; {u.prompt_tokens} prompt + "
                           f"{u.completion_tokens} completion tokens in {secs:.2f}s]", err=True)


@main.command()
@click.option("--model", "-m", default="tiny", show_default=True)
@click.option("--driver", default="cpu", show_default=True, help=DRIVER_HELP)
def demo(model, driver) -> None:
    """Show the embedded model at work on its tasks (batched in one engine)."""
    from rich.console import Console
    from rich.table import Table

    from llmos.kernel.tiny import tasks
    console = Console()
    with console.status("loading the model"):
        engine = _engine(model, driver)
    examples = tasks.demo_prompts()
    reqs = []
    for task, prompt, expected in examples:
        source = {"messages": prompt} if isinstance(prompt, list) else {"prompt": prompt}
        reqs.append(engine.add_request(**source, max_tokens=24, stop=["\n"]))
    start = time.perf_counter()
    done = {}
    while engine.has_work():
        done.update((d.request_id, d.completion) for d in engine.step() if d.finished)
    secs = time.perf_counter() - start
    table = Table(title=f"llmos demo: {len(examples)} requests batched on {model!r}")
    for col in ("task", "prompt", "expected", "answer", ""):
        table.add_column(col)
    right = 0
    for (task, prompt, expected), req in zip(examples, reqs):
        answer = done[req.id].text.strip()
        ok = tasks.score(task, answer, expected)
        right += ok
        shown = prompt[-1]["content"] if isinstance(prompt, list) else prompt
        table.add_row(task, shown, expected, answer, "[green]ok[/]" if ok else "[red]x[/]")
    console.print(table)
    tokens = engine.stats["generated_tokens"]
    console.print(f"{right}/{len(examples)} right; {tokens} tokens in {secs:.2f}s "
                  f"({tokens / secs:.0f} tok/s) in {engine.stats['steps']} engine steps")


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


if __name__ == "__main__":
    main()
