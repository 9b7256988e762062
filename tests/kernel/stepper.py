"""Stepping without a model: the scheduler alone (`Stepper`, for test_policies.py and
test_fairness.py), or a real Engine whose model is a `MarkRunner` (test_paging.py).

`Stepper` drives the real Scheduler, BlockManager and Swapper (over the cpu driver, with a
one-layer KV pool whose freed blocks are poisoned) the way the engine does: the batch's
tokens count as computed, and each one's KV slot gets (token, position) written, so that
what swapping, copy-on-write and the prefix cache hand back can be read and checked; a
request whose pending tokens all ran gets one token; a request finishes at max_tokens. A
fake clock advances DT per step, so aging and counters are deterministic.
"""
from __future__ import annotations

import torch

from llmos.drivers.cpu import CpuDriver
from llmos.kernel.account import Account
from llmos.kernel.blocks import BlockManager
from llmos.kernel.policy import make_policy
from llmos.kernel.request import Request, Sequence
from llmos.kernel.sampling import SamplingParams
from llmos.kernel.scheduler import Batch, Scheduler
from llmos.kernel.swap import Swapper

BS = 4               # tokens per KV block
DT = 0.25            # seconds of the fake clock per step


class Clock:
    """time.monotonic for the scheduler, moved by hand."""

    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


