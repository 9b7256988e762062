"""KV paging at random: a hypothesis state machine over a real Engine (scheduler, pager,
device and host pools, disk tier, accounts) whose model is a MarkRunner, so that each step
checks that every request attends to its own tokens' KV, wherever that KV has been."""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from llmos.kernel import KVOutOfMemory
from llmos.kernel.account import Account
from llmos.kernel.blocks import BlockTable
from llmos.kernel.policy import POLICIES
from llmos.kernel.vm import DiskImage
from llmos.syscalls.types import Limits
from tests.kernel.engines import BLOCK, fake_clock, kv_of, modelless, tokens


class PagingMachine(RuleBasedStateMachine):
    """Contexts and requests of three processes (one under a kv_blocks limit) over a
    small device pool, with or without host swap and a disk tier, under every policy and
    TTL: turns, one-shot calls, forks, frees, aborts, SIGSTOP/SIGCONT, steps and time.
    Every account's kv counts its blocks, the pools and the disk tier agree with the
    tables and images, every step attends to the right KV (MarkRunner), no request is
    refused that add_request took (it fits the pool and its limit alone; without a
    pager, idle contexts may leave too little), and in the end every request finishes
    and every block and file is given back."""

    MAX_LIVE, MAX_TOKENS = 6, 400

    @initialize(num_blocks=st.integers(5, 10), host=st.sampled_from([0, 4, 16]),
                disk=st.sampled_from([0, 6, 64]), ttl=st.sampled_from([0.0, 2.0, 1000.0]),
                policy=st.sampled_from(sorted(POLICIES)), budget=st.sampled_from([32, 256]),
                limit=st.integers(4, 8), paging=st.booleans())
    def setup(self, num_blocks, host, disk, ttl, policy, budget, limit, paging):
        self.dir = Path(tempfile.mkdtemp(prefix="llmos-kv-"))
        self.engine = modelless(num_blocks=num_blocks, num_swap_blocks=host, kv_ttl=ttl,
                                kv_disk_blocks=disk, kv_disk_dir=self.dir, policy=policy,
                                max_num_seqs=4, max_num_batched_tokens=budget,
                                kv_paging=paging)
        self.paging = paging
        self.clock = fake_clock(self.engine)
        self.accounts = [Account(pid=1), Account(pid=2, nice=5),
                         Account(pid=3, limits=Limits(kv_blocks=limit))]
        self.reqs = []
        self.seed = 0

    def ready(self) -> bool:
        return hasattr(self, "engine")

    def _tokens(self, n: int) -> list[int]:
        self.seed += 1
        return tokens(n, self.seed % 5)         # a few kinds: some prefixes are shared

    def _add(self, acct: Account, prompt: list[int], new: int, ctx: int | None = None):
        """add_request; KVOutOfMemory only for a request that cannot fit."""
        held = len(self.engine.contexts[ctx].seq.tokens) if ctx is not None else 0
        if held + len(prompt) + new > self.MAX_TOKENS:
            return
        need = -(-(held + len(prompt) + new) // BLOCK)
        limit = acct.limits.kv_blocks
        try:
            req = self.engine.add_request(prompt, context=ctx, max_tokens=new,
                                          ignore_eos=True, account=acct)
        except KVOutOfMemory:
            assert need > self.engine.num_blocks or (limit is not None and need > limit)
            return
        self.reqs.append(req)

    def _idle(self) -> list[int]:
        return [c for c, ctx in self.engine.contexts.items() if ctx.busy is None]

    @precondition(lambda self: self.ready() and len(self.engine.contexts) < 6)
    @rule(who=st.integers(0, 2), n=st.integers(0, 60))
    def create(self, who, n):
        self.engine.context_create(self._tokens(n) if n else None,
                                   account=self.accounts[who])

    @precondition(lambda self: self.ready() and self._idle()
                  and len(self.engine.requests) < self.MAX_LIVE)
    @rule(data=st.data(), n=st.integers(0, 32), new=st.integers(1, 12))
    def turn(self, data, n, new):
        cid = data.draw(st.sampled_from(self._idle()))
        ctx = self.engine.contexts[cid]
        if n == 0 and not ctx.seq.tokens:
            n = 1
        self._add(ctx.account, self._tokens(n), new, cid)

    @precondition(lambda self: self.ready() and len(self.engine.requests) < self.MAX_LIVE)
    @rule(who=st.integers(0, 2), n=st.integers(1, 40), new=st.integers(1, 12))
    def oneshot(self, who, n, new):
        self._add(self.accounts[who], self._tokens(n), new)

    @precondition(lambda self: self.ready() and self._idle() and len(self.engine.contexts) < 6)
    @rule(data=st.data(), who=st.integers(0, 2))
    def fork(self, data, who):
        self.engine.context_fork(data.draw(st.sampled_from(self._idle())),
                                 account=self.accounts[who])

    @precondition(lambda self: self.ready())
    @rule(data=st.data(), what=st.sampled_from(["free", "abort", "stop", "cont"]),
          who=st.integers(0, 2))
    def disturb(self, data, what, who):
        """The rarer events, as one rule: free a context, abort a request, SIGSTOP or
        SIGCONT a process."""
        engine = self.engine
        if what == "free" and engine.contexts:
            engine.context_free(data.draw(st.sampled_from(sorted(engine.contexts))))
        elif what == "abort" and engine.requests:        # by place: ids differ per run
            ids = sorted(engine.requests)
            engine.abort(ids[data.draw(st.integers(0, len(ids) - 1))])
        elif what in ("stop", "cont"):
            engine.pause(self.accounts[who], what == "stop")

    @precondition(lambda self: self.ready() and self.engine.requests)
    @rule(k=st.integers(1, 40))
    def step(self, k):
        for _ in range(k):
            if not self.engine.has_work():
                break
            self.engine.step()
            self._check_finished()

    @precondition(lambda self: self.ready())
    @rule(dt=st.sampled_from([0.5, 3.0]))
    def tick(self, dt):
        self.clock.t += dt

    def _check_finished(self):
        for req in [r for r in self.reqs if r.finished]:
            self.reqs.remove(req)
            if req.error is not None:   # without a pager, idle contexts keep their KV
                assert not self.paging and req.error.startswith(
                    ("out of KV memory", "kv_blocks limit")), \
                    f"refused, though it fits alone: {req.error}"

    @invariant()
    def consistent(self):
        if not self.ready():
            return
        engine = self.engine
        for acct in self.accounts:
            assert acct.kv == kv_of(engine, acct), f"account {acct.pid}"
        engine.blocks.check_invariants()
        tables = [c.seq.table for c in engine.contexts.values()]
        tables += [r.seq.table for r in engine.requests.values() if r.context is None]
        holders = [0] * engine.num_blocks
        for t in tables:
            for b in t.blocks:
                holders[b] += 1
        assert holders == engine.blocks._refcount
        paged = [c.paged for c in engine.contexts.values()]
        paged += [r.swapped for r in engine.requests.values()]
        for c in engine.contexts.values():
            assert c.paged is None or not c.seq.table.blocks, "a context both paged and resident"
        if engine.swapper is not None:
            host = engine.swapper.host
            host.check_invariants()
            # a fork of a context paged out to host swap shares its host blocks
            host_holders = [0] * host.num_blocks
            for p in paged:
                if isinstance(p, BlockTable):
                    for b in p.blocks:
                        host_holders[b] += 1
            assert host_holders == host._refcount
            assert host.num_blocks - host.num_free_blocks == sum(h > 0 for h in host_holders)
        images = [p for p in paged if isinstance(p, DiskImage)]
        assert all(p.path.exists() for p in images)
        assert len(list(self.dir.glob("*.kv"))) == len(images)
        if engine.pager.disk is not None:
            assert engine.pager.disk.used == sum(p.num_blocks for p in images)

    def teardown(self):
        if not self.ready():
            return
        engine = self.engine
        try:
            for acct in self.accounts:
                engine.pause(acct, False)
            bound = 4 * sum(len(r.seq.tokens) // 32 + r.params.max_tokens
                            for r in engine.requests.values()) + 20
            for _ in range(bound):
                if not engine.requests:
                    break
                assert engine.has_work()
                engine.step()
                self._check_finished()
                self.consistent()
            assert not engine.requests, f"{len(engine.requests)} requests live after {bound} steps"
            for cid in list(engine.contexts):
                engine.context_free(cid)
            for acct in self.accounts:
                assert acct.kv == {"device": 0, "host": 0, "disk": 0}
            assert engine.blocks.num_free_blocks == engine.num_blocks
            engine.blocks.check_invariants()
            if engine.swapper is not None:
                assert engine.swapper.host.num_free_blocks == engine.swapper.host.num_blocks
            assert not list(self.dir.glob("*.kv"))
            assert engine.pager.disk is None or engine.pager.disk.used == 0
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)


PagingMachine.TestCase.settings = settings(
    max_examples=80, stateful_step_count=50, deadline=None,
    suppress_health_check=[HealthCheck.too_slow])
TestPaging = PagingMachine.TestCase
