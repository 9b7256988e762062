"""Booting the kernel: `llmos up` runs `boot`, which reads as the table of contents.

    python -m llmos.kernel [--home DIR] [--model tiny] [--driver cpu] [--kv-memory 512M]

Exit status: 0 after a clean shutdown (SIGTERM, SIGINT, `llmos down`), 1 when the
engine crashed, 2 when it could not boot (the message, on stderr, says why).
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys

from llmos.syscalls.home import Home, HomeError

from . import subreaper, tunables
from .home import HomeLock

log = logging.getLogger("llmos.kernel")
GRACE = 5.0       # seconds children get between SIGTERM and SIGKILL at shutdown


def boot(home_dir=None, model="tiny", driver="cpu", kv_memory=None,
         heartbeat_timeout: float = tunables.HEARTBEAT_TIMEOUT) -> int:
    """Boot, serve until told to stop, shut down. Returns the exit status."""
    from .engine import Engine
    from .kernel import Supervisor
    from .server import Server
    from .syscall import SyscallTable, install

    _few_malloc_arenas()
    home = Home(home_dir)
    lock = HomeLock(home)
    token = lock.acquire()                                   # 1. the home, locked
    try:
        _log_to(home.kernel_log)
        log.info("booting: model %s, driver %s", model, driver)
        engine = Engine.from_pretrained(model, driver=driver,   # 2. the model and KV pool
                                        kv_memory=kv_memory)
        _inject_faults(engine)
        kernel = Supervisor(home, engine, str(model), token)     # 3. processes, engine loop
        subreaper.adopt(kernel.procs, kernel.timers)         # 4. orphans below us are ours
        table = SyscallTable()
        install(table, kernel)                               # 5. the syscall table
        server = Server(home.socket_url, table,              # 6. the socket
                        on_peer_gone=kernel.peer_gone).start()
    except BaseException:
        lock.release()
        raise
    kernel.watch_silence(server, heartbeat_timeout)
    stopped_by = _stop_on_signals(kernel)
    print(f"llmos kernel {os.getpid()} listening on {home.socket_url}", flush=True)
    log.info("listening on %s (driver %s, %d KV blocks)", home.socket_url, engine.driver.name,
             engine.num_blocks)
    kernel.loop.run()                                        # 7. serve: the engine, this thread
    log.info("shutting down: %s", stopped_by[0] if stopped_by else "engine crashed")
    server.close(cancel=True)                                # 8. calls in flight get ECANCELED
    kernel.procs.shutdown(GRACE)                             # 9. children: TERM, then KILL
    subreaper.kill_descendants(kernel.procs, GRACE)          # 10. what they left: the same
    kernel.close()
    lock.release()                                           # 11. socket, token, pid file
    return 1 if kernel.dead.is_set() else 0


def _few_malloc_arenas() -> None:
    """glibc gives a thread that finds the heap busy an arena of its own, and keeps what
    each arena freed: on a loaded machine the kernel's threads (engine, OpenMP, I/O,
    tokenizers) grew RSS by 100+ MB that way. Two arenas bound it. No-op without glibc."""
    import ctypes
    try:
        ctypes.CDLL("libc.so.6").mallopt(-8, 2)        # M_ARENA_MAX
    except (OSError, AttributeError):
        pass


def _stop_on_signals(kernel) -> list:
    """SIGTERM and SIGINT stop the engine loop; returns the list that names the signal."""
    stopped_by = []

    def on_signal(signum, frame):
        stopped_by.append(signal.Signals(signum).name)
        kernel.loop.stop()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    return stopped_by


def _inject_faults(engine) -> None:
    """Fault injection for tests ($LLMOS_FAULT): "engine-crash" breaks the first step."""
    if os.environ.get(tunables.FAULT_ENV) == "engine-crash":
        def step():
            raise RuntimeError("injected engine crash ($LLMOS_FAULT=engine-crash)")
        engine.step = step


def _log_to(path) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    handler = logging.StreamHandler(os.fdopen(fd, "a", buffering=1))
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("llmos")
    root.addHandler(handler)
    root.setLevel(logging.INFO)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m llmos.kernel",
                                 description="The llmos kernel daemon (`llmos up` runs it).")
    ap.add_argument("--home", default=None, help="home directory (default $LLMOS_HOME or ~/.llmos)")
    ap.add_argument("--model", default="tiny", help='a Hugging Face model directory, or "tiny"')
    ap.add_argument("--driver", default="cpu", help='cpu, cuda, a plugin, or "auto"')
    ap.add_argument("--kv-memory", default=None, help="KV pool size, e.g. 512M")
    ap.add_argument("--heartbeat-timeout", type=float, default=tunables.HEARTBEAT_TIMEOUT,
                    help="seconds of silence after which an attached program is reaped")
    args = ap.parse_args(argv)
    try:
        return boot(args.home, args.model, args.driver, args.kv_memory, args.heartbeat_timeout)
    except (HomeError, ValueError) as e:       # CheckpointError and bad options are ValueErrors
        print(f"llmos kernel: {e}", file=sys.stderr)
        return 2
