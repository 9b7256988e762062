"""`llmos top`: the kernel at a glance, refreshed: models, policy, tokens per second in
and out, the KV pools and swap, the host's CPU and memory, and one row per process with
its tokens per second (the kernel's sampler measures them per process).

    llmos top               a live view with keys (userland/topview.py), every --delay seconds
    llmos top -b -n 3       three snapshots as plain text, as top's batch mode
    llmos top --json -n 3   one JSON object per snapshot, one per line

Totals per second come from the kernel's counters between two snapshots: the first
snapshot of a run has none ("-"), and the 10 s average is over the snapshots of the last
10 seconds. The parts here are plain functions over a Snap (what to show, in what order,
as text); show() and batch() take an SDK Kernel, so `llmos shell` runs them on its own
connection. Nothing here imports prompt_toolkit until show() runs.
"""
from __future__ import annotations

import json
import sys
import time
from collections import defaultdict, deque
from dataclasses import dataclass, field

import click
import psutil

from llmos.syscalls.types import ProcState, to_wire
from llmos.userland import listing
from llmos.userland.cmdline import client, connect_home

TOP_HEADER = ["PID", "PPID", "STATE", "NI", "KV", "KV_SWAP", "TOK/S_IN", "TOK/S_OUT", "TOK_IN",
              "TOK_OUT", "CALLS", "CPU%", "RSS", "AGE", "NAME"]
BAR = 24              # characters of a usage bar
WINDOW = 10.0         # seconds of the longer tokens-per-second average
_STATES = list(ProcState)
# How each column sorts: its value, and whether the biggest comes first (rates, counters,
# sizes and age do, as in top; pid, state, nice and name read best ascending). Ties: by pid.
SORT_KEYS = {
    "PID": (lambda p: p.pid, False), "PPID": (lambda p: p.ppid, False),
    "STATE": (lambda p: _STATES.index(p.state), False), "NI": (lambda p: p.nice, False),
    "KV": (lambda p: p.kv_blocks, True), "KV_SWAP": (lambda p: p.kv_swapped, True),
    "TOK/S_IN": (lambda p: p.tok_in_s, True), "TOK/S_OUT": (lambda p: p.tok_out_s, True),
    "TOK_IN": (lambda p: p.tokens_in, True), "TOK_OUT": (lambda p: p.tokens_out, True),
    "CALLS": (lambda p: p.calls, True), "CPU%": (lambda p: p.cpu_percent, True),
    "RSS": (lambda p: p.rss or 0, True), "AGE": (lambda p: p.age, True),
    "NAME": (lambda p: p.name, False),
}


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
    metrics: object = None     # the kernel's Metrics (what /metrics of `llmos serve` shows)


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


@dataclass(frozen=True)
class Order:
    """How the process table is arranged. Order() is batch mode's: the busiest first."""
    column: str = "TOK/S_OUT"      # a TOP_HEADER name
    reverse: bool = False          # against the column's own direction (SORT_KEYS)
    name: str = ""                 # only NAMEs containing this (any case); "" shows all
    tree: bool = False             # each process after its parent, NAME indented by depth


def read(k) -> Snap:
    """One snapshot: five syscalls, none of which waits on the engine."""
    vm = psutil.virtual_memory()
    return Snap(time.time(), k.sysinfo(), k.meminfo(), k.ps(), k.models(),
                psutil.cpu_percent(None), (vm.total - vm.available, vm.total), k.metrics())


def render(snap: Snap, rates: dict, order: Order | None = None) -> str:
    """The snapshot as top's text: header lines, then the process table. With an order (the
    live view), the table is arranged by it, its sort column is marked with an arrow and
    the line above the table names its filter and tree view; without one, as batch mode."""
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
        f"({WINDOW:g} s); {requests(snap.metrics)}",
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
    rows = arrange(snap.procs, order or Order())
    if order is not None:
        lines[-1] = _view_line(order, len(rows), len(snap.procs))
    return "\n".join(lines) + ("\n" if lines[-1] else "") + table(rows, order)


def arrange(procs: list, order: Order) -> list[tuple[int, object]]:
    """(depth, ProcInfo) of the processes order shows, in its order. Depth is 0 but in a
    tree, where siblings keep the sort order and one whose parent is not shown is a root."""
    key, descending = SORT_KEYS[order.column]
    name = order.name.lower()
    shown = sorted((p for p in procs if name in p.name.lower()), key=lambda p: p.pid)
    shown.sort(key=key, reverse=descending != order.reverse)      # stable: ties stay by pid
    return _tree(shown) if order.tree else [(0, p) for p in shown]


def _tree(procs: list) -> list[tuple[int, object]]:
    """procs depth-first from their roots, each parent before its children."""
    pids = {p.pid for p in procs}
    children = defaultdict(list)
    for p in procs:
        children[p.ppid].append(p)
    out, seen = [], set()

    def visit(p, depth):
        seen.add(p.pid)
        out.append((depth, p))
        for child in children[p.pid]:
            if child.pid not in seen:
                visit(child, depth + 1)

    for p in procs:
        if p.ppid not in pids:
            visit(p, 0)
    for p in procs:          # left: a cycle of parents, which a kernel's table never has
        if p.pid not in seen:
            visit(p, 0)
    return out


