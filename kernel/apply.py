"""How the engine thread applies each inbox command (kernel/inbox.py): a mixin of
EngineLoop (kernel/loop.py), which gives it `models` (the model table), `procs` (the
process table), `on_limit`, `_apply` (command type -> method) and `_publish`.

A command for a model that is not loaded admits its load and waits in the model's slot
(`_engine_for`); `Loaded` runs the waiting commands in their order, or fails them with
the load's error. Engine thread only.
"""
from __future__ import annotations

from functools import partial

from llmos.syscalls.errors import EINVAL, ESRCH, SyscallError
from llmos.syscalls.types import Completion, ContextInfo, Delta, SchedInfo

from . import inbox as cmd
from . import tunables
from .account import KV_LIMIT
from .errors import NoSuchContext
from .modeltable import READY
from .policy import POLICIES, make_policy


class Commands:
    @property
    def policy(self) -> str:
        return self.models.engine_options.get("policy") or tunables.DEFAULT_POLICY

    # ---- the models (engine thread) -----------------------------------------------------
    def _engine_for(self, c):
        """The engine of c's model, or None: c waits in the slot of a model that is loading
        (admitted now if it was not loaded), or failed because the model cannot load."""
        slot = self.models.slots.get(c.model.name)
        if slot is not None and slot.spec != c.model:   # the name now stands for another model
            try:
                self.models.replace(slot)
            except SyscallError as e:
                self._refuse(c, e)
                return None
            slot = None
        if slot is None:
            try:
                slot = self.models.admit(c.model, self.models.plan(c.model, c.mdir),
                                         getattr(c, "keep_alive", None))
            except SyscallError as e:
                self._refuse(c, e)
                return None
            except ValueError as e:               # sizes that cannot work
                self._refuse(c, SyscallError(EINVAL, f"model {c.model.name!r}: {e}"))
                return None
            self._publish(force=True)
        if slot.state != READY:
            slot.waiting.append(c)
            return None
        self.models.touch(slot)
        return slot.engine

    def _refuse(self, c, e: SyscallError) -> None:
        """c will not run: its call fails and what the kernel recorded for it goes."""
        if isinstance(c, cmd.Add):
            self._forget(c)
        elif isinstance(c, cmd.CreateContext):
            self._disown(c.proc, c.context)
        if c.call is not None:
            c.call.error(e.code, e.msg)

    def _loaded(self, c: cmd.Loaded) -> None:
        """The loader thread is done with c.slot: the commands that waited for it run now
        in their order, or fail with the load's error."""
        waiting, c.slot.waiting = c.slot.waiting, []
        if c.error is None:
            self.models.installed(c.slot, c.engine)
        else:
            self.models.failed(c.slot)
        self._publish(force=True)
        for w in waiting:
            if c.error is None:
                self._apply[type(w)](w)
            else:
                self._refuse(w, c.error)

    def _load(self, c: cmd.Load) -> None:
        engine = self._engine_for(c)
        if engine is not None:
            slot = self.models.slots[c.model.name]
            self.models.set_keep_alive(slot, c.keep_alive)
            c.call.reply(self.models.info(slot))

    def _unload(self, c: cmd.Unload) -> None:
        try:
            self.models.unload(c.name)
        except SyscallError as e:
            c.call.error(e.code, e.msg)
            return
        self._publish(force=True)
        c.call.reply({})

    def _withdraw(self, rids=(), contexts=()) -> None:
        """Take Adds of rids and CreateContexts of contexts out of the slots they wait in
        (cancelled, or their process died): an Add is answered "abort", a context ESRCH."""
        for slot in list(self.models.slots.values()):
            keep = []
            for w in slot.waiting:
                if isinstance(w, cmd.Add) and w.rid in rids:
                    self._forget(w)
                    w.call.reply(Completion(finish_reason="abort"))
                elif isinstance(w, cmd.CreateContext) and w.context in contexts:
                    self._refuse(w, SyscallError(ESRCH, f"process {w.proc.pid} has exited"))
                else:
                    keep.append(w)
            slot.waiting = keep

    # ---- commands (engine thread) -------------------------------------------------------
    def _add(self, c: cmd.Add) -> None:
        engine = self._engine_for(c)
        if engine is None:
            return
        try:
            engine.add_request(c.tokens, chat=c.chat, context=c.context,
                               on_event=partial(self._output, c), salt=c.salt,
                               stream=c.stream, request_id=c.rid, owner=c.proc,
                               account=c.proc.acct, turn=c.turn, **c.sampling)
        except SyscallError as e:          # EngineError and its kinds
            self._forget(c)
            self._refused(c, e.msg)
            c.call.error(e.code, e.msg)
            return

    def _output(self, c: cmd.Add, out) -> None:
        """A request's news: stream it, and answer the call when it is done (the scheduler
        charged its tokens to the process's account)."""
        if c.stream and (out.text or out.token_ids):
            c.call.event(Delta(out.text, out.token_ids))
        if out.finished:
            self._forget(c)
            if out.error:
                self._refused(c, out.error)
                c.call.error(out.error_code, out.error)
            else:
                c.call.reply(out.completion)

    def _refused(self, c: cmd.Add, msg: str) -> None:
        """A call failed: the kernel audits a refusal by the process's kv_blocks limit."""
        if msg.startswith(KV_LIMIT):
            self.on_limit(c.proc, c.call, msg)

    def _forget(self, c: cmd.Add) -> None:
        with self.procs.lock:
            if c.proc.requests.get(c.key) == c.rid:
                del c.proc.requests[c.key]

    def _abort(self, c: cmd.Abort) -> None:
        slot = self.models.with_request(c.rid)
        if slot is not None:
            slot.engine.abort(c.rid)
        else:
            self._withdraw(rids={c.rid})

    def _pause(self, c: cmd.Pause) -> None:
        c.proc.acct.stopped = c.stopped            # requests of models loaded later see it
        for engine in self.models.engines():
            engine.pause(c.proc.acct, c.stopped)

    def _set_policy(self, c: cmd.SetPolicy) -> None:
        try:
            make_policy(c.name)
        except ValueError as e:
            c.call.error(EINVAL, f"policy: {e}")
            return
        self.models.engine_options["policy"] = c.name     # and every model loaded later
        for engine in self.models.engines():
            engine.set_policy(c.name)
        self._publish(force=True)                          # ps and sched show it at once
        c.call.reply(SchedInfo(self.policy, list(POLICIES)))

    def _release(self, c: cmd.Release) -> None:
        self._withdraw(set(c.rids), set(c.contexts))
        for rid in c.rids:
            slot = self.models.with_request(rid)
            if slot is not None:
                slot.engine.abort(rid)
        for cid in c.contexts:
            slot = self.models.with_context(cid)
            if slot is not None:
                slot.engine.context_free(cid)
                self.models.touch(slot)           # its keep-alive counts from now
        self.procs.released(c.proc)

    def _create_context(self, c: cmd.CreateContext) -> None:
        engine = self._engine_for(c)
        with self.procs.lock:
            owned = c.context in c.proc.contexts
        if engine is not None and not owned:        # freed, or its process died, meanwhile
            c.call.error(ESRCH, f"context: context {c.context} was freed (or its process "
                                f"exited) before it was made")
        elif engine is not None:
            self._context_made(c, lambda: engine.context_create(
                c.tokens, salt=c.salt, context_id=c.context, owner=c.proc, account=c.proc.acct))

    def _fork_context(self, c: cmd.ForkContext) -> None:
        self._context_made(c, lambda: self._holder(c.source).context_fork(
            c.source, context_id=c.context, owner=c.proc, account=c.proc.acct))

    def _context_made(self, c, make) -> None:
        """make() context c.context: the call gets its id, or the error (and the process
        no longer owns the id)."""
        try:
            make()
        except SyscallError as e:
            self._disown(c.proc, c.context)
            c.call.error(e.code, e.msg)
            return
        c.call.reply({"context": c.context})

    def _disown(self, proc, context: int) -> None:
        with self.procs.lock:
            proc.contexts.pop(context, None)

    def _free_context(self, c: cmd.FreeContext) -> None:
        slot = self.models.with_context(c.context)
        if slot is not None:
            slot.engine.context_free(c.context)
            self.models.touch(slot)               # its keep-alive counts from now
        else:                                     # its model is loading: never make it
            self._withdraw(contexts={c.context})
        c.call.reply({})

    def _describe_context(self, c: cmd.DescribeContext) -> None:
        try:
            c.call.reply(ContextInfo(**self._holder(c.context).context_info(c.context)))
        except SyscallError as e:
            c.call.error(e.code, e.msg)

    def _holder(self, context: int):
        """The engine that holds context. Raises NoSuchContext (ESRCH)."""
        slot = self.models.with_context(context)
        if slot is None:
            raise NoSuchContext(f"context: no context {context}")
        self.models.touch(slot)
        return slot.engine
