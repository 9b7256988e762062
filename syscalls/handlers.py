"""The kernel's syscall handlers: decode, call the kernel, return (xv6's sys_*.c).

Each handler runs on the I/O thread with arguments already checked against its spec
(syscalls/specs.py). It returns a result at once, or PENDING when the engine (or a
waiting thread) answers the call later. Policy stays in kernel/kernel.py.
"""
from __future__ import annotations

import hmac
import os
import threading

from .errors import EACCES, EINVAL, EPERM, SyscallError
from .numbers import Sys
from .table import PENDING, SyscallTable

VERSION = 1


def install(table: SyscallTable, kernel, owner_token: str) -> None:
    """Register every handler of `kernel` in `table`."""
    def pid_of(call) -> int:
        return call.conn.pid

    def sys_hello(call, a):
        if call.conn.authenticated:     # a second hello would make a second process
            raise SyscallError(EINVAL, f"hello: this connection is already process {call.conn.pid}")
        token = a["token"]
        # bytes: compare_digest refuses str with non-ASCII characters (TypeError)
        if hmac.compare_digest(token.encode(), owner_token.encode()):
            proc = _proc(lambda: kernel.procs.attach(None, "attached"))
            call.conn.data["owner"] = True
        else:
            proc = kernel.procs.by_token(token)
            if proc is None:
                raise SyscallError(EACCES, "hello: wrong token")
            call.conn.data["owner"] = False
        call.conn.pid = proc.pid
        return {"pid": proc.pid, "ppid": proc.ppid, "kernel_pid": os.getpid(),
                "version": VERSION}

    def sys_spawn(call, a):
        proc = _proc(lambda: kernel.spawn(pid_of(call), a["argv"], a.get("name"),
                                          a.get("nice") or 0, a.get("env")))
        return {"pid": proc.pid}

    def sys_wait(call, a):
        def waiter():
            try:
                status = kernel.procs.wait(a["pid"], pid_of(call), a.get("timeout"))
                call.reply({"pid": a["pid"], "status": status})
            except Exception as e:
                call.error(getattr(e, "code", "EIO"), getattr(e, "msg", str(e)))
        threading.Thread(target=waiter, name=f"llmos-wait-{a['pid']}", daemon=True).start()
        return PENDING

    def sys_kill(call, a):
        _proc(lambda: kernel.kill(a["pid"], a["sig"], pid_of(call), call.conn.data["owner"]))
        return {}

    def sys_exit(call, a):
        proc = _proc(lambda: kernel.procs.get(pid_of(call)))
        if not proc.attached:
            raise SyscallError(EPERM, "exit: a spawned process exits by itself (sys.exit)")
        _proc(lambda: kernel.procs.detach(proc.pid, a["status"]))
        return {}

    def sys_getpid(call, a):
        proc = _proc(lambda: kernel.procs.get(pid_of(call)))
        return {"pid": proc.pid, "ppid": proc.ppid}

    def sys_nice(call, a):
        target = a.get("pid", pid_of(call))
        if target != pid_of(call) and not (call.conn.data["owner"] or
                                           kernel.procs.is_descendant(target, pid_of(call))):
            raise SyscallError(EPERM, f"nice: process {target} is not yours")
        _proc(lambda: kernel.procs.get(target)).nice = a["value"]
        return {}

    def sys_sysinfo(call, a):
        return {"version": VERSION, "driver": kernel.driver_name, "model": kernel.model_name,
                "device": str(kernel.engine.driver.device), "procs": len(kernel.procs.procs()),
                "uptime": round(__import__("time").time() - kernel.started, 3),
                "engine": dict(kernel.engine.stats)}

    def sys_models(call, a):
        c = kernel.engine.config
        return {"models": [{"name": kernel.model_name, "model_type": c.model_type,
                            "layers": c.num_hidden_layers, "hidden": c.hidden_size,
                            "heads": c.num_attention_heads, "kv_heads": c.num_key_value_heads,
                            "vocab": c.vocab_size, "max_len": kernel.engine.max_model_len,
                            "dtype": str(next(kernel.engine.model.parameters()).dtype)}]}

    def sys_tokenize(call, a):
        return {"token_ids": kernel.engine.tokenizer.encode(a["text"])}

    def sys_detokenize(call, a):
        return {"text": kernel.engine.tokenizer.decode(a["token_ids"])}

    def pending(fn):
        def handler(call, a):
            fn(call, a)
            return PENDING
        return handler

    handlers = {
        Sys.HELLO: sys_hello, Sys.SPAWN: sys_spawn, Sys.WAIT: sys_wait, Sys.KILL: sys_kill,
        Sys.EXIT: sys_exit, Sys.GETPID: sys_getpid, Sys.NICE: sys_nice,
        Sys.SYSINFO: sys_sysinfo, Sys.MODELS: sys_models, Sys.TOKENIZE: sys_tokenize,
        Sys.DETOKENIZE: sys_detokenize,
        Sys.PS: pending(lambda call, a: kernel.ps(call)),
        Sys.MEMINFO: pending(lambda call, a: kernel.meminfo(call)),
        Sys.GENERATE: pending(lambda call, a: kernel.generate(call, pid_of(call), a)),
        Sys.CANCEL: lambda call, a: kernel.cancel(pid_of(call), a["call"]) or {},
        Sys.CONTEXT_CREATE: pending(lambda call, a: kernel.context_create(
            call, pid_of(call), a.get("system"), a.get("messages"))),
        Sys.CONTEXT_FORK: pending(lambda call, a: kernel.context_fork(call, pid_of(call),
                                                                      a["context"])),
        Sys.CONTEXT_FREE: pending(lambda call, a: kernel.context_free(call, pid_of(call),
                                                                      a["context"])),
        Sys.CONTEXT_INFO: pending(lambda call, a: kernel.context_info(call, pid_of(call),
                                                                      a["context"])),
    }
    for nr, handler in handlers.items():
        table.register(nr, handler)


def _proc(fn):
    """Run a process-table call; its ProcError becomes the SyscallError of the same code."""
    from llmos.kernel.proc import ProcError
    try:
        return fn()
    except ProcError as e:
        raise SyscallError(e.code, e.msg) from None