class Stepper:
    """A Scheduler over real block pools, stepped without a model (see the module doc)."""

    def __init__(self, policy: str, num_blocks: int, host_blocks: int = 0, seats: int = 4,
                 budget: int = 16, clock: Clock | None = None):
        self.driver = drv = CpuDriver()
        layout = dict(num_layers=1, block_size=BS, num_kv_heads=1, head_dim=2,
                      dtype=torch.float32)
        self.caches = drv.allocate_kv_cache(num_blocks=num_blocks, **layout)
        self.blocks = BlockManager(num_blocks, BS,
                                   on_free=lambda b: drv.poison_blocks(self.caches, b))
        self.swapper = None
        if host_blocks:
            host = BlockManager(host_blocks, BS, enable_prefix_caching=False, tier="host")
            self.swapper = Swapper(drv, self.caches,
                                   drv.allocate_swap(num_blocks=host_blocks, **layout), host)
        self.clock = clock or Clock()
        self.seats, self.budget = seats, budget
        self.sched = Scheduler(self.blocks, seats, budget, self._copy, self.swapper,
                               make_policy(policy), clock=self.clock)
        self.live: list[Request] = []
        self.steps = 0
        self.first_ran: dict[int, int] = {}   # request id -> the step it first had tokens in

    def _copy(self, pairs):
        self.driver.copy_blocks(self.caches, [s for s, _ in pairs], [d for _, d in pairs])

    def add(self, acct: Account, prompt: list[int], max_tokens: int) -> Request:
        """What Engine.add_request does for a request without a context."""
        req = Request(Sequence(list(prompt), self.blocks.new_table(account=acct)),
                      SamplingParams(max_tokens=max_tokens, ignore_eos=True), None,
                      account=acct)
        req.stopped = acct.stopped
        self.sched.add(req)
        self.live.append(req)
        return req

    def pause(self, acct: Account, stopped: bool) -> None:
        """What Engine.pause does."""
        acct.stopped = stopped
        for req in self.live:
            if req.account is acct:
                req.stopped = stopped

    def abort(self, req: Request) -> None:
        req.finish("abort")
        self.release(req)

    def release(self, req: Request) -> None:
        """What Engine._release does for a request without a context."""
        self.sched.remove(req)
        if req.swapped is not None:
            self.swapper.drop(req.swapped)
            req.swapped = None
        self.blocks.free(req.seq.table)
        self.live.remove(req)

    def step(self) -> Batch:
        """One engine step: schedule, compute (write the KV), sample, charge, release."""
        batch = self.sched.schedule()
        for req in batch.refused:
            req.finish("abort", req.refusal)
            self.release(req)
        for req, n in batch.items:
            self.first_ran.setdefault(req.id, self.steps)
            table, tokens = req.seq.table, req.seq.tokens
            for pos in range(table.num_tokens - n, table.num_tokens):
                block, off = divmod(self.blocks.slot(table, pos), BS)
                self.caches[0][0][block, off, 0] = torch.tensor([tokens[pos], pos])
            self.blocks.commit_full_blocks(table, tokens)
        for req, n in batch.items:
            had = len(req.output_ids)
            if req.seq.num_pending == 0:
                req.append(len(req.seq.tokens) % 3, eos_ids=[])
            self.sched.charge(req, 0 if n == 1 and had > 0 else n, len(req.output_ids) - had)
            if req.finished:
                self.release(req)
        self.clock.t += DT
        self.steps += 1
        return batch

    def run(self, until, steps: int) -> int:
        """checked_step() until until() holds; the steps it took. Fails after `steps`."""
        for n in range(steps):
            if until():
                return n
            self.checked_step()
        assert until(), f"not done after {steps} steps"
        return steps

    def checked_step(self) -> Batch:
        """step(), asserting property (d) of the batch it ran."""
        runnable = self.sched.has_work()
        pending = {id(r): r.seq.num_pending for r in self.live}
        batch = self.step()
        reqs = [r for r, _ in batch.items]
        assert batch.num_tokens <= self.budget
        assert len(reqs) <= self.seats and len(self.sched.running) <= self.seats
        assert len({id(r) for r in reqs}) == len(reqs)
        for req, n in batch.items:
            assert not req.stopped, f"stopped request {req.id} is in the batch"
            assert 1 <= n <= pending[id(req)]
        assert not batch.refused, f"refused though it fits alone: {batch.refused[0].refusal}"
        assert batch.items or not runnable, "an empty step while there was runnable work"
        return batch

    def work(self) -> int:
        """Steps the live requests need one after another, none preempted (a bound's unit)."""
        return sum(-(-len(r.seq.tokens) // self.budget) + r.params.max_tokens
                   - len(r.output_ids) for r in self.live)

    def check(self, accounts) -> None:
        """Bookkeeping that must hold between steps (part of property a)."""
        s = self.sched
        running, waiting = {id(r) for r in s.running}, {id(r) for r in s.waiting}
        assert not running & waiting and running | waiting == {id(r) for r in self.live}
        for acct in accounts:
            mine = [r for r in self.live if r.account is acct]
            assert s.active.get(acct, 0) == len(mine)
            assert acct.kv == {"device": sum(len(r.seq.table.blocks) for r in mine),
                               "host": sum(len(r.swapped.blocks) for r in mine if r.swapped),
                               "disk": 0}, f"account {acct.pid}'s kv is wrong"
        holders = [0] * self.blocks.num_blocks
        for req in self.live:
            table = req.seq.table
            if id(req) in waiting:
                assert not table.blocks, "a waiting request holds device blocks"
            else:
                assert req.swapped is None
            for b in table.blocks:
                holders[b] += 1
            self._reads_back(self.caches, self.blocks, table, req.seq.tokens)
            if req.swapped is not None:
                self._reads_back(self.swapper.host_caches, self.swapper.host, req.swapped,
                                 req.seq.tokens)
        assert holders == self.blocks._refcount
        self.blocks.check_invariants()
        if self.swapper is not None:
            self.swapper.host.check_invariants()

    @staticmethod
    def _reads_back(caches, pool: BlockManager, table, tokens) -> None:
        if not table.num_tokens:
            return
        slots = torch.tensor([pool.slot(table, p) for p in range(table.num_tokens)])
        got = caches[0][0].view(-1, 2)[slots]
        want = torch.tensor([[tokens[p], p] for p in range(table.num_tokens)],
                            dtype=torch.float32)
        assert torch.equal(got, want), "a table's KV does not read back its own tokens"

    def assert_empty(self, accounts) -> None:
        """Property (a) once nothing is live."""
        assert not self.live and not self.sched.running and not self.sched.waiting
        assert not self.sched.active
        assert self.blocks.num_free_blocks == self.blocks.num_blocks
        self.blocks.check_invariants()
        if self.swapper is not None:
            host = self.swapper.host
            assert host.num_free_blocks == host.num_blocks
            host.check_invariants()
        for acct in accounts:
            assert acct.kv == {"device": 0, "host": 0, "disk": 0}


class MarkRunner:
    """The model's stand-in for a real Engine (engine.runner = MarkRunner(engine)): each
    computed token's (token, position) is written into its KV slot in every layer, K and
    V, and every slot a step attends to must hold its own token, so KV that paging, swap,
    disk or copy-on-write brought back wrong fails the step. The "model" predicts a token
    from the sequence's length and last tokens."""

    def __init__(self, engine):
        self.caches, self.bs = engine.kv_caches, engine.block_size
        self.vocab = engine.config.vocab_size

    def run(self, items):
        sampling = []
        for req, n in items:
            seq = req.seq
            end = seq.num_computed
            start = end - n
            blocks = seq.table.blocks
            slots = torch.tensor([blocks[p // self.bs] * self.bs + p % self.bs
                                  for p in range(end)])
            want = torch.tensor([[seq.tokens[p], p] for p in range(end)], dtype=torch.float32)
            for layer in self.caches:
                for cache in layer:
                    flat = cache.view(-1, *cache.shape[2:])    # [slots, Hkv, D]
                    flat[slots[start:], 0, :2] = want[start:]
                    assert torch.equal(flat[slots, 0, :2], want), \
                        f"request {req.id}: its KV does not hold its tokens"
            if end == len(seq.tokens):
                sampling.append(req)
        if not sampling:
            return sampling, None
        logits = torch.zeros(len(sampling), self.vocab)
        for i, req in enumerate(sampling):
            logits[i, (len(req.seq.tokens) * 7 + sum(req.seq.tokens[-3:])) % self.vocab] = 1
        return sampling, logits
