"""Process syscalls (xv6's sysproc.c): decode the arguments, call the kernel, return.

Each runs on the I/O thread as `sys_x(kernel, call, args)` with args checked against
syscalls/specs.py; `call.conn.pid` is the calling process, `call.conn.owner` whether it
holds the owner's rights. The rules live in kernel/kernel.py and kernel/proc.py.
"""
from __future__ import annotations

from llmos.syscalls.specs import LIMITS

from .limits import asked
from .syscall import PENDING


def sys_hello(k, call, a):
    return k.hello(call.conn, a["token"], a["name"])


def sys_spawn(k, call, a):
    return {"pid": k.spawn(call.conn.pid, a["argv"], a["name"], a["nice"], a["env"],
                           uid=call.conn.uid, asked=asked(a["limits"]), owner=call.conn.owner)}


def sys_exit(k, call, a):
    k.exit(call.conn.pid, a["status"])
    return {}


def sys_wait(k, call, a):
    k.wait(call, call.conn.pid, call.conn.owner, a["pid"], a["timeout"])
    return PENDING


def sys_kill(k, call, a):
    k.kill(call.conn.pid, call.conn.owner, a["pid"], a["sig"], uid=call.conn.uid)
    return {}


def sys_getpid(k, call, a):
    proc = k.procs.get(call.conn.pid)
    return {"pid": proc.pid, "ppid": proc.ppid}


def sys_nice(k, call, a):
    target = call.conn.pid if a["pid"] is None else a["pid"]
    k.procs.set_nice(target, a["value"], call.conn.pid, call.conn.owner)
    return {}


def sys_ps(k, call, a):
    return {"procs": k.ps(call.conn.pid, call.conn.owner)}


def sys_sched(k, call, a):
    if a["policy"] is None:
        return k.sched_info()
    k.set_policy(call, call.conn.owner, a["policy"])
    return PENDING


def sys_setrlimit(k, call, a):
    target = call.conn.pid if a["pid"] is None else a["pid"]
    return k.setrlimit(call.conn.pid, call.conn.owner, target,
                       asked({n: a[n] for n in LIMITS}), uid=call.conn.uid)


def sys_getrlimit(k, call, a):
    target = call.conn.pid if a["pid"] is None else a["pid"]
    return k.procs.getrlimit(target, call.conn.pid, call.conn.owner)
