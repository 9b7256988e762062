"""`llmos top`: the kernel at a glance, refreshed: models, policy, tokens per second in
and out, the KV pools and swap, the host's CPU and memory, and one row per process with
its tokens per second (the kernel's sampler measures them per process).

    llmos top               a live view (rich), every --delay seconds, until Ctrl-C
    llmos top -b -n 3       three snapshots as plain text, as top's batch mode
    llmos top --json -n 3   one JSON object per snapshot, one per line

Totals per second come from the kernel's counters between two snapshots: the first
snapshot of a run has none ("-"), and the 10 s average is over the snapshots of the last
10 seconds.
"""
from __future__ import annotations

import json
import time
from collections import deque
from dataclasses import dataclass, field

import click
import psutil

from llmos.syscalls.types import ProcState, to_wire
from llmos.userland import listing
from llmos.userland.commands import _connect, client

TOP_HEADER = ["PID", "PPID", "STATE", "NI", "KV", "KV_SWAP", "TOK/S_IN", "TOK/S_OUT", "TOK_IN",
              "TOK_OUT", "CALLS", "CPU%", "RSS", "AGE", "NAME"]
BAR = 24              # characters of a usage bar
WINDOW = 10.0         # seconds of the longer tokens-per-second average


@dataclass
class Snap:
    """What one refresh read from the kernel, and when."""
    at: float
    sysinfo: object
    mem: object
    procs: list
    models: list
    host_cpu: float
    host_mem: tuple            # (used, total) bytes


@dataclass
class Rates:
    """Tokens per second over the last interval and over WINDOW seconds, from counters."""
    history: deque = field(default_factory=deque)       # (at, computed, generated)

    def add(self, snap: Snap) -> dict:
        s = snap.sysinfo
        self.history.append((snap.at, s.computed_tokens, s.generated_tokens))
        while len(self.history) > 2 and snap.at - self.history[1][0] >= WINDOW:
            self.history.popleft()
        return {"last": self._rate(self.history[-2] if len(self.history) > 1 else None),
                "window": self._rate(self.history[0] if len(self.history) > 1 else None)}

    def _rate(self, then) -> tuple | None:
        if then is None:
            return None
        at, computed, generated = self.history[-1]
        dt = at - then[0]
        return ((computed - then[1]) / dt, (generated - then[2]) / dt) if dt > 0 else None


def read(k) -> Snap:
    """One snapshot: four syscalls, none of which waits on the engine."""
    vm = psutil.virtual_memory()
    return Snap(time.time(), k.sysinfo(), k.meminfo(), k.ps(), k.models(),
                psutil.cpu_percent(None), (vm.total - vm.available, vm.total))


def render(snap: Snap, rates: dict) -> str:
    """The snapshot as top's text: header lines, then the process table."""
    s, kv = snap.sysinfo, snap.mem.kv
    models = ", ".join(m.name + ("*" if m.default else "") for m in snap.models
                       if m.state == "ready") or "none loaded"
    states = {st: sum(p.state is st for p in snap.procs) for st in ProcState}
    lines = [
        f"llmos top - {time.strftime('%H:%M:%S', time.localtime(snap.at))} up "
        f"{listing.duration(s.uptime)}, models: {models}, policy {s.policy}, driver {s.driver}",
        "procs: {} total, {} running, {} ready, {} sleeping, {} stopped, {} zombie".format(
            len(snap.procs), *(states[st] for st in (ProcState.RUNNING, ProcState.READY,
                                                     ProcState.SLEEPING, ProcState.STOPPED,
                                                     ProcState.ZOMBIE))),
        f"tokens/s in/out: {_pair(rates['last'])} (last), {_pair(rates['window'])} "
        f"({WINDOW:g} s); queue {sum(p.calls for p in snap.procs)} calls",
        f"KV   {bar(kv.used, kv.total)} {kv.used}/{kv.total} blocks used, {kv.cached} cached, "
        f"{kv.free} free",
        f"swap {bar(kv.swap_total - kv.swap_free, kv.swap_total)} "
        f"{kv.swap_total - kv.swap_free}/{kv.swap_total} blocks; disk "
        f"{snap.mem.disk_used}/{snap.mem.disk_total}",
        f"host cpu {snap.host_cpu:.0f}%, mem {listing.size(snap.host_mem[0])}/"
        f"{listing.size(snap.host_mem[1])}; models {listing.size(snap.mem.memory_used) or '0'}"
        f" of {listing.size(snap.mem.memory_budget) or '0'}",
        "",
    ]
    rows = [[p.pid, p.ppid, p.state.value, p.nice, p.kv_blocks, p.kv_swapped,
             f"{p.tok_in_s:.1f}", f"{p.tok_out_s:.1f}", p.tokens_in, p.tokens_out, p.calls,
             f"{p.cpu_percent:.1f}", listing.size(p.rss), listing.duration(p.age), p.name]
            for p in sorted(snap.procs, key=lambda p: (-p.tok_out_s, p.pid))]
    return "\n".join(lines) + listing.columns(TOP_HEADER, rows, left=("STATE", "NAME"))


def as_json(snap: Snap, rates: dict) -> str:
    return json.dumps({"at": snap.at, "sysinfo": to_wire(snap.sysinfo),
                       "mem": to_wire(snap.mem), "procs": to_wire(snap.procs),
                       "models": to_wire(snap.models), "rates": rates,
                       "host": {"cpu_percent": snap.host_cpu, "mem_used": snap.host_mem[0],
                                "mem_total": snap.host_mem[1]}})


def bar(used: int, total: int) -> str:
    filled = round(BAR * used / total) if total else 0
    return "[" + "#" * filled + "." * (BAR - filled) + "]"


def _pair(rate) -> str:
    return "-/-" if rate is None else f"{rate[0]:.0f}/{rate[1]:.0f}"


@click.command()
@click.option("-b", "--batch", is_flag=True, help="Plain text snapshots, one after another.")
@click.option("-n", "--iterations", type=click.IntRange(min=1), default=None,
              help="Stop after N snapshots (default: until Ctrl-C).")
@click.option("-d", "--delay", type=click.FloatRange(min=0.1), default=0.5, show_default=True,
              help="Seconds between snapshots.")
@click.option("--json", "as_json_", is_flag=True, help="One JSON object per snapshot, a line each.")
@client
def top(batch, iterations, delay, as_json_, home) -> None:
    """Show processes, tokens per second, KV and models, refreshed (Ctrl-C quits)."""
    k = _connect(home)
    psutil.cpu_percent(None)                     # primes the host CPU figure
    rates = Rates()
    shown = 0
    live = None
    if not (batch or as_json_):
        from rich.live import Live
        from rich.text import Text
        live = Live(Text(""), auto_refresh=False, screen=True)
        live.start()
    try:
        while iterations is None or shown < iterations:
            if shown:
                time.sleep(delay)
            snap = read(k)
            r = rates.add(snap)
            if as_json_:
                click.echo(as_json(snap, r))
            elif live is not None:
                live.update(Text(render(snap, r)), refresh=True)
            else:
                click.echo(render(snap, r) + "\n")
            shown += 1
    except KeyboardInterrupt:
        pass
    finally:
        if live is not None:
            live.stop()
