"""Contexts: KV sequences that outlive requests (a conversation, a system prompt).

A part of the Engine (kernel/engine.py) of its own, engine thread only. A context is its
account's memory: idle, it may be paged out of the device pool (kernel/vm.py) and comes
back on its next request. `fork` makes a copy-on-write child.
"""
from __future__ import annotations

from .account import Account
from .blocks import BlockTable
from .errors import ContextBusy, EngineError, NoSuchContext
from .request import KVContext, Sequence


class ContextCalls:
    def context_create(self, prompt: str | list[int] | None = None, *, messages=None,
                       salt: bytes | None = None, context_id: int | None = None,
                       owner: object = None, account: Account | None = None) -> int:
        """A KV sequence that outlives requests; its tokens are computed by the next request.
        Its KV is `account`'s memory (paged out when idle and the pool is short). Returns
        its id (context_id if given). Raises EngineError for a bad prompt."""
        cid = next(self._context_ids) if context_id is None else context_id
        if cid in self.contexts:
            raise EngineError(f"context id {cid} is in use")
        tokens = [] if prompt is None and messages is None else self.encode(prompt, messages, reply=False)
        account = account or self.anonymous
        self._check_fits(len(tokens), 0, account)
        ctx = KVContext(cid, Sequence(tokens, self.blocks.new_table(salt, account)), owner=owner,
                        account=account, last_used=self.scheduler.clock())
        self.contexts[cid] = ctx
        return cid

    def context_extend(self, context: int, prompt=None, *, messages=None) -> None:
        ctx = self._idle_context(context)
        turn = self.tokenizer.encode_chat_turn(messages, add_generation_prompt=False) \
            if messages is not None and ctx.seq.tokens else None
        tokens = self._token_ids(self.encode(prompt, messages, reply=False),
                                 messages is not None, ctx.seq.tokens, turn)
        self._check_fits(len(ctx.seq.tokens) + len(tokens), 0)
        ctx.seq.tokens += tokens

    def context_fork(self, context: int, context_id: int | None = None,
                     owner: object = None, account: Account | None = None) -> int:
        """A copy-on-write child: it shares every block of the parent until one of them
        writes. A parent paged out to host swap shares its host blocks with the child
        (they are read-only there); one paged out to disk has a child that recomputes its
        KV on its first call."""
        parent = self._idle_context(context)
        cid = next(self._context_ids) if context_id is None else context_id
        if cid in self.contexts:
            raise EngineError(f"context id {cid} is in use")
        account = account or parent.account
        table = self.blocks.fork(parent.seq.table, account)
        child = KVContext(cid, Sequence(list(parent.seq.tokens), table),
                          owner=parent.owner if owner is None else owner, account=account,
                          last_used=self.scheduler.clock())
        if isinstance(parent.paged, BlockTable):
            child.paged = self.swapper.host.fork(parent.paged, account)
        self.contexts[child.id] = child
        return child.id

    def context_free(self, context: int) -> None:
        ctx = self._context(context)
        if ctx.busy is not None:
            self.abort(ctx.busy.id)
        self.pager.drop(ctx.paged)
        ctx.paged = None
        self.blocks.free(ctx.seq.table)
        del self.contexts[context]

    def context_info(self, context: int) -> dict:
        seq = self._context(context).seq
        paged = self.contexts[context].paged
        computed = seq.num_computed or (paged.num_tokens if paged is not None else 0)
        return {"id": context, "tokens": len(seq.tokens), "computed": computed,
                "blocks": len(seq.table.blocks), "busy": self.contexts[context].busy is not None}

    def _context(self, context: int) -> KVContext:
        ctx = self.contexts.get(context)
        if ctx is None:
            raise NoSuchContext(f"context {context}: no such context")
        return ctx

    def _idle_context(self, context: int) -> KVContext:
        ctx = self._context(context)
        if ctx.busy is not None:
            raise ContextBusy(f"context {context} is running request {ctx.busy.id}")
        return ctx
