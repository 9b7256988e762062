"""The kernel daemon: `llmos up` runs `boot`, which reads as the table of contents.

    python -m llmos.kernel.daemon [--home DIR] [--model tiny] [--driver cpu] [--kv-memory 512M]

Exit status: 0 after a clean shutdown (SIGTERM, SIGINT, `llmos down`), 1 when the
engine crashed, 2 when it could not boot (the message says why).
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys

from .home import Home, HomeError

log = logging.getLogger("llmos.kernel")
GRACE = 5.0       # seconds children get between SIGTERM and SIGKILL at shutdown
HEARTBEAT_TIMEOUT = 30.0   # s of silence after which an attached program is taken for dead


def boot(home_dir=None, model="tiny", driver="cpu", kv_memory=None,
         heartbeat_timeout: float = HEARTBEAT_TIMEOUT) -> int:
    """Boot, serve until told to stop, shut down. Returns the exit status."""
    from llmos.syscalls import Server, SyscallTable
    from llmos.syscalls.handlers import install

    from .engine import Engine
    from .kernel import Kernel

    home = Home(home_dir)
    token = home.acquire()                                   # 1. the home, locked
    try:
        _log_to(home.kernel_log)
        log.info("booting: model %s, driver %s", model, driver)
        engine = Engine.from_pretrained(model, driver=driver,   # 2. the model and KV pool
                                        kv_memory=kv_memory)
        _inject_faults(engine)
        kernel = Kernel(home, engine, str(model), str(driver))   # 3. engine loop, procs
        table = SyscallTable()
        install(table, kernel, token)                        # 4. the syscall table
        server = Server(home.socket_url, table,              # 5. the socket
                        on_peer_gone=lambda conn: _peer_gone(kernel, conn)).start()
    except BaseException:
        home.release()
        raise
    kernel.watch_silence(server, heartbeat_timeout)
    stopped_by = _stop_on_signals(kernel)
    print(f"llmos kernel {os.getpid()} listening on {home.socket_url}", flush=True)
    log.info("listening on %s", home.socket_url)
    kernel.loop.run()                                        # 6. serve: the engine, this thread
    kernel.stopping.set()
    log.info("shutting down: %s", stopped_by[0] if stopped_by else "engine crashed")
    server.close(cancel=True)                                # 7. calls in flight get ECANCELED
    kernel.procs.shutdown(GRACE)                             # 8. children: TERM, then KILL
    home.release()                                           # 9. socket, token, pid file
    return 1 if kernel.dead.is_set() else 0


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
    from . import tunables
    if os.environ.get(tunables.FAULT_ENV) == "engine-crash":
        def step():
            raise RuntimeError("injected engine crash ($LLMOS_FAULT=engine-crash)")
        engine.step = step


def _peer_gone(kernel, conn) -> None:
    """An attached program's connection is gone: it has exited."""
    if conn.pid is None:
        return
    try:
        proc = kernel.procs.get(conn.pid)
        if proc.attached and proc.alive:
            kernel.procs.detach(conn.pid, None)
    except Exception as e:           # already reaped
        log.debug("peer gone for pid %s: %s", conn.pid, e)


def _log_to(path) -> None:
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("llmos")
    root.addHandler(handler)
    root.setLevel(logging.INFO)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="llmos-kernel", description=__doc__.split("\n")[0])
    ap.add_argument("--home", default=None)
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--driver", default="cpu")
    ap.add_argument("--kv-memory", default=None)
    ap.add_argument("--heartbeat-timeout", type=float, default=HEARTBEAT_TIMEOUT)
    args = ap.parse_args(argv)
    try:
        return boot(args.home, args.model, args.driver, args.kv_memory, args.heartbeat_timeout)
    except (HomeError, ValueError) as e:       # CheckpointError and bad options are ValueErrors
        print(f"llmos kernel: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
