"""Information and model syscalls: sysinfo, meminfo, metrics, models read what the engine
last published (kernel/loop.py Snapshot) and never wait on the engine; model_load, _unload,
_add and _rm are answered by the engine thread or a worker (kernel/modelcalls.py)."""
from __future__ import annotations

import time
from importlib import metadata

from llmos.syscalls.types import KVInfo, MemInfo, Metrics, ModelMem, ProcMem, SysInfo

from . import tunables
from .metrics import proc_metrics
from .syscall import PENDING


def _release() -> str:
    try:
        return metadata.version("llmos")
    except metadata.PackageNotFoundError:
        return "unknown"


def sys_sysinfo(k, call, a):
    snap, user = k.loop.snapshot, k.procs.user
    stats = snap.stats
    default = next((m for m in snap.models if m.name == k.default_model), None)
    return SysInfo(version=1, release=_release(), driver=k.loop.models.driver.name,
                   device=str(k.loop.models.driver.device), model=k.default_model,
                   dtype=default.dtype if default else "",
                   dtype_reason=default.dtype_reason if default else "",
                   procs=len(k.procs.procs()),
                   uptime=round(time.time() - k.started, 3), steps=stats.get("steps", 0),
                   computed_tokens=stats.get("computed_tokens", 0),
                   generated_tokens=stats.get("generated_tokens", 0),
                   preemptions=stats.get("preemptions", 0),
                   agent_user=user.name if user else None, isolation="uid" if user else "none",
                   max_agents=k.procs.max_agents, policy=snap.policy,
                   models=[m.name for m in snap.models])


def sys_meminfo(k, call, a):
    """The pools as last published (every loaded model's together, and each model's own),
    and where the KV of each visible process that holds some is (its account, kept by
    the engine thread)."""
    snap = k.loop.snapshot
    procs = {p.pid: ProcMem(p.acct.kv["device"], p.acct.kv["host"], p.acct.kv["disk"])
             for p in k.visible(call.conn.pid, call.conn.owner) if any(p.acct.kv.values())}
    models = {m.name: ModelMem(snap.model_kv.get(m.name, KVInfo()), m.weight_bytes,
                               m.kv_bytes, m.swap_bytes) for m in snap.models}
    return MemInfo(kv=snap.kv, procs=procs, disk_total=snap.disk_total, disk_used=snap.disk_used,
                   models=models, memory_budget=snap.memory[0], memory_used=snap.memory[1])


def sys_metrics(k, call, a):
    """Every loaded model's metrics as last published (a model unloaded drops out; one
    loaded again counts from zero), and the LLM counters of the processes the caller may
    see in ps: the METRICS_PROCS busiest by name, the rest summed."""
    procs, others = proc_metrics(k.visible(call.conn.pid, call.conn.owner),
                                 tunables.METRICS_PROCS)
    return Metrics(uptime=round(time.time() - k.started, 3),
                   models=list(k.loop.snapshot.metrics), procs=procs, others=others)


def sys_models(k, call, a):
    return {"models": k.models()}


def sys_model_load(k, call, a):
    k.model_load(call, call.conn.owner, a["name"], a["keep_alive"])
    return PENDING


def sys_model_unload(k, call, a):
    k.model_unload(call, call.conn.owner, a["name"])
    return PENDING


def sys_model_add(k, call, a):
    k.model_add(call, call.conn.owner, a["name"], a["path"], a["dtype"], a["quantize"],
                a["keep_alive"])
    return PENDING


def sys_model_rm(k, call, a):
    return k.model_rm(call, call.conn.owner, a["name"])
