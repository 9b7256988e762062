"""The LLM calls of the Supervisor (kernel/kernel.py): generate, cancel, tokenize,
detokenize and the contexts. Their policy: what a process may name (its own contexts, a model
the registry knows), how a prompt becomes tokens (inline, or on a tokenizer worker when
long or when the model's tokenizer was not read yet),
which prefix-cache salt a call gets, and when its engine command is queued.

Limits (kernel/limits.py) are checked here, under the lock, as a call is accepted: calls
(generate, EAGAIN) and contexts (create and fork, ENOMEM); cancel is never refused.

A mixin of Supervisor, which gives it: procs (the process table, whose lock orders
ownership and queueing), loop (the engine loop's inbox), registry (model names, their
config and tokenizer), default_model, tokenizers (the worker pool), audit, tree_root()
and _shares.
Threads: called on the I/O thread; tokenizer workers run _encode's work, then queue.
"""
from __future__ import annotations

import json
import logging

from llmos.syscalls.errors import E2BIG, EINVAL, EIO, ESRCH, SyscallError
from llmos.syscalls.numbers import sys_name
from llmos.syscalls.types import Completion

from . import inbox as cmd
from . import limits, tunables
from .load import max_model_len

SAMPLING = ("max_tokens", "temperature", "top_k", "top_p", "min_p", "seed", "stop",
            "stop_token_ids", "ignore_eos")

log = logging.getLogger("llmos.kernel")


class LLMCalls:
    def model(self, name: str | None, owner: bool = True):
        """The ModelSpec model= names (absent: the default model). A path (a directory or
        .gguf file) only for the owner: an agent names models the owner made known, and
        cannot have the kernel read files of its choosing. Raises ENOENT naming the names
        there are, EPERM."""
        return self.registry.resolve(self.default_model if name is None else name,
                                     paths=owner)

    def generate(self, call, caller: int, a: dict) -> None:
        """Accept a generate: record it as caller's, tokenize, queue it for the engine.
        On a context, the model is the context's. Raises ENOENT (model), ESRCH (caller,
        context), EINVAL (a model that is not the context's; tools without messages),
        EAGAIN (caller's calls limit)."""
        tools = _tools(a["tools"], a["messages"], "messages")
        spec = self.model(a["model"], call.conn.owner)
        sampling = {k: a[k] for k in SAMPLING if a[k] is not None}
        key, rid, ctx = (call.conn.peer, call.id), next(self._ids), a["context"]
        with self.procs.lock:
            proc = self.procs.live(caller)
            if ctx is not None:
                spec = self._context_model(proc, ctx, a["model"], spec)
            n = len(proc.requests)
            limits.check(proc, "calls", n, f"process {caller} has {n} LLM calls in flight")
            proc.requests[key] = rid
            self._join(call, a["share"])

        def queue(mdir, tokens: list) -> None:
            chat = a["messages"] is not None
            turn = mdir.tokenizer.encode_chat_turn(a["messages"], tools=tools) \
                if chat and ctx else None
            with self.procs.lock:
                if proc.requests.get(key) != rid:         # cancelled, killed or dead meanwhile
                    call.reply(Completion(finish_reason="abort"))
                    return
                self.loop.put(cmd.Add(rid, proc, call, key, tokens, chat, sampling, ctx,
                                      a["stream"], self._salt(proc, a["share"]), spec, mdir,
                                      turn))

        def undo(err: SyscallError) -> None:
            with self.procs.lock:
                if proc.requests.get(key) == rid:
                    del proc.requests[key]
            call.error(err.code, err.msg)

        self._encode(spec, a["prompt"], a["messages"], a["token_ids"], True, then=queue,
                     fail=undo, tools=tools)

    @staticmethod
    def _context_model(proc, ctx: int, named: str | None, spec):
        """Under procs.lock: the model of proc's context ctx. Raises ESRCH, or EINVAL if
        the call named another model."""
        if ctx not in proc.contexts:
            raise SyscallError(ESRCH, f"context: no context {ctx} of process {proc.pid}")
        if named is not None and spec.name != proc.contexts[ctx].name:
            raise SyscallError(EINVAL, f"model: context {ctx} is of model "
                                       f"{proc.contexts[ctx].name!r}, not {spec.name!r}")
        return proc.contexts[ctx]

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

    def _encode(self, spec, prompt, messages, token_ids, reply: bool, then, fail,
                tools: list | None = None) -> None:
        """then(mdir, token ids) of exactly one of prompt, chat messages (rendered with
        `tools`) or token_ids under spec's tokenizer, or fail(SyscallError). Short texts of
        a model whose directory was opened before are encoded here; the rest (opening it,
        long texts) on a tokenizer worker, never the I/O thread."""
        size = len(prompt) if prompt is not None else \
            _chat_size(messages, tools) if messages is not None else 0

        def work():
            try:
                mdir = self.registry.open(spec)
                tokens = token_ids if token_ids is not None else \
                    _encode(mdir, size, prompt, messages, reply, tools)
            except SyscallError as e:
                return fail(e)
            except Exception as e:        # noqa: BLE001 a bug: answered, never left hanging
                log.exception("encoding for model %s failed", spec.name)
                return fail(SyscallError(EIO, f"encoding failed: {type(e).__name__}: {e}"))
            then(mdir, tokens)
        opened = self.registry.opened(spec)
        if opened is not None and size <= tunables.INLINE_TEXT:
            work()
        elif opened is not None and _too_long(opened, size):     # refused before any work
            fail(_too_long(opened, size))
        else:
            self.tokenizers.submit(work)

    def tokenize(self, call, model: str | None, text: str) -> None:
        self._encode(self.model(model, call.conn.owner), text, None, None, True,
                     then=lambda mdir, ids: call.reply({"token_ids": ids}),
                     fail=lambda e: call.error(e.code, e.msg))

    def detokenize(self, call, model: str | None, token_ids: list) -> None:
        def then(mdir, ids):
            vocab = mdir.config.vocab_size
            if ids and max(ids) >= vocab:
                return call.error(EINVAL, f"token_ids: ids must be below the vocabulary size "
                                          f"{vocab}")
            call.reply({"text": mdir.tokenizer.decode(ids)})
        self._encode(self.model(model, call.conn.owner), None, None, token_ids, True, then=then,
                     fail=lambda e: call.error(e.code, e.msg))

    # ---- contexts -------------------------------------------------------------------
    def context_create(self, call, caller: int, model: str | None = None, system=None,
                       messages=None, share: str | None = None, tools=None) -> None:
        """Accept a new context of caller's, started with system or messages (rendered
        with tools), and queue it. Raises ENOENT (model), ESRCH, ENOMEM (caller's contexts
        limit), EINVAL (tools without system or messages)."""
        tools = _tools(tools, messages or system, "system or messages")
        spec = self.model(model, call.conn.owner)
        if system is not None:
            messages = [{"role": "system", "content": system}]
        cid = next(self._ids)
        with self.procs.lock:
            proc = self.procs.live(caller)
            self._check_contexts(proc)
            proc.contexts[cid] = spec
            self._join(call, share)

        def queue(mdir, tokens: list) -> None:
            with self.procs.lock:
                if cid in proc.contexts:
                    self.loop.put(cmd.CreateContext(cid, proc, call, tokens,
                                                    self._salt(proc, share), spec, mdir))
                else:
                    call.error(ESRCH, f"process {caller} has exited")

        def undo(err: SyscallError) -> None:
            with self.procs.lock:
                proc.contexts.pop(cid, None)
            call.error(err.code, err.msg)

        self._encode(spec, None, messages, [] if messages is None else None, False,
                     then=queue, fail=undo, tools=tools)

    def context_fork(self, call, caller: int, source: int) -> None:
        cid = next(self._ids)
        with self.procs.lock:
            proc = self._owner_of(caller, source)
            self._check_contexts(proc)
            proc.contexts[cid] = proc.contexts[source]
            self.loop.put(cmd.ForkContext(source, cid, proc, call))

    def context_free(self, call, caller: int, context: int) -> None:
        with self.procs.lock:
            self._owner_of(caller, context).contexts.pop(context, None)
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


