"""How the scheduler finds room: preemption, eviction and displacement.

A part of the Scheduler (kernel/scheduler.py) of its own, engine thread only. When the pool
or the seats run short, room comes in this order, cheapest to others first: a stopped
process's requests are preempted (`_evict_stopped`); idle contexts page out (the Pager,
kernel/vm.py); for a policy that displaces, running requests the waiting one outranks by
the policy's margin are preempted (`_displace`). A running request that cannot grow takes
room from unscheduled requests, a stopped one first, then the worst ranked (`_make_room`,
`_victim`); alone, it pages out even recently used contexts and the KV of waiting
requests' contexts (`_alone`). A process over its kv_blocks limit takes room only from
itself (`_fits_limit`, `_yield_own`). Preemption (`preempt`) swaps a victim's KV out when
it holds at least a block and the host pool has room, else drops it to be recomputed.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from . import tunables
from .account import KV_LIMIT, Account
from .request import Request

if TYPE_CHECKING:
    from .scheduler import Batch


class Preemption:
    """Mixin of Scheduler: it gives blocks, running, waiting, swapper, pager, policy,
    max_num_seqs, num_preemptions and _append."""

    def _growth(self, table, n: int) -> int:
        """Blocks more that table's account holds once n more slots are appended. Not
        blocks_needed: a copy on write takes a block from the pool but replaces one in
        the table (counted, it had a call whose limit was just enough refused)."""
        return -(-(table.num_tokens + n) // self.blocks.block_size) - len(table.blocks)

    def _over_limit(self, req: Request, blocks: int) -> bool:
        limit = req.account.limits.kv_blocks
        return limit is not None and req.account.resident + blocks > limit

    def _make_room(self, req: Request, n: int, batch: Batch) -> bool:
        """Let running `req` take n more slots: preempt (stopped first, then the worst
        ranked) unscheduled requests until it can; within its own account when it is over
        its kv_blocks limit. False when not: req waits, or when it is alone (`_alone`),
        is refused."""
        table = req.seq.table
        grow = self._growth(table, n)
        if not self._fits_limit(req, grow) and not self._yield_own(req, grow, batch):
            return False
        if self.blocks.can_append(table, n):
            return True
        if self.pager is not None and self.pager.reclaim(lambda: self.blocks.can_append(table, n)):
            return True
        scheduled = {id(r) for r, _ in batch.items}
        while not self.blocks.can_append(table, n):
            victim = self._victim(lambda r: r is not req and id(r) not in scheduled)
            if victim is None:
                return not batch.items and self._alone(req, n, batch)
            self.preempt(victim, batch)
        return True

    def _alone(self, req: Request, n: int, batch: Batch) -> bool:
        """Running req cannot grow, and nothing else runs or could be preempted: idle
        contexts page out even within the TTL, and waiting requests' context KV goes.
        If that is not enough, what holds the rest may never be taken (contexts, without
        a pager): req is refused. (It preempted itself instead, and another took its
        place: two requests that could not both fit beside a context pinned by the TTL
        took turns, each a chunk at a time, and neither ever finished.)"""
        enough = lambda: self.blocks.can_append(req.seq.table, n)     # noqa: E731
        if self.pager is not None and self.pager.reclaim(enough, force=True):
            return True
        if self._evict_waiting(req) and enough():
            return True
        self._evict(req)            # what it held may go to others in this same step
        self.running.remove(req)
        batch.refused.append(req)
        req.refusal = (f"out of KV memory: {len(req.seq.tokens)} tokens do not fit in the "
                       f"{self.blocks.num_free_blocks} blocks that idle contexts leave")
        return False

    def _fits_limit(self, req: Request, grow: int) -> bool:
        """Whether req may take `grow` more blocks under its account's kv_blocks limit, once
        the account's idle contexts are paged out and, when none of its other requests
        runs, its waiting requests' context KV is gone too (no pager may take that: the
        contexts are busy; kept, it had req refused as if it alone needed more)."""
        if not self._over_limit(req, grow):
            return True
        if self.pager is not None:
            self.pager.reclaim(lambda: not self._over_limit(req, grow), account=req.account)
        if self._over_limit(req, grow) and not any(
                r.account is req.account and r is not req for r in self.running):
            self._evict_waiting(req, req.account)
        return not self._over_limit(req, grow)

    def _yield_own(self, req: Request, grow: int, batch: Batch) -> bool:
        """req's account is over its kv_blocks limit: its other unscheduled requests yield.
        False when that is not enough: req itself waits (or, alone, fails)."""
        scheduled = {id(r) for r, _ in batch.items}
        while self._over_limit(req, grow):
            victim = self._victim(lambda r: r is not req and r.account is req.account
                                  and id(r) not in scheduled)
            if victim is None:
                if any(r.account is req.account and r is not req for r in self.running):
                    self.preempt(req, batch)          # its own others will finish first
                else:
                    self.running.remove(req)
                    batch.refused.append(req)
                    req.refusal = (f"{KV_LIMIT} ({req.account.limits.kv_blocks}) "
                                   f"reached: this request alone needs more")
                return False
            self.preempt(victim, batch)
        return True

    def _victim(self, eligible: Callable[[Request], bool]) -> Request | None:
        """The running request to preempt: a stopped one first, else the worst ranked."""
        stopped = [r for r in self.running if r.stopped and eligible(r)]
        if stopped:
            return stopped[-1]
        return next((r for r in reversed(self.running) if eligible(r)), None)

    def preempt(self, req: Request, batch: Batch) -> None:
        """Swap the request's KV out when it is worth it, else drop it; it waits again."""
        batch.preempted.add(id(req))
        self.running.remove(req)
        self._evict(req)
        self.waiting.append(req)
        req.account.preemptions += 1
        self.num_preemptions += 1

    def _evict(self, req: Request) -> None:
        """Free req's device KV: swapped out when it is worth it, else dropped."""
        table = req.seq.table
        if self.swapper is not None and table.num_tokens >= tunables.SWAP_MIN_TOKENS \
                and self.swapper.can_swap_out(table):
            req.swapped = self.swapper.swap_out(table)
            req.account.swaps += len(req.swapped.blocks)
        self.blocks.free(table)

    def _evict_stopped(self, batch: Batch, enough: Callable[[], bool]) -> bool:
        """Preempt stopped running requests until enough(): a stopped process keeps its
        KV and its seat only while nobody waiting needs them."""
        while not enough():
            victim = next((r for r in reversed(self.running) if r.stopped), None)
            if victim is None:
                return False
            self.preempt(victim, batch)
        return True

    def _displace(self, req: Request, batch: Batch, now: float,
                  enough: Callable[[], bool]) -> bool:
        """For a policy that displaces: preempt running requests that waiting `req`
        outranks by the policy's margin, worst first, until enough()."""
        if not self.policy.displaces:
            return enough()
        rank, margin = self.policy.rank, self.policy.margin
        mine = rank(req, now)
        scheduled = {id(r) for r, _ in batch.items}
        while not enough():
            victim = self._victim(lambda r: id(r) not in scheduled
                                  and rank(r, now) > mine + margin)
            if victim is None:
                return False
            self.preempt(victim, batch)
        return True

    def _room(self, req: Request, batch: Batch, now: float, enough: Callable[[], bool],
              force: bool = False) -> bool:
        """Stopped requests, idle contexts (by the TTL, unless force), then displaced ones,
        until enough()."""
        if self._evict_stopped(batch, enough):
            return True
        if self.pager is not None and self.pager.reclaim(enough, force=force):
            return True
        return self._displace(req, batch, now, enough)

    def _evict_waiting(self, keep: Request, account: Account | None = None) -> bool:
        """Swap out or drop the device KV of waiting requests other than keep (of account
        only, if given); whether any had some."""
        holders = [r for r in self.waiting if r is not keep and r.seq.table.blocks
                   and (account is None or r.account is account)]
        for req in holders:
            self._evict(req)
        return bool(holders)