def table(rows: list[tuple[int, object]], order: Order | None = None) -> str:
    """The process table of arrange()'s rows; with an order, its column marked ↓ (biggest
    first) or ↑ in the header."""
    header = list(TOP_HEADER)
    if order is not None:
        i = header.index(order.column)
        header[i] += "↓" if SORT_KEYS[order.column][1] != order.reverse else "↑"
    left = tuple(h for h, plain in zip(header, TOP_HEADER) if plain in ("STATE", "NAME"))
    cells = [[p.pid, p.ppid, p.state.value, p.nice, p.kv_blocks, p.kv_swapped,
              f"{p.tok_in_s:.1f}", f"{p.tok_out_s:.1f}", p.tokens_in, p.tokens_out, p.calls,
              f"{p.cpu_percent:.1f}", listing.size(p.rss), listing.duration(p.age),
              ("  " * (depth - 1) + "`- " if depth else "") + p.name]
             for depth, p in rows]
    return listing.columns(header, cells, left=left)


def column(text: str) -> str:
    """The TOP_HEADER name text means: itself in any case, else the one name it begins.
    Raises ValueError, naming the choices, when it means none or several."""
    text = text.strip().upper()
    if text in TOP_HEADER:
        return text
    matches = [h for h in TOP_HEADER if h.startswith(text)] if text else []
    if len(matches) == 1:
        return matches[0]
    if matches:
        raise ValueError(f"column {text!r} could be {' '.join(matches)}")
    raise ValueError(f"no column {text!r}: one of {' '.join(TOP_HEADER)}")


def _view_line(order: Order, shown: int, total: int) -> str:
    parts = [f"filter {order.name!r}: {shown} of {total} shown"] if order.name else []
    return "; ".join(parts + (["tree view"] if order.tree else []))


def json_line(snap: Snap, rates: dict) -> str:
    """The snapshot and its rates as one line of JSON (--json)."""
    return json.dumps({"at": snap.at, "sysinfo": to_wire(snap.sysinfo),
                       "mem": to_wire(snap.mem), "procs": to_wire(snap.procs),
                       "models": to_wire(snap.models), "metrics": to_wire(snap.metrics),
                       "rates": rates,
                       "host": {"cpu_percent": snap.host_cpu, "mem_used": snap.host_mem[0],
                                "mem_total": snap.host_mem[1]}})


def requests(m) -> str:
    """The kernel's requests now and its time to first token so far (its metrics)."""
    if m is None:
        return "requests -"
    running, waiting = sum(x.running for x in m.models), sum(x.waiting for x in m.models)
    counts = [sum(c) for c in zip(*(x.ttft.counts for x in m.models))] if m.models else []
    bounds = m.models[0].ttft.bounds if m.models else []
    return (f"requests {running} running, {waiting} waiting; ttft p50 "
            f"{quantile(bounds, counts, 0.5)} p99 {quantile(bounds, counts, 0.99)}")


def quantile(bounds, counts, q: float) -> str:
    """The bucket bound below which q of a histogram's observations lie ("<=0.1s"), as
    Prometheus' histogram_quantile would bracket it; "-" with none."""
    total = sum(counts)
    if not total:
        return "-"
    seen = 0
    for bound, n in zip(list(bounds) + [None], counts):
        seen += n
        if seen >= q * total:
            return f"<={bound:g}s" if bound is not None else f">{bounds[-1]:g}s"
    return "-"


def bar(used: int, total: int) -> str:
    filled = round(BAR * used / total) if total else 0
    return "[" + "#" * filled + "." * (BAR - filled) + "]"


def _pair(rate) -> str:
    return "-/-" if rate is None else f"{rate[0]:.0f}/{rate[1]:.0f}"


def batch(k, iterations: int | None, delay: float, as_json: bool, echo=click.echo) -> None:
    """Echo a snapshot of kernel k every delay seconds, as text (a blank line after each) or
    as one JSON object a line; stop after `iterations` (None: until Ctrl-C, which returns)."""
    psutil.cpu_percent(None)                     # primes the host CPU figure
    rates = Rates()
    shown = 0
    try:
        while iterations is None or shown < iterations:
            if shown:
                time.sleep(delay)
            snap = read(k)
            r = rates.add(snap)
            echo(json_line(snap, r) if as_json else render(snap, r) + "\n")
            shown += 1
    except KeyboardInterrupt:
        pass


def show(k, delay: float = 0.5, input=None, output=None,
         iterations: int | None = None) -> None:
    """The live view of kernel k with keys, refreshed every delay seconds, until the user
    quits (q or Ctrl-C) or after `iterations` snapshots. input/output: prompt_toolkit's
    Input and Output (None: the terminal). SDK errors show on its bottom line; none is
    raised."""
    from llmos.userland.topview import TopView
    TopView(k, delay, input=input, output=output, iterations=iterations).run()


@click.command()
@click.option("-b", "--batch", "batch_", is_flag=True,
              help="Plain text snapshots, one after another.")
@click.option("-n", "--iterations", type=click.IntRange(min=1), default=None,
              help="Stop after N snapshots (default: until q or Ctrl-C).")
@click.option("-d", "--delay", type=click.FloatRange(min=0.1), default=0.5, show_default=True,
              help="Seconds between snapshots.")
@click.option("--json", "as_json_", is_flag=True, help="One JSON object per snapshot, a line each.")
@client
def top(batch_, iterations, delay, as_json_, home) -> None:
    """Show processes, tokens per second, KV and models, refreshed. The live view's keys:
    s sort, k kill, n renice, f filter, t tree, q quit."""
    live = not (batch_ or as_json_)
    if live and not (sys.stdin.isatty() and sys.stdout.isatty()):
        raise click.ClickException("the live view needs a terminal: use -b (text) or --json")
    k = connect_home(home)
    if live:
        show(k, delay, iterations=iterations)
    else:
        batch(k, iterations, delay, as_json_)
