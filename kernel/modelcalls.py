"""The model calls of the Supervisor (kernel/kernel.py): list, load, unload, add and
remove models. Their policy: only the owner changes what is loaded or registered (any
process may name a model in its calls, which loads it on demand); opening a model
directory, the slow part, runs on a tokenizer worker, never the I/O thread; the engine
thread's model table does the loading and unloading (kernel/modeltable.py).

A mixin of Supervisor, which gives it: registry, default_model, loop, tokenizers, audit.
Threads: called on the I/O thread.
"""
from __future__ import annotations

import dataclasses
import logging

from llmos.syscalls.errors import EIO, EPERM, SyscallError
from llmos.syscalls.types import ModelInfo

from . import inbox as cmd

log = logging.getLogger("llmos.models")


class ModelCalls:
    def models(self) -> list[ModelInfo]:
        """Every loaded, loading and registered model (loaded ones as the engine last
        published them; a loading one with its progress now)."""
        snap = self.loop.snapshot
        rows = {m.name: m for m in snap.models}
        for slot in snap.loading:
            rows.setdefault(slot.name, ModelInfo(
                name=slot.name, path=slot.spec.path, state=slot.state,
                dtype=str(slot.plan.dtype).removeprefix("torch."),
                weight_bytes=slot.plan.weight_bytes, kv_bytes=slot.plan.kv_bytes,
                kv_blocks=slot.plan.num_blocks, quantize=slot.plan.quantize or "",
                progress=round(slot.progress, 3),
                tool_format=slot.plan.mdir.tokenizer.tool_format))
        for spec in self.registry.registered():
            rows.setdefault(spec.name, self._registered(spec))
        return [m if m.name != self.default_model else dataclasses.replace(m, default=True)
                for m in rows.values()]

    def _registered(self, spec) -> ModelInfo:
        """A registered model that is not loaded: what its opened config and tokenizer say,
        if its directory was opened (by a call that named it, or `models add`)."""
        mdir = self.registry.opened(spec)
        c = mdir.config if mdir is not None else None
        return ModelInfo(name=spec.name, path=spec.path, state="registered",
                         dtype=spec.dtype or "auto", quantize=spec.quantize or "",
                         keep_alive=spec.keep_alive,
                         **({} if c is None else dict(model_type=c.model_type,
                                                      layers=c.num_hidden_layers,
                                                      hidden=c.hidden_size, vocab=c.vocab_size,
                                                      tool_format=mdir.tokenizer.tool_format)))

    def model_load(self, call, owner: bool, name: str, keep_alive: float | None) -> None:
        """Queue the load of model name (the call is answered when it is in). Raises EPERM,
        ENOENT."""
        spec = self._owner_names(call, owner, "load", name)
        self._opened(call, spec, lambda mdir: self.loop.put(cmd.Load(spec, mdir, call,
                                                                     keep_alive)))

    def model_unload(self, call, owner: bool, name: str) -> None:
        """Queue the unload of model name. Raises EPERM."""
        self._owner_names(call, owner, "unload", None)
        self.loop.put(cmd.Unload(name, call))

    def model_add(self, call, owner: bool, name: str, path: str, dtype: str | None,
                  quantize: str | None, keep_alive: float | None) -> None:
        """Register name -> path once the model there opens (on a worker). Raises EPERM."""
        self._owner_names(call, owner, "add", None)

        def work():
            try:
                spec = self.registry.add(name, path, dtype, quantize, keep_alive)
            except SyscallError as e:
                return call.error(e.code, e.msg)
            except Exception as e:          # noqa: BLE001 — a worker's failure answers its call
                log.exception("models add %s %s failed", name, path)
                return call.error(EIO, f"models add: {type(e).__name__}: {e} (see the kernel log)")
            call.reply(self._registered(spec))
        self.tokenizers.submit(work)

    def model_rm(self, call, owner: bool, name: str) -> dict:
        """Forget a registered name. Raises EPERM, ENOENT."""
        self._owner_names(call, owner, "rm", None)
        self.registry.remove(name)
        return {}

    def _owner_names(self, call, owner: bool, verb: str, name: str | None):
        """Only the owner changes the model table or the registry: EPERM else. The spec
        name stands for, if given (ENOENT)."""
        if not owner:
            raise SyscallError(EPERM, f"models {verb}: only the owner may {verb} models")
        self.audit.record("models", pid=call.conn.pid, uid=call.conn.uid, action=verb)
        return self.model(name) if name is not None else None

    def _opened(self, call, spec, then) -> None:
        """then(mdir) with spec's directory opened, on a worker unless it was before."""
        def work():
            try:
                mdir = self.registry.open(spec)
            except SyscallError as e:
                return call.error(e.code, e.msg)
            then(mdir)
        if self.registry.opened(spec) is not None:
            work()
        else:
            self.tokenizers.submit(work)

