"""`llmos up` and `llmos down`: start a kernel on a home (in the foreground, or detached
and awaited) and stop it. `llmos demo` launches its kernel the same way."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import click

DRIVER_HELP = 'cpu, cuda, an installed plugin, or "auto" (the best available); see `llmos drivers`.'
LIMIT_HELP = ("NAME is calls, kv_blocks, contexts, children or tokens_per_s; VALUE a number or "
              "'unlimited'. Repeatable.")
BOOT_TIMEOUT = 120.0      # seconds `up -d` and `demo` wait for a kernel to answer
KERNEL_OUT_MAX = 1 << 20  # bytes of log/kernel.out past which `up -d` first moves it to .1


@click.command()
@click.option("--home", default=None, help="Kernel home (default $LLMOS_HOME or ~/.llmos).")
@click.option("--model", "-m", "model", multiple=True, default=["tiny"], show_default=True,
              help='A model loaded at boot: a registered name (`llmos models add`), a '
                   'Hugging Face directory, a .gguf file, or "tiny" (embedded). Repeatable; '
                   'the first is the default of calls that name none.')
@click.option("--memory", default=None, metavar="SIZE",
              help="Memory for the models' weights and KV pools, e.g. 6G (default: most of "
                   "free device memory, at most 8G on a CPU); past it the least recently "
                   "used idle model is unloaded.")
@click.option("--keep-alive", default=None, metavar="DURATION",
              help="How long a model loaded on demand stays once idle: 30s, 5m, 1h, -1 for "
                   "ever (default 5m).")
@click.option("--quantize", type=click.Choice(["int8"]), default=None,
              help="Weight-only quantization at load (models whose registry entry does not "
                   "say otherwise).")
@click.option("--driver", default="cpu", show_default=True, help=DRIVER_HELP)
@click.option("--kv-memory", default=None,
              help="KV pool size, e.g. 512M (default: a share of free memory).")
@click.option("-d", "--detach", is_flag=True,
              help="Run in the background (output in HOME/log/kernel.out); return once it answers.")
@click.option("--agent-user", default=None, metavar="USER",
              help="Run agents as USER, out of reach of the kernel's token and memory "
                   "(a kernel started as root only).")
@click.option("--listen", default=None, metavar="tcp://HOST:PORT",
              help="Also serve this tcp endpoint, with CURVE: only client keys on the "
                   "allow-list connect (see `llmos keys`).")
@click.option("--no-curve", is_flag=True,
              help="--listen without CURVE: a loopback address (127.0.0.1) only.")
@click.option("--max-agents", type=click.IntRange(min=1), default=None, metavar="N",
              help="Agent processes running at once, at most (default: one per 64 MiB of "
                   "memory, 16 to 1024); a spawn past it is EAGAIN.")
@click.option("--sched", default=None, metavar="NAME",
              help="Scheduling policy (default fair); `llmos sched` lists them and switches it.")
@click.option("--dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]),
              default=None, help="Weights and KV dtype (default auto: bfloat16 where the "
                                 "hardware computes it natively, else float32).")
@click.option("--kv-ttl", type=click.FloatRange(min=0), default=None, metavar="SECONDS",
              help="Seconds an idle context's KV stays resident before it may be paged out.")
@click.option("--kv-disk", default=None, metavar="SIZE",
              help="A disk tier for paged-out KV, e.g. 4G, in HOME/kv (default: none).")
@click.option("--kv-swap", default=None, metavar="SIZE",
              help="The host swap pool for preempted and paged-out KV, e.g. 1G (default: "
                   "half the KV pool).")
@click.option("--no-kv-paging", is_flag=True,
              help="Idle contexts stay in the device pool (no virtual memory for KV).")
@click.option("--limit", "limits", multiple=True, callback=lambda ctx, param, v: check_limits(v),
              metavar="NAME=VALUE", help="A default limit of the processes without a parent "
                                         "(their children inherit it). " + LIMIT_HELP)
def up(home, model, memory, keep_alive, quantize, driver, kv_memory, detach, agent_user,
       listen, no_curve, max_agents, sched, dtype, kv_ttl, kv_disk, kv_swap, no_kv_paging,
       limits) -> None:
    """Boot the kernel on MODEL (in the foreground unless -d). Refuses a home whose
    kernel is running."""
    from llmos.syscalls.home import Home
    h = Home(home)
    pid = h.running_pid()
    if pid is not None:
        raise click.ClickException(f"a kernel is already running on {h.path} (pid {pid}); "
                                   f"`llmos down --home {h.path}` stops it")
    argv = kernel_argv(h, model, driver, kv_memory, agent_user) + _listen_argv(listen, no_curve)
    argv += ["--max-agents", str(max_agents)] if max_agents else []
    argv += _options(sched=sched, dtype=dtype, kv_ttl=kv_ttl, kv_disk=kv_disk, kv_swap=kv_swap,
                     memory=memory, keep_alive=keep_alive, quantize=quantize)
    argv += ["--no-kv-paging"] if no_kv_paging else []
    argv += [a for name, value in limits.items() for a in ("--limit", f"{name}={value}")]
    if not detach:
        sys.stdout.flush()
        os.execv(argv[0], argv)          # this process becomes the kernel: signals reach it
    kernel, since = launch(h, argv)
    await_kernel(h, kernel, since)
    click.echo(f"llmos kernel {kernel.pid} listening on {h.socket_url}"
               + (f" and {listen}" if listen else ""))


def check_limits(texts) -> dict:
    """--limit NAME=VALUE options as {name: the wire's value}; a bad one is a usage error
    (click.BadParameter). The same name twice: the last one counts."""
    from llmos.syscalls import SyscallError
    from llmos.syscalls.specs import parse_limit
    try:
        return dict(parse_limit(t) for t in texts)
    except SyscallError as e:
        raise click.BadParameter(e.msg) from None


def _options(**given) -> list[str]:
    """--name value for each option given (not None)."""
    return [a for k, v in given.items() if v is not None
            for a in (f"--{k.replace('_', '-')}", str(v))]


def _listen_argv(listen, no_curve) -> list[str]:
    """The kernel's --listen options, checked first: a non-loopback address needs CURVE."""
    if not listen:
        if no_curve:
            raise click.UsageError("--no-curve goes with --listen")
        return []
    from llmos.kernel.endpoints import check_listen  # light: no engine, no torch
    try:
        check_listen(listen, not no_curve)
    except ValueError as e:
        raise click.ClickException(str(e)) from None
    return ["--listen", listen] + (["--no-curve"] if no_curve else [])


def kernel_argv(h, model: str | tuple, driver, kv_memory, agent_user=None) -> list[str]:
    """The kernel's command line; model: a name or several."""
    models = [model] if isinstance(model, str) else list(model)
    argv = [sys.executable, "-m", "llmos.kernel", "--home", str(h.path), "--driver", driver]
    argv += [a for m in models for a in ("--model", absolute_model(m))]
    argv += ["--agent-user", agent_user] if agent_user else []
    return argv + (["--kv-memory", kv_memory] if kv_memory else [])


def absolute_model(model: str) -> str:
    """A model path relative to here made absolute (the kernel's cwd is not ours); a name
    stays a name."""
    return os.path.abspath(model) if os.sep in model and os.path.exists(model) else model


def launch(h, argv) -> tuple[subprocess.Popen, int]:
    """Start the kernel argv in a session of its own, its stdout and stderr appended to
    HOME/log/kernel.out; returns the process and the offset where its output starts."""
    h.path.mkdir(mode=0o700, parents=True, exist_ok=True)
    h.log_dir.mkdir(mode=0o700, exist_ok=True)
    _rotate_if_big(h.kernel_out)
    try:
        fd = os.open(h.kernel_out, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC
                     | os.O_NOFOLLOW, 0o600)
    except OSError as e:       # ELOOP: a symlink planted there
        raise click.ClickException(f"cannot open {h.kernel_out}: {e.strerror}") from None
    try:
        os.fchmod(fd, 0o600)   # also a kernel.out made before llmos made it private
        since = os.lseek(fd, 0, os.SEEK_END)
        kernel = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=fd, stderr=fd,
                                  start_new_session=True)
    finally:
        os.close(fd)
    return kernel, since


