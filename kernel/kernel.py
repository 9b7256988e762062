"""The kernel: processes, the engine loop, and what each process holds.

Policy lives here; the syscall handlers (syscalls/handlers.py) only decode and call in.
Three threads meet here: the syscall I/O thread calls the public methods, the engine
thread runs the functions they submit, and the reaper thread reports deaths. None of
them ever waits on another: I/O-thread calls that need the engine submit work and
return; the engine answers a call through `Call.reply` / `Call.error` / `Call.event`.
"""
from __future__ import annotations

import logging
import threading
import time

from llmos.syscalls import SyscallError

from .errors import EngineError
from .home import Home
from .loop import EngineLoop
from .proc import Proc, ProcError, ProcTable, State, parse_signal

log = logging.getLogger("llmos.kernel")

CANCEL_SIGNALS = {"SIGTERM", "SIGKILL", "SIGINT"}   # cancel a process's LLM work
SAMPLING = ("max_tokens", "temperature", "top_k", "top_p", "min_p", "seed", "stop",
            "stop_token_ids", "ignore_eos")


class Kernel:
    def __init__(self, home: Home, engine, model_name: str, driver_name: str):
        self.home, self.engine = home, engine
        self.model_name, self.driver_name = model_name, driver_name
        self.started = time.time()
        self.loop = EngineLoop(engine, on_crash=self._engine_crashed)
        self.procs = ProcTable(on_exit=self._exited, on_signal=self._signalled)
        self.dead = threading.Event()           # the engine crashed: the daemon must exit
        self.stopping = threading.Event()       # set at shutdown: helper threads end
        # What each process holds, guarded by self._lock: pid -> {call id: request id},
        # pid -> set of context ids.
        self._lock = threading.Lock()
        self._requests: dict[int, dict[int, int]] = {}
        self._contexts: dict[int, set[int]] = {}

    # ---- processes ------------------------------------------------------------------
    def spawn(self, parent: int, argv, name=None, nice=0, env=None) -> Proc:
        return self.procs.spawn(argv, name=name, nice=nice, parent=parent, env_extra=env,
                                socket_path=self.home.socket_url, log_dir=self.home.log_dir)

    def _exited(self, proc: Proc) -> None:
        """Reaper thread: a process died. Cancel its requests, free its KV and contexts."""
        with self._lock:
            requests = self._requests.pop(proc.pid, {})
            contexts = self._contexts.pop(proc.pid, set())

        def release(engine):
            for rid in requests.values():
                engine.abort(rid)
            for cid in contexts:
                if cid in engine.contexts:
                    engine.context_free(cid)
        if requests or contexts:
            try:
                self.loop.call(release, timeout=30)
            except Exception as e:           # the engine is gone: nothing left to free
                log.warning("pid %d: could not release its resources: %s", proc.pid, e)

    def _signalled(self, proc: Proc, sig: int) -> None:
        """A signal reached a process: cancel, pause or resume its LLM work."""
        import signal
        name = signal.Signals(sig).name if sig else ""
        with self._lock:
            rids = list(self._requests.get(proc.pid, {}).values())
        if name in CANCEL_SIGNALS:
            self.loop.submit(lambda e: [e.abort(r) for r in rids])
        elif name in ("SIGSTOP", "SIGCONT"):
            self.loop.submit(lambda e: [e.set_stopped(r, name == "SIGSTOP") for r in rids])

    def kill(self, pid: int, sig, caller: int, owner: bool) -> None:
        self.procs.kill(pid, parse_signal(sig), caller, owner=owner)

    def watch_silence(self, server, timeout: float) -> None:
        """A thread that reaps attached programs silent for longer than `timeout` (their
        connection sends nothing, not even the SDK's heartbeat pings)."""
        def watch():
            while not self.stopping.wait(timeout / 3):
                now = time.monotonic()
                for conn in server.connections():
                    if conn.pid is not None and now - conn.last_seen < timeout:
                        try:
                            self.procs.heartbeat(conn.pid)
                        except ProcError:       # exited meanwhile
                            pass
                for proc in self.procs.reap_silent(timeout):
                    log.info("pid %d: silent for %.0fs, reaped", proc.pid, timeout)
        threading.Thread(target=watch, name="llmos-silence", daemon=True).start()

    # ---- LLM work -------------------------------------------------------------------
    def generate(self, call, pid: int, args: dict) -> None:
        """Queue a generate for process pid; the engine answers `call` (events, then reply)."""
        args = {k: v for k, v in args.items() if v is not None}    # unset: engine defaults
        source = {k: args[k] for k in ("prompt", "messages", "token_ids") if k in args}
        if "token_ids" in source:
            source["prompt"] = source.pop("token_ids")
        sampling = {k: args[k] for k in SAMPLING if k in args}
        stream, context = args.get("stream", False), args.get("context")
        if context is not None:
            self._check_owns(pid, context)

        def on_event(delta):             # engine thread: hand over, never block
            if stream and not delta.finished and (delta.text or delta.token_ids):
                call.event({"text": delta.text, "token_ids": delta.token_ids})
            if delta.finished:
                self._finished(pid, call.id, delta)
                c = delta.completion
                if stream and (delta.text or delta.token_ids):
                    call.event({"text": delta.text, "token_ids": delta.token_ids})
                if c.error:
                    call.error("ENOMEM", c.error)
                else:
                    call.reply(completion_result(c))

        salt = self._salt(pid)

        def submit(engine):
            try:
                stopped = self.procs.get(pid).state is State.STOPPED
            except ProcError:               # the caller died meanwhile: nothing to run
                call.error("ESRCH", f"process {pid} has exited")
                return
            try:
                req = engine.add_request(**source, context=context, on_event=on_event,
                                         stream=stream, salt=salt, **sampling)
            except EngineError as e:
                call.error(e.code, str(e))
                return
            with self._lock:
                self._requests.setdefault(pid, {})[call.id] = req.id
            if stopped:
                engine.set_stopped(req.id, True)
        self._submit(call, submit)

    def _finished(self, pid: int, call_id: int, delta) -> None:
        usage = delta.completion.usage
        with self._lock:
            self._requests.get(pid, {}).pop(call_id, None)
        try:
            proc = self.procs.get(pid)
        except ProcError:           # gone already: nobody to account to
            return
        proc.tokens_in += usage.computed_prompt_tokens
        proc.tokens_out += usage.completion_tokens

    def cancel(self, pid: int, call_id: int) -> None:
        with self._lock:
            rid = self._requests.get(pid, {}).get(call_id)
        if rid is None:
            raise SyscallError("ESRCH", f"call: no generate {call_id} in flight")
        self.loop.submit(lambda e: e.abort(rid))

    # ---- contexts -------------------------------------------------------------------
    def context_create(self, call, pid: int, system=None, messages=None) -> None:
        if system is not None:
            messages = [{"role": "system", "content": system}]
        salt = self._salt(pid)
        self._answer(call, lambda e: self._adopt(
            pid, e.context_create(messages=messages, salt=salt) if messages
            else e.context_create(salt=salt)))

    def context_fork(self, call, pid: int, context: int) -> None:
        self._check_owns(pid, context)
        self._answer(call, lambda e: self._adopt(pid, e.context_fork(context)))

    def _salt(self, pid: int) -> bytes:
        """Prefix-cache salt: processes of one owner (uid) share cached prefixes, owners don't."""
        try:
            return b"uid:%d" % self.procs.get(pid).owner
        except ProcError as e:
            raise SyscallError(e.code, e.msg) from None

    def _adopt(self, pid: int, context: int) -> dict:
        """Engine thread: record that pid holds a new context; its syscall result."""
        with self._lock:
            self._contexts.setdefault(pid, set()).add(context)
        return {"context": context}

    def context_free(self, call, pid: int, context: int) -> None:
        self._check_owns(pid, context)
        with self._lock:
            self._contexts[pid].discard(context)
        self._answer(call, lambda e: e.context_free(context) or {})

    def context_info(self, call, pid: int, context: int) -> None:
        self._check_owns(pid, context)
        self._answer(call, lambda e: e.context_info(context))

    def _check_owns(self, pid: int, context: int) -> None:
        with self._lock:
            if context not in self._contexts.get(pid, ()):
                raise SyscallError("ESRCH", f"context: no context {context} of process {pid}")

    # ---- information ----------------------------------------------------------------
    def meminfo(self, call) -> None:
        def info(engine):
            usage = engine.blocks.usage()
            swap = engine.swapper.host if engine.swapper else None
            with self._lock:
                owned = {pid: (list(r.values()), list(c)) for pid, (r, c) in
                         ((p, (self._requests.get(p, {}), self._contexts.get(p, set())))
                          for p in set(self._requests) | set(self._contexts))}
            procs = {str(pid): _blocks_of(engine, rids, cids) for pid, (rids, cids) in owned.items()}
            return {"kv": {**usage, "block_size": engine.block_size,
                           "swap_total": swap.num_blocks if swap else 0,
                           "swap_free": swap.num_free_blocks if swap else 0},
                    "procs": procs}
        self._answer(call, info)

    def ps(self, call) -> None:
        def rows(engine):
            kv = {}
            with self._lock:
                for pid in set(self._requests) | set(self._contexts):
                    kv[pid] = _blocks_of(engine, self._requests.get(pid, {}).values(),
                                         self._contexts.get(pid, set()))
            out = self.procs.ps()
            for r in out:
                r["kv_blocks"] = kv.get(r["pid"], 0)
                r["state"] = r["state"].name if hasattr(r["state"], "name") else r["state"]
            return {"procs": out}
        self._answer(call, rows)

    # ---- plumbing -------------------------------------------------------------------
    def _submit(self, call, fn) -> None:
        """Run fn(engine) on the engine thread; an unexpected failure fails the call."""
        future = self.loop.submit(fn)
        future.add_done_callback(lambda f: f.exception() and _fail(call, f.exception()))

    def _answer(self, call, fn) -> None:
        """Run fn(engine) on the engine thread and reply with its result."""
        future = self.loop.submit(fn)
        future.add_done_callback(lambda f: _fail(call, f.exception()) if f.exception()
                                 else call.reply(f.result()))

    def _engine_crashed(self, exc: BaseException) -> None:
        log.error("engine crashed: %r; the kernel exits", exc)
        self.dead.set()


def completion_result(c) -> dict:
    u = c.usage
    return {"token_ids": c.token_ids, "text": c.text, "finish_reason": c.finish_reason,
            "usage": {"prompt_tokens": u.prompt_tokens, "cached_tokens": u.cached_tokens,
                      "completion_tokens": u.completion_tokens}}


def _blocks_of(engine, request_ids, context_ids) -> int:
    tables = [engine.requests[r].seq.table for r in request_ids if r in engine.requests]
    tables += [engine.contexts[c].seq.table for c in context_ids if c in engine.contexts]
    return len({b for t in tables for b in t.blocks})


def _fail(call, exc: BaseException) -> None:
    if isinstance(exc, (EngineError, SyscallError)):
        call.error(exc.code, getattr(exc, "msg", None) or str(exc))
    elif isinstance(exc, ProcError):
        call.error(exc.code, exc.msg)
    else:
        log.error("call %s failed: %r", call.id, exc)
        call.error("EIO", f"internal error: {exc}")
