"""Booting the kernel: `llmos up` runs `boot`, which reads as the table of contents.

    python -m llmos.kernel [--home DIR] [--model tiny] [--driver cpu] [--kv-memory 512M]
                           [--listen tcp://HOST:PORT [--no-curve]]

Exit status: 0 after a clean shutdown (SIGTERM, SIGINT, `llmos down`), 1 when the
engine crashed, 2 when it could not boot (the message, on stderr, says why).
"""
from __future__ import annotations

import argparse
import functools
import logging
import os
import signal
import sys

from llmos.syscalls.home import Home, HomeError

from . import agentuser, subreaper, tunables
from .home import HomeLock
from .logfile import LogFile, LogHandler

log = logging.getLogger("llmos.kernel")
GRACE = 5.0       # seconds children get between SIGTERM and SIGKILL at shutdown


def boot(home_dir=None, model="tiny", driver="cpu", kv_memory=None,
         heartbeat_timeout: float = tunables.HEARTBEAT_TIMEOUT,
         agent_user: str | None = None, listen: str | None = None, curve: bool = True,
         max_agents: int | None = None) -> int:
    """Boot, serve until told to stop, shut down. Returns the exit status. agent_user: the
    user agents run as (kernel/agentuser.py; root only), else the kernel's own uid.
    listen: a tcp endpoint served besides the home's socket, with CURVE unless not curve.
    max_agents: live agent processes at most (default: by memory, kernel/proc.py)."""
    from .engine import Engine
    from .kernel import Supervisor
    from .server import Server
    from .syscall import SyscallTable, install

    _few_malloc_arenas()
    home = Home(home_dir)
    user = agentuser.lookup(agent_user, home.path) if agent_user else None
    lock = HomeLock(home)
    token = lock.acquire()                                   # 1. the home, locked
    try:
        _log_to(home.kernel_log)
        log.info("booting: model %s, driver %s", model, driver)
        engine = Engine.from_pretrained(model, driver=driver,   # 2. the model and KV pool
                                        kv_memory=kv_memory)
        _inject_faults(engine)
        kernel = Supervisor(home, engine, str(model), token,     # 3. processes, engine loop
                            agent_user=user, max_agents=max_agents)
        subreaper.adopt(kernel.procs, kernel.timers)         # 4. orphans below us are ours
        table = SyscallTable()
        install(table, kernel)                               # 5. the syscall table
        server = Server(home.socket_url, table,              # 6. the sockets
                        on_peer_gone=kernel.peer_gone, **_tcp(home, listen, curve)).start()
        if user:
            lock.share_socket(user.gid)                      # agents under another uid reach it
            log.info("agents run as user %s (uid %d, gid %d) in %s", user.name, user.uid,
                     user.gid, user.cwd)
    except BaseException:
        lock.release()
        raise
    kernel.watch_silence(server, heartbeat_timeout)
    stopped_by = _stop_on_signals(kernel)
    where = " and ".join(server.bound)
    print(f"llmos kernel {os.getpid()} listening on {where}", flush=True)
    log.info("listening on %s (driver %s, %d KV blocks)", where, engine.driver.name,
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


def _tcp(home, listen, curve: bool) -> dict:
    """The Server's options for --listen: CURVE with the home's server key (made at the
    first such boot) and its allow-list of client keys, read at every new connection."""
    if not listen:
        return {}
    if not curve:
        return {"listen": listen}
    from llmos.syscalls import keys
    public, secret = keys.server_keys(home, create=True)
    log.info("tcp clients need the server key %s (%s)", public.decode(),
             home.keys_dir / f"{keys.SERVER}.pub")
    if not keys.allowed(home):
        log.warning("no client key is allowed yet: every tcp client is refused until "
                    "`llmos keys allow` names one")
    return {"listen": listen, "curve_secret_key": secret,
            "allowed": functools.partial(keys.allowed, home)}


def _log_to(path) -> None:
    """The kernel's log: path (in the home's log/), rotated by size (kernel/logfile.py).
    Ours at INFO, other libraries' warnings too: stdout and stderr (log/kernel.out when
    detached) keep only the boot line and what bypasses logging."""
    handler = LogHandler(LogFile(path.parent, path.name, tunables.KERNEL_LOG_MAX,
                                 tunables.KERNEL_LOG_KEEP))
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(handler)
    logging.getLogger("llmos").setLevel(logging.INFO)
    logging.captureWarnings(True)                    # warnings.warn: to the log as well


def _positive(text: str) -> int:
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {n}")
    return n


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m llmos.kernel",
                                 description="The llmos kernel daemon (`llmos up` runs it).")
    ap.add_argument("--home", default=None, help="home directory (default $LLMOS_HOME or ~/.llmos)")
    ap.add_argument("--model", default="tiny", help='a Hugging Face model directory, or "tiny"')
    ap.add_argument("--driver", default="cpu", help='cpu, cuda, a plugin, or "auto"')
    ap.add_argument("--kv-memory", default=None, help="KV pool size, e.g. 512M")
    ap.add_argument("--heartbeat-timeout", type=float, default=tunables.HEARTBEAT_TIMEOUT,
                    help="seconds of silence after which an attached program is reaped")
    ap.add_argument("--agent-user", default=None,
                    help="run agents as this user (a kernel running as root only)")
    ap.add_argument("--listen", default=None, metavar="tcp://HOST:PORT",
                    help="also serve this tcp endpoint, with CURVE and the allow-list of "
                         "HOME/keys/allowed (see `llmos keys`)")
    ap.add_argument("--no-curve", dest="curve", action="store_false",
                    help="--listen without CURVE: a loopback address only")
    ap.add_argument("--max-agents", type=_positive, default=None, metavar="N",
                    help="agent processes running at once, at most (default: one per 64 MiB "
                         "of memory, 16 to 1024)")
    args = ap.parse_args(argv)
    try:
        if args.listen:
            from .endpoints import check_listen
            check_listen(args.listen, args.curve)        # before the model loads: fail fast
        return boot(args.home, args.model, args.driver, args.kv_memory, args.heartbeat_timeout,
                    agent_user=args.agent_user, listen=args.listen, curve=args.curve,
                    max_agents=args.max_agents)
    except (HomeError, ValueError) as e:       # CheckpointError and bad options are ValueErrors
        print(f"llmos kernel: {e}", file=sys.stderr)
        return 2
