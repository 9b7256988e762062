"""How `llmos` shows its listings: plain aligned columns, or one JSON document (--json).

A column is as wide as its widest cell and is never cut: a long line runs long, in a
terminal and in a pipe alike. The column whose cells vary most in width (a name, a
path, a reason) comes last, so a long value never pushes the others out of line.
Empty cells show as "-". Nothing here talks to the kernel or imports torch.
"""
from __future__ import annotations

import dataclasses
import json
import time

import click

from llmos.syscalls.types import to_wire

JSON_HELP = "Print one JSON document instead of columns."


def json_option(fn):
    """Add --json (as the `as_json` argument) to a listing command."""
    return click.option("--json", "as_json", is_flag=True, help=JSON_HELP)(fn)


def to_json(data) -> str:
    """data (syscall result records, or plain data) as one JSON document."""
    return json.dumps(to_wire(data), indent=2)


def columns(header: list[str], rows: list[list], left: tuple[str, ...] = ()) -> str:
    """header and rows as aligned text: the `left` columns left-aligned, the others (numbers)
    right-aligned. None or empty cells show as "-"; lines have no trailing spaces."""
    cells = [list(header)] + [["-" if c is None or c == "" else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    aligned = [[c.ljust(w) if h in left else c.rjust(w) for c, w, h in zip(r, widths, header)]
               for r in cells]
    return "\n".join("  ".join(r).rstrip() for r in aligned)


# ---- ps ------------------------------------------------------------------------------

PS_HEADER = ["PID", "PPID", "STATE", "NI", "KV", "CALLS", "CTX", "TOK_IN", "TOK_OUT",
             "CPU%", "RSS", "AGE", "OS_PID", "NAME"]
# ps -l: the scheduler's view, after KV (blocks swapped out, on disk) and after TOK_OUT
# (service: tokens computed for it; seconds queued and running; preemptions; blocks moved out).
PS_LONG = {"KV": ["KV_SWAP", "KV_DISK"],
           "TOK_OUT": ["SERVICE", "QUEUED", "RUNNING", "PREEMPT", "SWAPS"]}


def ps_text(procs, long: bool = False) -> str:
    """The ps listing of ProcInfo rows (also the live table of `llmos demo`); long: with
    the PS_LONG columns."""
    header, rows = [], []
    for h in PS_HEADER:
        header += [h] + (PS_LONG.get(h, []) if long else [])
    for p in procs:
        more = {"KV": [p.kv_swapped, p.kv_disk],
                "TOK_OUT": [p.service, seconds(p.queued_s), seconds(p.running_s),
                            p.preemptions, p.swaps]} if long else {}
        row = [p.pid, p.ppid, p.state.value, p.nice, p.kv_blocks, p.calls, p.contexts,
               p.tokens_in, p.tokens_out, f"{p.cpu_percent:.1f}", size(p.rss),
               duration(p.age), p.os_pid, p.name]
        rows.append([c for h, cell in zip(PS_HEADER, row) for c in [cell] + more.get(h, [])])
    return columns(header, rows, left=("STATE", "NAME"))


# ---- mem -----------------------------------------------------------------------------

def mem_text(info) -> str:
    """The KV pools, swap and disk tier (blocks and tokens; every model's together), then
    where the KV of each process is: resident in the pool, swapped out to the host, on
    disk (blocks), then each model's weights and pools in the memory budget."""
    kv, bs = info.kv, info.kv.block_size
    pool = [[key, n, n * bs] for key, n in (
        ("total", kv.total), ("used", kv.used), ("cached", kv.cached), ("free", kv.free),
        ("swap_total", kv.swap_total), ("swap_free", kv.swap_free),
        ("disk_total", info.disk_total), ("disk_used", info.disk_used))]
    text = f"KV memory in blocks of {bs} tokens\n"
    text += columns(["POOL", "BLOCKS", "TOKENS"], pool, left=("POOL",))
    if info.procs:
        per = [[pid, m.resident, m.swapped, m.disk, (m.resident + m.swapped + m.disk) * bs]
               for pid, m in sorted(info.procs.items())]
        text += "\n\n" + columns(["PID", "RESIDENT", "SWAPPED", "DISK", "TOKENS"], per)
    if info.models:
        per = [[name, size(m.weight_bytes), size(m.kv_bytes), size(m.swap_bytes), m.kv.total,
                m.kv.used, m.kv.free] for name, m in info.models.items()]
        text += (f"\n\nModels: {size(info.memory_used) or '0B'} of a "
                 f"{size(info.memory_budget) or '0B'} budget (weights and KV pools)\n")
        text += columns(["MODEL", "WEIGHTS", "KV", "SWAP", "BLOCKS", "USED", "FREE"], per,
                        left=("MODEL",))
    return text


# ---- sched, limit --------------------------------------------------------------------

def sched_text(info) -> str:
    """The policies, one a line, the one in force marked * (as `git branch` marks one)."""
    return "\n".join(f"{'*' if p == info.policy else ' '} {p}" for p in info.policies)


def limits_text(limits) -> str:
    """One line per limit of a Limits: its name and value, or "unlimited"."""
    def show(v):
        return "unlimited" if v is None else f"{v:g}" if isinstance(v, float) else str(v)
    rows = [[n, show(getattr(limits, n))] for n in limits.NAMES]
    return columns(["LIMIT", "VALUE"], rows, left=("LIMIT",))


# ---- models, sysinfo, syscalls -------------------------------------------------------

MODEL_HEADER = ["NAME", "STATE", "TYPE", "PARAMS", "DTYPE", "QUANT", "WEIGHTS", "KV_BLOCKS",
                "KV", "REQS", "CTXS", "IDLE", "KEEP", "MAX_LEN", "PATH"]


def models_text(models, now: float | None = None) -> str:
    """One row a model: its state ("loading 40%" while it loads; the default marked *),
    size, memory, what uses it, how long it has been idle and may stay (KEEP: its
    keep-alive, "forever" if none)."""
    now = time.time() if now is None else now
    rows = []
    for m in models:
        state = f"loading {m.progress:.0%}" if m.state == "loading" else m.state
        loaded = m.state == "ready"
        rows.append([m.name + (" *" if m.default else ""), state, m.model_type,
                     count(m.params), m.dtype, m.quantize, size(m.weight_bytes),
                     m.kv_blocks or None, size(m.kv_bytes), m.requests if loaded else None,
                     m.contexts if loaded else None,
                     duration(now - m.last_used) if loaded and m.last_used else None,
                     ("forever" if m.keep_alive is None else duration(m.keep_alive))
                     if loaded or m.keep_alive is not None else None,
                     m.max_len or None, m.path])
    return columns(MODEL_HEADER, rows, left=("NAME", "STATE", "TYPE", "DTYPE", "QUANT", "PATH"))


def count(n) -> str | None:
    """A count as 135M, 1.2B, 9.6K; None when unknown or zero."""
    if not n:
        return None
    for unit, scale in (("B", 10 ** 9), ("M", 10 ** 6), ("K", 10 ** 3)):
        if n >= scale:
            return f"{n / scale:.1f}{unit}".replace(".0" + unit, unit)
    return str(n)


def sysinfo_text(info) -> str:
    """One line per field of SysInfo (uptime as a duration)."""
    rows = [[f.name, getattr(info, f.name)] for f in dataclasses.fields(info)]
    rows = [[k, duration(v) if k == "uptime" else v] for k, v in rows]
    return columns(["FIELD", "VALUE"], rows, left=("FIELD", "VALUE"))


def syscalls_text(entries) -> str:
    rows = [[s.nr, s.name, "yes" if s.implemented else "no", args_summary(s)] for s in entries]
    return columns(["NR", "NAME", "IMPL", "ARGS"], rows, left=("NAME", "IMPL", "ARGS"))


def args_summary(s) -> str:
    """A syscall's arguments on one line, brackets marking the optional ones, then its
    rules: `pid:int [timeout:float]`, `[prompt:str] [messages:messages]; one of prompt|messages`."""
    args = " ".join(f"{name}:{_kind(spec)}" if spec.get("required") else f"[{name}:{_kind(spec)}]"
                    for name, spec in s.args.items())
    rules = ([f"one of {'|'.join(group)}" for group in s.one_of]
             + [f"at most one of {'|'.join(group)}" for group in s.at_most_one])
    return "; ".join(part for part in [args, *rules] if part)


def _kind(spec: dict) -> str:
    """An argument's type, with its items' type for a list or map: `list[str]`."""
    of = spec.get("of")
    return f"{spec.get('type', '?')}[{of.get('type', '?')}]" if isinstance(of, dict) \
        else spec.get("type", "?")


# ---- drivers -------------------------------------------------------------------------

def drivers_text(infos, auto: str) -> str:
    """The drivers registry: status, device, memory, priority, and why one is not usable."""
    rows = []
    for d in infos:
        status = "load-error" if d.load_error else "available" if d.available else "unavailable"
        memory = f"{size(d.memory[0])}/{size(d.memory[1])}" if d.memory else None
        rows.append([d.name, status, d.device, memory,
                     None if d.load_error else d.priority, d.reason])
    table = columns(["DRIVER", "STATUS", "DEVICE", "FREE/TOTAL", "PRIO", "REASON"], rows,
                    left=("DRIVER", "STATUS", "DEVICE", "REASON"))
    return f"{table}\nauto: {auto}"


# ---- keys ----------------------------------------------------------------------------

def keys_text(infos) -> str:
    """The CURVE keys of a home (syscalls/keys.KeyInfo): kind, name, public key, file."""
    rows = [[i.kind, i.name, i.public or "(unreadable)", i.path] for i in infos]
    return columns(["KIND", "NAME", "PUBLIC_KEY", "PATH"], rows,
                   left=("KIND", "NAME", "PUBLIC_KEY", "PATH"))


# ---- units ---------------------------------------------------------------------------

def size(n) -> str | None:
    """Bytes as 1.5G, 300.0M, 12.0K or 10B; None (shown "-") when unknown or zero."""
    if not n:
        return None
    for unit, scale in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f}{unit}"
    return f"{n}B"


def seconds(s) -> str | None:
    """Seconds as 0.4s, 12.5s, then as duration() does past a minute."""
    if s is None:
        return None
    return f"{s:.1f}s" if s < 60 else duration(s)


def duration(s) -> str | None:
    """Seconds as 42s, 3m07s or 2h05m."""
    if s is None:
        return None
    s = int(s)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"
