"""First-come first-served scheduling of requests over the KV pool, with preemption.

Each step gets a batch under a token budget. Every running request has some pending
tokens (one when decoding, a chunk when prefilling or recomputing); the batch takes
decodes first, then prefill chunks, then admits waiting requests in arrival order. A
request that cannot get KV blocks preempts the most recently admitted request that is
not in the batch yet: its KV is swapped out to the host pool when that has room (else
dropped, to be recomputed, largely from the prefix cache), its device blocks are freed,
and it goes back to the front of the queue. A stopped request (SIGSTOP) is not scheduled;
it keeps its KV and its seat only until a waiting request needs them, then it is
preempted the same way.

Block copies (copy-on-write, swap) are done through the engine as soon as they are
decided, so a block is always read before it can be freed and handed to someone else.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Callable

from .blocks import BlockManager
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


class Scheduler:
    def __init__(self, blocks: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 copy_blocks: Callable[[list[tuple[int, int]]], None],
                 swapper: Swapper | None = None):
        self.blocks, self.copy_blocks, self.swapper = blocks, copy_blocks, swapper
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []   # in admission order: the tail is preempted first
        self.num_preemptions = 0

    def add(self, req: Request) -> None:
        self.waiting.append(req)

    def remove(self, req: Request) -> None:
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)

    def has_work(self) -> bool:
        return any(not r.stopped for r in self.running) or any(not r.stopped for r in self.waiting)

    def schedule(self) -> Batch:
        """Steps, in order:
        1. running requests with one pending token (decode), in admission order;
        2. running requests with more (prefill chunks), while the budget lasts;
        3. waiting requests in arrival order, while budget, seats and blocks last
           (stopped requests give theirs up);
        4. if nothing could run at all, the head of the queue is refused (its KV cannot fit).
        """
        batch = Batch()
        budget = self.max_num_batched_tokens
        runnable = [r for r in self.running if not r.stopped]
        decodes = [r for r in runnable if r.seq.num_pending == 1]
        for req in decodes + [r for r in runnable if r.seq.num_pending > 1]:
            if budget == 0 or id(req) in batch.preempted:
                continue
            n = min(req.seq.num_pending, budget)
            if self._make_room(req, n, batch):
                self._append(req, n, batch)
                budget -= n
        self._admit(batch, budget)
        if not batch.items and not self.running:
            head = next((r for r in self.waiting if not r.stopped), None)
            if head is not None:
                self.waiting.remove(head)
                batch.refused.append(head)
        return batch

    def _make_room(self, req: Request, n: int, batch: Batch) -> bool:
        """Preempt unscheduled requests from the tail until `req` can take n slots."""
        if self.blocks.can_append(req.seq.table, n):
            return True
        scheduled = {id(r) for r, _ in batch.items}
        while not self.blocks.can_append(req.seq.table, n):
            victim = next((r for r in reversed(self.running)
                           if r is not req and id(r) not in scheduled), None)
            if victim is None:
                if not batch.items:
                    self.preempt(req, batch)
                return False
            self.preempt(victim, batch)
        return True

    def _append(self, req: Request, n: int, batch: Batch) -> None:
        copies = self.blocks.append_slots(req.seq.table, n)
        if copies:
            self.copy_blocks(copies)
        batch.items.append((req, n))

    def preempt(self, req: Request, batch: Batch) -> None:
        """Swap the request's KV out if the host pool has room, else drop it; requeue first."""
        batch.preempted.add(id(req))
        self.running.remove(req)
        table = req.seq.table
        if self.swapper is not None and table.num_tokens and self.swapper.can_swap_out(table):
            req.swapped = self.swapper.swap_out(table)
        self.blocks.free(table)
        self.waiting.appendleft(req)
        self.num_preemptions += 1

    def _evict_stopped(self, batch: Batch, enough: Callable[[], bool]) -> bool:
        """Preempt stopped running requests, the latest first, until enough(): a stopped
        process keeps its KV and its seat only while nobody waiting needs them (else it
        held up every admission until SIGCONT, and the engine spun on empty steps)."""
        while not enough():
            victim = next((r for r in reversed(self.running) if r.stopped), None)
            if victim is None:
                return False
            self.preempt(victim, batch)
        return True

    def _admit(self, batch: Batch, budget: int) -> None:
        for req in list(self.waiting):
            if req.stopped:
                continue
            if budget == 0 or not self._evict_stopped(
                    batch, lambda: len(self.running) < self.max_num_seqs):
                return
            table = req.seq.table
            restore = req.swapped.num_tokens if req.swapped is not None else 0
            fresh = table.num_tokens == 0 and not restore
            if fresh:
                self.blocks.match_prefix(table, req.seq.tokens)
            n = min(len(req.seq.tokens) - max(restore, table.num_tokens), budget)
            if not self._evict_stopped(batch, lambda: self.blocks.can_append(table, restore + n)):
                if fresh:
                    self.blocks.free(table)   # give back the prefix hits; they stay cached
                return
            if restore:
                self.swapper.swap_in(req.swapped, table, self.blocks)
                req.swapped = None
            if not req.started:
                req.started, req.cached_tokens = True, table.num_tokens
            self.waiting.remove(req)
            self.running.append(req)
            self._append(req, n, batch)
            budget -= n