def _tools(tools, source, what: str):
    """tools (OpenAI's), which the chat template lists: only with chat messages to render
    them in (source, named `what`). Raises EINVAL."""
    if tools is not None and source is None:
        raise SyscallError(EINVAL, f"tools: given only with {what} (the chat template "
                                   f"lists them), not with a prompt or token ids")
    return tools


def _chat_size(messages: list, tools) -> int:
    """Characters of chat messages and their tools: what rendering them costs."""
    return sum(len(m.get("content") or "") + sum(len(c["function"]["arguments"])
                                                 for c in m.get("tool_calls", ()))
               for m in messages) + (len(json.dumps(tools)) if tools else 0)


def _encode(mdir, size: int, prompt, messages, reply: bool, tools=None) -> list[int]:
    """Token ids of a text or chat messages (with tools) under mdir's tokenizer. Raises
    E2BIG (far longer than the model's context), EINVAL (messages the chat template
    refuses)."""
    if _too_long(mdir, size):
        raise _too_long(mdir, size)
    if messages is None:
        return mdir.tokenizer.encode(prompt)
    try:
        return mdir.tokenizer.encode_chat(messages, add_generation_prompt=reply, tools=tools)
    except ValueError as e:     # no template, malformed messages, raise_exception()
        raise SyscallError(EINVAL, f"messages: {e}") from None


def _too_long(mdir, size: int) -> SyscallError | None:
    """E2BIG for a text of size characters, far more than mdir's model's context holds."""
    max_len = max_model_len(mdir.config)
    if size <= max_len * tunables.CHARS_PER_TOKEN:
        return None
    return SyscallError(E2BIG, f"prompt: {size} characters; this model's context of {max_len} "
                               f"tokens takes at most {max_len * tunables.CHARS_PER_TOKEN}")