def _rotate_if_big(path) -> None:
    """Move path to path.1 (replacing an older one) once it is past KERNEL_OUT_MAX. The
    kernel logs to log/kernel.log (rotated by size); kernel.out holds only its boot line
    and what bypasses logging (a crash's traceback), and this bounds it across boots."""
    try:
        if os.stat(path, follow_symlinks=False).st_size > KERNEL_OUT_MAX:
            os.replace(path, f"{path}.1")        # a planted symlink is moved, not followed
    except FileNotFoundError:
        pass


def await_kernel(h, kernel, since: int, timeout: float = BOOT_TIMEOUT) -> None:
    """Return once `kernel` holds the home and answers a ping (never another kernel).
    If it exits first, print what it wrote to kernel.out since `since` and fail."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if kernel.poll() is not None:
            click.echo(_kernel_output(h, since), err=True, nl=False)
            raise click.ClickException(f"the kernel exited with status {kernel.returncode} "
                                       f"before it answered (its output: {h.kernel_out})")
        if h.running_pid() == kernel.pid and _answers(h):
            return
        time.sleep(0.1)
    raise click.ClickException(f"kernel {kernel.pid} did not answer within {timeout:.0f}s; "
                               f"it may still be booting (its output: {h.kernel_out})")


def _kernel_output(h, since: int) -> str:
    """What the kernel wrote to kernel.out from offset since."""
    try:
        fd = os.open(h.kernel_out, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError:
        return ""
    with os.fdopen(fd, "rb") as f:
        f.seek(since)
        return f.read().decode(errors="replace")


def _answers(h) -> bool:
    """The kernel on h's socket answers a ping."""
    from llmos.syscalls import Connection, KernelDead, Sys, SyscallError
    if not h.socket_path.exists():
        return False
    try:
        with Connection(h.socket_url, timeout=2, dead_after=2) as c:
            c.call(Sys.PING)
        return True
    except (KernelDead, SyscallError):
        return False


@click.command()
@click.option("--home", default=None, help="Kernel home (default $LLMOS_HOME or ~/.llmos).")
@click.option("--timeout", default=30.0, show_default=True,
              help="Seconds to wait for the kernel to stop.")
def down(home, timeout) -> None:
    """Shut the kernel down (SIGTERM): calls in flight fail, children are terminated."""
    import signal

    from llmos.syscalls.home import Home
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
