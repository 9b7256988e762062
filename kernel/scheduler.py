"""Scheduling requests over the KV pool, in the order a policy ranks them, with preemption.

Each step gets a batch under a token budget (`schedule`), in this order:
  1. running requests, best rank first (kernel/policy.py): decodes (one pending token),
     then prefill chunks, while the budget lasts; one that needs a block it cannot get
     makes room (`_make_room`) or waits;
  2. waiting requests, best rank first, while budget, seats and blocks last; running
     requests that the best waiting one outranks by the policy's margin (a policy that
     displaces) take their tokens only after this, so that it can still displace them;
  3. if nothing could run at all, the best waiting request is refused (its KV cannot fit).
Requests that may not run now are skipped: a stopped process's (SIGSTOP), and a process's
that spent its tokens_per_s (its token bucket refills; `wake_in` says when).

Room, when the pool or the seats run short, is found by preemption, paging and
displacement, cheapest to others first (kernel/preempt.py, a part of this class). A
process over its kv_blocks limit makes room from its own contexts and requests only, or
waits for its own requests to finish; a request that alone exceeds its limit is refused
with ENOMEM. Block copies (copy-on-write, swap) go through the engine as soon as they are
decided, so a block is always read before it can be freed and handed to someone else.
Engine thread only.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

from .account import KV_LIMIT, Account
from .blocks import BlockManager
from .policy import Fifo, Policy
from .preempt import Preemption
from .request import Request
from .swap import Swapper


@dataclass
class Batch:
    items: list[tuple[Request, int]] = field(default_factory=list)  # request, tokens this step
    refused: list[Request] = field(default_factory=list)            # can never get its KV
    preempted: set[int] = field(default_factory=set)                # ids of requests preempted

    @property
    def num_tokens(self) -> int:
        return sum(n for _, n in self.items)


class Scheduler(Preemption):
    def __init__(self, blocks: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 copy_blocks: Callable[[list[tuple[int, int]]], None],
                 swapper: Swapper | None = None, policy: Policy | None = None,
                 pager=None, clock: Callable[[], float] = time.monotonic):
        self.blocks, self.copy_blocks, self.swapper = blocks, copy_blocks, swapper
        self.pager = pager             # kernel/vm.py Pager, or None: contexts stay resident
        self.policy = policy or Fifo()
        self.clock = clock
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: list[Request] = []
        self.running: list[Request] = []
        self.active: dict[Account, int] = {}   # accounts with live requests: how many
        self.num_preemptions = 0
        self._last = clock()

    # ---- the queue ------------------------------------------------------------------
    def add(self, req: Request) -> None:
        req.arrived = self.clock()
        acct = req.account
        if acct not in self.active:
            self.policy.backlogged(acct, self.active)
        self.active[acct] = self.active.get(acct, 0) + 1
        self.waiting.append(req)

    def remove(self, req: Request) -> None:
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        else:
            return
        left = self.active[req.account] - 1
        if left:
            self.active[req.account] = left
        else:
            del self.active[req.account]

    def may_run(self, req: Request, now: float) -> bool:
        return not req.stopped and req.account.may_generate(now)

    def has_work(self) -> bool:
        """Whether a step now would have something to run (stopped and throttled work
        does not count: the engine must not spin on it)."""
        now = self.clock()
        return any(self.may_run(r, now) for r in self.running) or \
            any(self.may_run(r, now) for r in self.waiting)

    def wake_in(self) -> float | None:
        """Seconds until throttled work may run (None: there is none)."""
        waits = [r.account.refill_in() for r in self.running + self.waiting
                 if not r.stopped and r.account.limits.tokens_per_s is not None]
        waits = [w for w in waits if w > 0]
        return min(waits) if waits else None

    def set_policy(self, policy: Policy) -> None:
        self.policy = policy
        for acct in list(self.active):
            policy.backlogged(acct, self.active)

    # ---- one step -------------------------------------------------------------------
    def _key(self, now: float):
        rank = self.policy.rank
        return lambda r: (rank(r, now), r.arrived, r.id)

    def schedule(self) -> Batch:
        """The next step's batch (see the module docstring)."""
        batch, now = Batch(), self.clock()
        key = self._key(now)
        self.running.sort(key=key)
        runnable = [r for r in self.running if self.may_run(r, now)]
        # Only a request not yet in the batch can be displaced: one that the best waiting
        # request outranks by the margin runs after admission, not before (else every
        # runnable one is in the batch by then, and displacement never happens).
        exposed = self._exposed(runnable, now)
        budget = self._run([r for r in runnable if id(r) not in exposed], batch,
                           self.max_num_batched_tokens)
        budget = self._admit(batch, budget, now, key)
        self._run([r for r in runnable if id(r) in exposed], batch, budget)
        if not batch.items and not any(self.may_run(r, now) for r in self.running):
            self._refuse_head(batch, now, key)
        self._account(batch, now)
        return batch

    def _run(self, reqs: list[Request], batch: Batch, budget: int) -> int:
        """Running reqs take their pending tokens, decodes first, while the budget lasts
        (one that cannot get a block makes room or waits); returns the budget left."""
        for req in [r for r in reqs if r.seq.num_pending == 1] + \
                [r for r in reqs if r.seq.num_pending > 1]:
            if budget == 0 or id(req) in batch.preempted:
                continue
            n = min(req.seq.num_pending, budget)
            if self._make_room(req, n, batch):
                self._append(req, n, batch)
                budget -= n
        return budget

    def _exposed(self, runnable: list[Request], now: float) -> set[int]:
        """Ids of the running requests that the best runnable waiting one outranks by more
        than the margin, for a policy that displaces (none otherwise)."""
        if not self.policy.displaces:
            return set()
        rank = self.policy.rank
        best = min((rank(r, now) for r in self.waiting if self.may_run(r, now)), default=None)
        if best is None:
            return set()
        return {id(r) for r in runnable if rank(r, now) > best + self.policy.margin}

    def _refuse_head(self, batch: Batch, now: float, key) -> None:
        """Nothing could run: page out even recently used contexts, then retry; then let
        the other waiting requests' context KV go, then retry once more; if still nothing
        fits, the best waiting request can never get its KV."""
        head = min((r for r in self.waiting if self.may_run(r, now)), key=key, default=None)
        if head is None:
            return
        # Nothing is in the batch: a request preempted in this step (for a request that was
        # then refused) may run after all; skipped, it was refused in its turn.
        batch.preempted.clear()
        if self._retry(batch, now, key):
            return
        # A waiting request on a context holds the context's KV on the device until it is
        # admitted, and the pager cannot take it (the context is busy): waiting requests
        # that each need one more block could hold the whole pool, and one was refused.
        if self._evict_waiting(head) and self._retry(batch, now, key):
            return
        self.waiting.remove(head)
        batch.refused.append(head)

    def _retry(self, batch: Batch, now: float, key) -> bool:
        """Admit again, paging out contexts within the TTL too; whether any request was
        admitted or refused."""
        before = len(batch.items) + len(batch.refused)
        self._admit(batch, self.max_num_batched_tokens, now, key, force=True)
        return len(batch.items) + len(batch.refused) > before

    def _account(self, batch: Batch, now: float) -> None:
        """Time queued and running, per process, since the last step."""
        dt, self._last = now - self._last, now
        served = {r.account for r, _ in batch.items}
        for acct in self.active:
            if acct in served:
                acct.running_s += dt
            else:
                acct.queued_s += dt

    def charge(self, req: Request, prompt: int, generated: int) -> None:
        """After the forward: req received prompt + generated tokens of service."""
        acct = req.account
        acct.charge(prompt, generated)
        acct.spend(generated)
        self.policy.charged(acct, prompt, generated)

    def _append(self, req: Request, n: int, batch: Batch) -> None:
        copies = self.blocks.append_slots(req.seq.table, n)
        if copies:
            self.copy_blocks(copies)
        batch.items.append((req, n))

    # ---- admission ------------------------------------------------------------------
    def _admit(self, batch: Batch, budget: int, now: float, key, force: bool = False) -> int:
        """Admit waiting requests best first (force: page out recently used contexts too);
        returns the budget left."""
        self.waiting.sort(key=key)
        for req in list(self.waiting):
            if budget == 0:
                break
            if not self.may_run(req, now) or id(req) in batch.preempted:
                continue
            if not self._room(req, batch, now, lambda: len(self.running) < self.max_num_seqs):
                break
            admitted = self._admit_one(req, batch, budget, now, force)
            if admitted is None:
                break                    # the pool is short: later ones rank worse
            budget -= admitted
        return budget

    def _admit_one(self, req: Request, batch: Batch, budget: int, now: float,
                   force: bool = False) -> int | None:
        """Give waiting req its KV (a prefix hit, its swapped blocks, fresh ones) and a
        first chunk; the tokens it takes, 0 when its own limit holds it back, None when
        the pool is short."""
        table = req.seq.table
        restore = req.swapped.num_tokens if req.swapped is not None else 0
        fresh = table.num_tokens == 0 and not restore
        if fresh:
            self.blocks.match_prefix(table, req.seq.tokens)
        # At least one token runs, for the logits: KV restored up to the last token
        # is cut back by one (a context paged out after its last reply).
        n = max(1, min(len(req.seq.tokens) - max(restore, table.num_tokens), budget))
        grow = self._growth(table, restore + n)
        if not self._fits_limit(req, grow):
            if fresh:
                self.blocks.free(table)
            if not any(r.account is req.account for r in self.running):
                self.waiting.remove(req)
                batch.refused.append(req)
                req.refusal = (f"{KV_LIMIT} ({req.account.limits.kv_blocks}) reached: "
                               f"the process holds {req.account.resident} blocks in "
                               f"contexts that cannot be paged out, and this needs {grow}")
            return 0
        if not self._room(req, batch, now, lambda: self.blocks.can_append(table, restore + n),
                          force):
            if fresh:
                self.blocks.free(table)   # give back the prefix hits; they stay cached
            return None
        if restore:
            if self.pager is not None:
                self.pager.restore(req.swapped, table)
            else:
                self.swapper.swap_in(req.swapped, table, self.blocks)
            req.swapped = None
            if table.num_tokens + n > len(req.seq.tokens):
                self.blocks.truncate(table, len(req.seq.tokens) - n)
        if not req.started:
            req.started, req.cached_tokens = True, table.num_tokens
        self.waiting.remove(req)
        self.running.append(req)
        self._append(req, n, batch)
        return n
