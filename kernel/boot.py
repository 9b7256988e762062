"""Booting the kernel: `llmos up` runs `boot`, which reads as the table of contents.

    python -m llmos.kernel [--home DIR] [--model tiny ...] [--driver cpu] [--kv-memory 512M]
                           [--memory 6G] [--keep-alive 5m] [--quantize int8]
                           [--listen tcp://HOST:PORT [--no-curve]] [--sched NAME] [--dtype D]
                           [--kv-ttl SECONDS] [--kv-disk SIZE] [--kv-swap SIZE] [--no-kv-paging]
                           [--limit NAME=VALUE ...]

Exit status: 0 after a clean shutdown (SIGTERM, SIGINT, `llmos down`), 1 when the
engine crashed, 2 when it could not boot (the message, on stderr, says why).
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import logging
import os
import signal
import sys

from llmos.syscalls.errors import SyscallError
from llmos.syscalls.home import Home, HomeError
from llmos.syscalls.specs import parse_limit
from llmos.syscalls.args import duration

from . import agentuser, limits, subreaper, tunables
from .home import HomeLock
from .logfile import LogFile, LogHandler

log = logging.getLogger("llmos.kernel")
GRACE = 5.0       # seconds children get between SIGTERM and SIGKILL at shutdown


def boot(home_dir=None, model: str | list = "tiny", driver="cpu", kv_memory=None,
         heartbeat_timeout: float = tunables.HEARTBEAT_TIMEOUT,
         agent_user: str | None = None, listen: str | None = None, curve: bool = True,
         max_agents: int | None = None, sched: str | None = None, kv_ttl: float | None = None,
         kv_disk: str | int | None = None, default_limits: dict | None = None,
         kv_paging: bool = True, kv_swap: str | int | None = None, dtype: str | None = None,
         memory: str | int | None = None, keep_alive: float | None = None,
         quantize: str | None = None) -> int:
    """Boot, serve until told to stop, shut down. Returns the exit status. agent_user: the
    user agents run as (kernel/agentuser.py; root only), else the kernel's own uid.
    listen: a tcp endpoint served besides the home's socket, with CURVE unless not curve.
    max_agents: live agent processes at most (default: by memory, kernel/proc.py).
    sched, kv_ttl, kv_disk: the engine's scheduling policy, how long an idle context stays
    resident, the disk tier's size (in HOME/kv/); None: the engine's defaults. kv_paging
    False: idle contexts stay resident (a baseline for bench/agent_workload.py). kv_swap:
    the host swap pool's size (default: half the device pool's blocks). dtype: "auto"
    (None) or a dtype name for the weights and KV (load.pick_dtype); quantize: None or
    "int8", for models whose registry entry says neither. model: a name or a list of
    them, loaded at boot (the first is the default of calls that name none); memory: the
    model table's budget (bytes or "6G"; default: modeltable.default_budget); keep_alive:
    seconds a model loaded on demand stays once idle (negative: forever).
    default_limits: {name: value, None: no limit} over the kernel-wide defaults."""
    from llmos.drivers import get_driver
    from llmos.drivers.base import parse_size

    from .kernel import Supervisor
    from .modeltable import ModelTable
    from .registry import Registry
    from .server import Server
    from .syscall import SyscallTable, install

    _few_malloc_arenas()
    home = Home(home_dir)
    user = agentuser.lookup(agent_user, home.path) if agent_user else None
    lock = HomeLock(home)
    token = lock.acquire()                                   # 1. the home, locked
    try:
        _log_to(home.kernel_log)
        names = [str(m) for m in ([model] if isinstance(model, (str, os.PathLike)) else model)]
        log.info("booting: model %s, driver %s", ", ".join(names), driver)
        registry = Registry(home.path)                       # 2. the models: names, table,
        plan_options, engine_options = _model_options(lock, kv_memory, dtype, quantize,
                                                      kv_swap, kv_disk, sched, kv_ttl, kv_paging)
        models = ModelTable(get_driver(driver), parse_size(memory, "memory") if memory else None,
                            keep_alive=tunables.KEEP_ALIVE if keep_alive is None else keep_alive,
                            plan_options=plan_options, engine_options=engine_options)
        for name in names:                                   #    the boot models loaded
            spec = dataclasses.replace(registry.resolve(name), keep_alive=-1)   # for ever,
            registry.boot(spec)                              # also when reloaded after eviction
            models.load_now(spec, registry.open(spec))
        engine = models.slots[names[0]].engine
        _inject_faults(engine)
        kernel = Supervisor(home, models, registry, names[0], token,  # 3. processes, engine loop
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
    log.info("listening on %s (driver %s; models %s in a budget of %d MiB)", where,
             engine.driver.name, ", ".join(names), models.budget >> 20)
    log.info("default limits: %s", kernel.procs.default_limits)
    kernel.loop.run()                                        # 7. serve: the engine, this thread
    log.info("shutting down: %s", stopped_by[0] if stopped_by else "engine crashed")
    server.close(cancel=True)                                # 8. calls in flight get ECANCELED
    kernel.procs.shutdown(GRACE)                             # 9. children: TERM, then KILL
    subreaper.kill_descendants(kernel.procs, GRACE)          # 10. what they left: the same
    kernel.close()
    lock.release()                                           # 11. socket, token, pid file
    return 1 if kernel.dead.is_set() else 0


def _model_options(lock, kv_memory, dtype, quantize, kv_swap, kv_disk, sched, kv_ttl,
                   kv_paging) -> tuple[dict, dict]:
    """The options of every model's load plan and engine that were given (the rest take
    load.plan's and the engine's defaults); a disk tier gets the home's private kv/
    directory (a subdirectory per model)."""
    plan = {"kv_memory": kv_memory, "dtype": dtype, "quantize": quantize, "kv_swap": kv_swap,
            "kv_disk": kv_disk}
    engine = {"policy": sched, "kv_ttl": kv_ttl, "kv_paging": kv_paging}
    if kv_disk is not None:
        lock.private_dir(lock.home.kv_dir)
        engine["kv_disk_dir"] = lock.home.kv_dir
    return ({k: v for k, v in plan.items() if v is not None},
            {k: v for k, v in engine.items() if v is not None})


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
    ap.add_argument("--model", action="append", default=None,
                    help='a model loaded at boot: a registered name, a Hugging Face directory, '
                         'a .gguf file, or "tiny" (the default); repeatable, the first is the '
                         'default of calls that name none')
    ap.add_argument("--memory", default=None, metavar="SIZE",
                    help="memory for the models' weights and KV pools, e.g. 6G (default: "
                         f"{tunables.MEMORY_FRACTION * 100:.0f}%% of free device memory, at most "
                         f"{tunables.MEMORY_CAP_CPU >> 30}G on a CPU); past it the least "
                         "recently used idle model is unloaded")
    ap.add_argument("--keep-alive", type=duration, default=None, metavar="DURATION",
                    help=f"how long a model loaded on demand stays loaded once idle, e.g. "
                         f"5m, 30s, 1h, -1 for ever (default {tunables.KEEP_ALIVE:g}s)")
    ap.add_argument("--quantize", default=None, choices=["int8"],
                    help="weight-only quantization at load, for models whose registry entry "
                         "does not say (default: none)")
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
        return boot(args.home, args.model or ["tiny"], args.driver, args.kv_memory, args.heartbeat_timeout,
                    agent_user=args.agent_user, listen=args.listen, curve=args.curve,
                    max_agents=args.max_agents, sched=args.sched, kv_ttl=args.kv_ttl,
                    kv_disk=args.kv_disk, default_limits=dict(args.limit),
                    kv_paging=args.kv_paging, kv_swap=args.kv_swap, dtype=args.dtype,
                    memory=args.memory, keep_alive=args.keep_alive, quantize=args.quantize)
    except (HomeError, ValueError, SyscallError) as e:   # CheckpointError is a ValueError;
        # SyscallError: a boot model that does not resolve, open or fit (ENOENT, EINVAL, ENOMEM)
        print(f"llmos kernel: {e}", file=sys.stderr)
        return 2
