"""The LLM calls of the Supervisor (kernel/kernel.py): generate, cancel, tokenize,
detokenize and the contexts. Their policy: what a process may name (its own contexts, the
loaded model), how a prompt becomes tokens (inline, or on a tokenizer worker when long),
which prefix-cache salt a call gets, and when its engine command is queued.

Limits (kernel/limits.py) are checked here, under the lock, as a call is accepted: calls
(generate, EAGAIN) and contexts (create and fork, ENOMEM); cancel is never refused.

A mixin of Supervisor, which gives it: procs (the process table, whose lock orders
ownership and queueing), loop (the engine loop's inbox), engine (read-only here: model
limits, tokenizer), tokenizers (the worker pool), audit, tree_root() and _shares.
Threads: called on the I/O thread; tokenizer workers run _encode's work, then queue.
"""
from __future__ import annotations

from llmos.syscalls.errors import E2BIG, EINVAL, ENOENT, ESRCH, SyscallError
from llmos.syscalls.numbers import sys_name
from llmos.syscalls.types import Completion

from . import inbox as cmd
from . import limits, tunables

SAMPLING = ("max_tokens", "temperature", "top_k", "top_p", "min_p", "seed", "stop",
            "stop_token_ids", "ignore_eos")


class LLMCalls:
    def check_model(self, name: str | None) -> None:
        """model= names the loaded model (or is absent). Raises ENOENT naming the loaded ones."""
        if name is not None and name != self.model_name:
            raise SyscallError(ENOENT, f"model: no model {name!r} is loaded "
                                       f"(loaded: {self.model_name})")

    def generate(self, call, caller: int, a: dict) -> None:
        """Accept a generate: record it as caller's, tokenize, queue it for the engine.
        Raises ESRCH (caller, context), EAGAIN (caller's calls limit)."""
        self.check_model(a["model"])
        sampling = {k: a[k] for k in SAMPLING if a[k] is not None}
        key, rid, ctx = (call.conn.peer, call.id), next(self._ids), a["context"]
        with self.procs.lock:
            proc = self.procs.live(caller)
            if ctx is not None and ctx not in proc.contexts:
                raise SyscallError(ESRCH, f"context: no context {ctx} of process {caller}")
            n = len(proc.requests)
            limits.check(proc, "calls", n, f"process {caller} has {n} LLM calls in flight")
            proc.requests[key] = rid
            self._join(call, a["share"])

        def queue(tokens: list, chat: bool) -> None:
            with self.procs.lock:
                if proc.requests.get(key) != rid:         # cancelled, killed or dead meanwhile
                    call.reply(Completion(finish_reason="abort"))
                    return
                self.loop.put(cmd.Add(rid, proc, call, key, tokens, chat, sampling, ctx,
                                      a["stream"], self._salt(proc, a["share"])))

        def undo(err: SyscallError) -> None:
            with self.procs.lock:
                if proc.requests.get(key) == rid:
                    del proc.requests[key]
            call.error(err.code, err.msg)

        if a["token_ids"] is not None:
            queue(a["token_ids"], False)
        else:
            self._encode(a["prompt"], a["messages"], True,
                         then=lambda tokens: queue(tokens, a["messages"] is not None), fail=undo)

    def cancel(self, call, caller: int, call_id: int) -> None:
        """Cancel this connection's generate call_id; its own call answers with "abort".
        Raises ESRCH if it is not in flight."""
        with self.procs.lock:
            proc = self.procs.get(caller)
            rid = proc.requests.pop((call.conn.peer, call_id), None)
            if rid is None:
                raise SyscallError(ESRCH, f"call: no generate {call_id} in flight")
            self.loop.put(cmd.Abort(rid))

    def _join(self, call, share: str | None) -> None:
        """Under procs.lock: the caller names share group `share`; its first time is
        audited (later calls that name it again are not)."""
        if share is None:
            return
        groups = self._shares.setdefault(call.conn.pid, set())
        if share not in groups:
            if len(groups) < tunables.SHARE_GROUPS_KEPT:    # bounded; past it, rate-limited
                groups.add(share)
            self.audit.record("share", limited=True, pid=call.conn.pid, uid=call.conn.uid,
                              syscall=sys_name(call.nr), group=share)

    def _salt(self, proc, share: str | None) -> bytes:
        """Prefix-cache salt: the processes of one tree (tree_root) share cached prefixes,
        others do not, so a cache hit tells nobody what another application computed;
        `share` names a group that processes of one user join explicitly instead."""
        if share is not None:
            return b"share:%d:" % proc.owner + share.encode()
        return b"tree:%d" % self.tree_root(proc.pid)

    def _encode(self, prompt, messages, reply: bool, then, fail) -> None:
        """Token ids of a prompt or chat messages, then(tokens); fail(SyscallError). Short
        texts are encoded here; long ones on a tokenizer worker (never the I/O thread)."""
        size = len(prompt) if prompt is not None else sum(len(m["content"]) for m in messages)
        cap = self.engine.max_model_len * tunables.CHARS_PER_TOKEN
        if size > cap:
            return fail(SyscallError(E2BIG, f"prompt: {size} characters; this model's context "
                                            f"of {self.engine.max_model_len} tokens takes at "
                                            f"most {cap}"))

        def work():
            try:
                tokens = self.engine.encode(prompt, messages, reply=reply)
            except SyscallError as e:
                return fail(e)
            then(tokens)
        if size <= tunables.INLINE_TEXT:
            work()
        else:
            self.tokenizers.submit(work)

    def tokenize(self, call, text: str) -> None:
        self._encode(text, None, True, then=lambda ids: call.reply({"token_ids": ids}),
                     fail=lambda e: call.error(e.code, e.msg))

    def detokenize(self, call, token_ids: list) -> None:
        vocab = self.engine.config.vocab_size
        if token_ids and max(token_ids) >= vocab:
            raise SyscallError(EINVAL, f"token_ids: ids must be below the vocabulary size {vocab}")

        def work():
            call.reply({"text": self.engine.tokenizer.decode(token_ids)})
        if len(token_ids) <= tunables.INLINE_TEXT:
            work()
        else:
            self.tokenizers.submit(work)

    # ---- contexts -------------------------------------------------------------------
    def context_create(self, call, caller: int, system=None, messages=None,
                       share: str | None = None) -> None:
        if system is not None:
            messages = [{"role": "system", "content": system}]
        cid = next(self._ids)
        with self.procs.lock:
            proc = self.procs.live(caller)
            self._check_contexts(proc)
            proc.contexts.add(cid)
            self._join(call, share)

        def queue(tokens: list) -> None:
            with self.procs.lock:
                if cid in proc.contexts:
                    self.loop.put(cmd.CreateContext(cid, proc, call, tokens,
                                                    self._salt(proc, share)))
                else:
                    call.error(ESRCH, f"process {caller} has exited")

        def undo(err: SyscallError) -> None:
            with self.procs.lock:
                proc.contexts.discard(cid)
            call.error(err.code, err.msg)

        if messages is None:
            queue([])
        else:
            self._encode(None, messages, False, then=queue, fail=undo)

    def context_fork(self, call, caller: int, source: int) -> None:
        cid = next(self._ids)
        with self.procs.lock:
            proc = self._owner_of(caller, source)
            self._check_contexts(proc)
            proc.contexts.add(cid)
            self.loop.put(cmd.ForkContext(source, cid, proc, call))

    def context_free(self, call, caller: int, context: int) -> None:
        with self.procs.lock:
            self._owner_of(caller, context).contexts.discard(context)
            self.loop.put(cmd.FreeContext(context, call))

    def context_info(self, call, caller: int, context: int) -> None:
        with self.procs.lock:
            self._owner_of(caller, context)
            self.loop.put(cmd.DescribeContext(context, call))

    @staticmethod
    def _check_contexts(proc) -> None:
        """Under procs.lock: proc may open one more context. Raises ENOMEM (its limit)."""
        n = len(proc.contexts)
        limits.check(proc, "contexts", n, f"process {proc.pid} has {n} contexts open")

    def _owner_of(self, caller: int, context: int):
        proc = self.procs.live(caller)
        if context not in proc.contexts:
            raise SyscallError(ESRCH, f"context: no context {context} of process {caller}")
        return proc
