"""Per-process limits (rlimits): what one process may hold at once, so that no agent can
take the whole kernel (its calls, contexts, children; the engine's KV pool and decode rate).

A process's limits are `proc.acct.limits` (syscalls/types.py Limits, frozen: a change
replaces the reference, so the engine thread reads the old limits or the new, never half).
The process table applies these rules under its lock (kernel/proc.py):

  - a process with no parent (an attached program: the owner's shell, a notebook) gets
    the kernel-wide defaults (`defaults`, `llmos up --limit NAME=VALUE`);
  - a child gets its parent's, with what spawn asked set instead (`change`);
  - a process may set the limits of itself and its descendants; raising one (or lifting
    it) is the owner's alone: anyone else gets EPERM naming the limit.

The I/O thread enforces three (`check`): calls (generate: EAGAIN), contexts (context
create and fork: ENOMEM) and children (spawn: EAGAIN). The engine enforces kv_blocks
(ENOMEM) and tokens_per_s (a token bucket) itself, reading acct.limits. KILL, CANCEL and
EXIT are never refused by a limit: a process at its limits can always let go.
"""
from __future__ import annotations

import dataclasses

from llmos.syscalls.args import UNLIMITED
from llmos.syscalls.errors import EAGAIN, ENOMEM, EPERM, SyscallError
from llmos.syscalls.types import Limits

from . import tunables

ERRORS = {"calls": EAGAIN, "contexts": ENOMEM, "children": EAGAIN}   # what `check` raises


def defaults(num_blocks: int, overrides: dict | None = None) -> Limits:
    """The kernel-wide defaults for a pool of num_blocks KV blocks, with overrides
    ({name: value or None for no limit}) set instead."""
    base = Limits(calls=tunables.DEFAULT_CALLS, contexts=tunables.DEFAULT_CONTEXTS,
                  children=tunables.DEFAULT_CHILDREN, tokens_per_s=None,
                  kv_blocks=int(num_blocks * tunables.KV_DEFAULT_SHARE))
    return dataclasses.replace(base, **(overrides or {}))


def asked(wire: dict | None) -> dict:
    """Limits as they come on the wire ({name: number, or UNLIMITED; None: not asked}) as
    {name: number, or None for no limit}, the form `change` takes."""
    return {n: None if v == UNLIMITED else v for n, v in (wire or {}).items() if v is not None}


def change(old: Limits, wanted: dict, owner: bool, what: str) -> Limits:
    """old with the limits in wanted ({name: value or None}) set instead. Raises EPERM
    naming the first limit it would raise or lift, unless owner (the owner's rights)."""
    new = dataclasses.replace(old, **wanted)
    raised = old.raises(new)
    if raised and not owner:
        name = raised[0]
        raise SyscallError(EPERM, f"{what}: {name} {show(getattr(new, name))} is above the "
                                  f"limit in force ({show(getattr(old, name))}); only the "
                                  f"owner may raise a limit")
    return new


def check(proc, name: str, held: int, doing: str) -> None:
    """Before proc takes one more of `name` (it holds `held`): raise the limit's error
    (ERRORS) naming it if that would pass proc's limit. `doing` says what proc holds."""
    limit = getattr(proc.acct.limits, name)
    if limit is not None and held >= limit:
        raise SyscallError(ERRORS[name], f"{name} limit ({limit}) reached: {doing}")


def show(value) -> str:
    """A limit's value for people: the number, or "unlimited"."""
    return UNLIMITED if value is None else f"{value:g}" if isinstance(value, float) else str(value)
