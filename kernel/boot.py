"""Booting the kernel: `llmos up` runs `boot`, which reads as the table of contents.

    python -m llmos.kernel [--home DIR] [--model tiny] [--driver cpu] [--kv-memory 512M]
                           [--listen tcp://HOST:PORT [--no-curve]] [--sched NAME] [--dtype D]
                           [--kv-ttl SECONDS] [--kv-disk SIZE] [--kv-swap SIZE] [--no-kv-paging]
                           [--limit NAME=VALUE ...]

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

from llmos.syscalls.errors import SyscallError
from llmos.syscalls.home import Home, HomeError
from llmos.syscalls.specs import parse_limit

from . import agentuser, limits, subreaper, tunables
from .home import HomeLock
from .logfile import LogFile, LogHandler

log = logging.getLogger("llmos.kernel")
GRACE = 5.0       # seconds children get between SIGTERM and SIGKILL at shutdown


def boot(home_dir=None, model="tiny", driver="cpu", kv_memory=None,
         heartbeat_timeout: float = tunables.HEARTBEAT_TIMEOUT,
         agent_user: str | None = None, listen: str | None = None, curve: bool = True,
         max_agents: int | None = None, sched: str | None = None, kv_ttl: float | None = None,
         kv_disk: str | int | None = None, default_limits: dict | None = None,
         kv_paging: bool = True, kv_swap: str | int | None = None, dtype: str | None = None) -> int:
    """Boot, serve until told to stop, shut down. Returns the exit status. agent_user: the
    user agents run as (kernel/agentuser.py; root only), else the kernel's own uid.
    listen: a tcp endpoint served besides the home's socket, with CURVE unless not curve.
    max_agents: live agent processes at most (default: by memory, kernel/proc.py).
    sched, kv_ttl, kv_disk: the engine's scheduling policy, how long an idle context stays
    resident, the disk tier's size (in HOME/kv/); None: the engine's defaults. kv_paging
    False: idle contexts stay resident (a baseline for bench/agent_workload.py). kv_swap:
    the host swap pool's size (default: half the device pool's blocks). dtype: "auto"
    (None) or a dtype name for the weights and KV (load.pick_dtype).
    default_limits: {name: value, None: no limit} over the kernel-wide defaults."""
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
        engine = Engine.from_pretrained(model, driver=driver,   # 2. the model, KV pool, policy
                                        kv_memory=kv_memory, kv_paging=kv_paging,
                                        **_engine_options(lock, sched, kv_ttl, kv_disk,
                                                          kv_swap, dtype))
        _inject_faults(engine)
        kernel = Supervisor(home, engine, str(model), token,     # 3. processes, engine loop
                            agent_user=user, max_agents=max_agents,
                            default_limits=default_limits)
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
    log.info("default limits: %s", kernel.procs.default_limits)
    kernel.loop.run()                                        # 7. serve: the engine, this thread
    log.info("shutting down: %s", stopped_by[0] if stopped_by else "engine crashed")
    server.close(cancel=True)                                # 8. calls in flight get ECANCELED
    kernel.procs.shutdown(GRACE)                             # 9. children: TERM, then KILL
    subreaper.kill_descendants(kernel.procs, GRACE)          # 10. what they left: the same
    kernel.close()
    lock.release()                                           # 11. socket, token, pid file
    return 1 if kernel.dead.is_set() else 0


def _engine_options(lock, sched, kv_ttl, kv_disk, kv_swap, dtype=None) -> dict:
    """The engine's options that were given (the rest take the engine's defaults); a disk
    tier gets the home's private kv/ directory."""
    given = {"policy": sched, "kv_ttl": kv_ttl, "kv_disk": kv_disk, "kv_swap": kv_swap,
             "dtype": dtype}
    if kv_disk is not None:
        lock.private_dir(lock.home.kv_dir)
        given["kv_disk_dir"] = lock.home.kv_dir
    return {k: v for k, v in given.items() if v is not None}


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


def _limit(text: str) -> tuple:
    """argparse type of --limit: NAME=VALUE as (name, value, None for no limit)."""
    try:
        name, value = parse_limit(text)
    except SyscallError as e:
        raise argparse.ArgumentTypeError(e.msg) from None
    return name, limits.asked({name: value})[name]


def _seconds(text: str) -> float:
    s = float(text)
    if not s >= 0 or s == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number of seconds >= 0, got {text}")
    return s


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
    ap.add_argument("--sched", default=None, metavar="NAME",
                    help=f"scheduling policy (default {tunables.DEFAULT_POLICY}); `llmos "
                         f"sched` lists them and switches it later")
    ap.add_argument("--dtype", default=None, choices=["auto", "float32", "bfloat16", "float16"],
                    help="weights and KV dtype (default auto: bfloat16 where the hardware "
                         "computes it natively, else float32)")
    ap.add_argument("--kv-ttl", type=_seconds, default=None, metavar="SECONDS",
                    help=f"seconds an idle context's KV stays resident before it may be "
                         f"paged out (default {tunables.KV_TTL:g})")
    ap.add_argument("--kv-disk", default=None, metavar="SIZE",
                    help="a disk tier for paged-out KV, e.g. 4G, in HOME/kv (default: none)")
    ap.add_argument("--kv-swap", default=None, metavar="SIZE",
                    help="the host swap pool for preempted and paged-out KV, e.g. 1G "
                         "(default: half the KV pool)")
    ap.add_argument("--no-kv-paging", dest="kv_paging", action="store_false",
                    help="idle contexts stay in the device pool (no virtual memory for KV)")
    ap.add_argument("--limit", type=_limit, action="append", default=[], metavar="NAME=VALUE",
                    help="a default per-process limit (calls, kv_blocks, contexts, children, "
                         "tokens_per_s), a number or 'unlimited'; repeatable")
    args = ap.parse_args(argv)
    try:
        if args.listen:
            from .endpoints import check_listen
            check_listen(args.listen, args.curve)        # before the model loads: fail fast
        return boot(args.home, args.model, args.driver, args.kv_memory, args.heartbeat_timeout,
                    agent_user=args.agent_user, listen=args.listen, curve=args.curve,
                    max_agents=args.max_agents, sched=args.sched, kv_ttl=args.kv_ttl,
                    kv_disk=args.kv_disk, default_limits=dict(args.limit),
                    kv_paging=args.kv_paging, kv_swap=args.kv_swap, dtype=args.dtype)
    except (HomeError, ValueError) as e:       # CheckpointError and bad options are ValueErrors
        print(f"llmos kernel: {e}", file=sys.stderr)
        return 2
