"""Information syscalls: sysinfo, meminfo, models. They read what the engine last
published (kernel/loop.py Snapshot) and never wait on the engine."""
from __future__ import annotations

import time
from importlib import metadata

from llmos.syscalls.types import MemInfo, ModelInfo, ProcMem, SysInfo

from .load import resolve_model


def _release() -> str:
    try:
        return metadata.version("llmos")
    except metadata.PackageNotFoundError:
        return "unknown"


def sys_sysinfo(k, call, a):
    e, stats, user = k.engine, k.loop.snapshot.stats, k.procs.user
    return SysInfo(version=1, release=_release(), driver=e.driver.name,
                   device=str(e.driver.device), model=k.model_name,
                   dtype=str(e.model.dtype).removeprefix("torch."), dtype_reason=e.dtype_reason,
                   procs=len(k.procs.procs()),
                   uptime=round(time.time() - k.started, 3), steps=stats.get("steps", 0),
                   computed_tokens=stats.get("computed_tokens", 0),
                   generated_tokens=stats.get("generated_tokens", 0),
                   preemptions=stats.get("preemptions", 0),
                   agent_user=user.name if user else None, isolation="uid" if user else "none",
                   max_agents=k.procs.max_agents, policy=k.loop.snapshot.policy)


def sys_meminfo(k, call, a):
    """The pool as last published, and where the KV of each visible process that holds
    some is (its account, kept by the engine thread)."""
    snap = k.loop.snapshot
    procs = {p.pid: ProcMem(p.acct.kv["device"], p.acct.kv["host"], p.acct.kv["disk"])
             for p in k.visible(call.conn.pid, call.conn.owner) if any(p.acct.kv.values())}
    return MemInfo(kv=snap.kv, procs=procs, disk_total=snap.disk_total, disk_used=snap.disk_used)


def sys_models(k, call, a):
    e = k.engine
    c = e.config
    return {"models": [ModelInfo(
        name=k.model_name, path=str(resolve_model(k.model_name).resolve()),
        model_type=c.model_type, layers=c.num_hidden_layers, hidden=c.hidden_size,
        heads=c.num_attention_heads, kv_heads=c.num_key_value_heads, vocab=c.vocab_size,
        max_len=e.max_model_len, dtype=str(e.model.dtype).removeprefix("torch."),
        dtype_reason=e.dtype_reason, weight_bytes=e.model.weight_bytes)]}
