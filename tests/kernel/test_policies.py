"""The scheduler (kernel/scheduler.py) under every policy (kernel/policy.py), without a
model (tests/kernel/stepper.py steps it). The same properties hold for every policy:
  (a) no KV leak: when all is finished or aborted, both pools are free, their invariants
      hold, and every account's kv is back to 0 (and between steps it counts its blocks,
      and every table reads back its own tokens);
  (b) liveness: every admitted request finishes within a bound of steps once adds stop;
  (c) no starvation: a runnable request finishes within a bound of steps while another
      process's flood keeps arriving;
  (d) a batch stays within the token budget and max_num_seqs, never holds a stopped
      request, and is never empty while there is runnable work.
"""
from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (RuleBasedStateMachine, initialize, invariant, precondition,
                                 rule, run_state_machine_as_test)

from llmos.kernel import tunables
from llmos.kernel.account import Account
from llmos.kernel.policy import POLICIES
from llmos.syscalls.types import Limits
from tests.kernel.stepper import BS, DT, Stepper

MAX_PROMPT, MAX_NEW = 24, 12       # so a request needs at most 9 blocks: every pool holds one
NEED = -(-(MAX_PROMPT + MAX_NEW) // BS)


# ---- (a), (b), (d): random workloads ----------------------------------------------

# Prompts of a few kinds and lengths, so that some share cached prefixes.
prompts = st.builds(lambda kind, n: [(kind + i // 6) % 3 for i in range(n)],
                    st.integers(0, 2), st.integers(1, MAX_PROMPT))


class PolicyMachine(RuleBasedStateMachine):
    """Random adds, aborts, steps and SIGSTOP/SIGCONT from a few accounts of different
    nice (one maybe under a kv_blocks limit) over small pools, so preemption, swap and
    recompute all happen."""
    policy = "fifo"
    MAX_LIVE = 12

    @initialize(num_blocks=st.integers(NEED, NEED + 6), host=st.sampled_from([0, 3, 16]),
                seats=st.integers(1, 5), budget=st.integers(4, 24),
                nices=st.lists(st.sampled_from([-5, 0, 5, 10]), min_size=2, max_size=4),
                limit=st.one_of(st.none(), st.integers(NEED, NEED + 3)))
    def setup(self, num_blocks, host, seats, budget, nices, limit):
        self.sim = Stepper(self.policy, num_blocks, host, seats, budget)
        self.accounts = [Account(pid=i + 1, nice=n) for i, n in enumerate(nices)]
        if limit is not None:
            self.accounts[0].limits = Limits(kv_blocks=limit)

    def _acct(self, who: int) -> Account:
        return self.accounts[who % len(self.accounts)]

    @precondition(lambda self: hasattr(self, "sim") and len(self.sim.live) < self.MAX_LIVE)
    @rule(burst=st.lists(st.tuples(st.integers(0, 3), prompts, st.integers(1, MAX_NEW)),
                         min_size=1, max_size=4))
    def add(self, burst):
        for who, prompt, max_tokens in burst:
            self.sim.add(self._acct(who), prompt, max_tokens)

    @precondition(lambda self: hasattr(self, "sim") and self.sim.live)
    @rule(k=st.integers(1, 4))
    def step(self, k):
        for _ in range(k):
            self.sim.checked_step()

    @precondition(lambda self: hasattr(self, "sim") and self.sim.live)
    @rule(data=st.data())
    def abort(self, data):
        self.sim.abort(data.draw(st.sampled_from(self.sim.live)))

    @precondition(lambda self: hasattr(self, "sim"))
    @rule(who=st.integers(0, 3), stopped=st.booleans())
    def pause(self, who, stopped):
        self.sim.pause(self._acct(who), stopped)

    @invariant()
    def consistent(self):
        if hasattr(self, "sim"):
            self.sim.check(self.accounts)

    def teardown(self):
        if not hasattr(self, "sim"):
            return
        sim = self.sim
        for acct in self.accounts:
            sim.pause(acct, False)
        # Preemption may recompute a request a few times, and aging may reorder: 4x the
        # work done one request after another is far more than any policy should need.
        bound = 4 * sim.work() + 10
        for _ in range(bound):
            if not sim.live:
                break
            sim.checked_step()
            sim.check(self.accounts)
        assert not sim.live, f"{len(sim.live)} requests still live after {bound} steps"
        sim.assert_empty(self.accounts)


MACHINE_SETTINGS = settings(max_examples=60, stateful_step_count=30, deadline=None,
                            suppress_health_check=[HealthCheck.too_slow])


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_scheduler_properties_hold_under_every_policy(policy):
    machine = type(f"{policy.title()}Machine", (PolicyMachine,), {"policy": policy})
    run_state_machine_as_test(machine, settings=MACHINE_SETTINGS)


# ---- (c): no starvation under a flood ----------------------------------------------

FLOOD_PROMPT, FLOOD_NEW = 8, 4
VICTIM_PROMPT, VICTIM_NEW = 12, 8


def horizon(policy: str, nice_v: int, nice_f: int) -> int:
    """Steps after which the victim outranks every flood request that arrives later."""
    if policy == "priority":            # aging lifts it a nice level every AGING_S
        levels = max(0, nice_v - nice_f) + 1
        return int(levels * tunables.AGING_S / DT) + 1
    if policy == "fair":                # the flood's counter passes the victim's: it grows by
        weighted = (VICTIM_PROMPT * tunables.FAIR_PROMPT_WEIGHT     # >= 1 token per step
                    + VICTIM_NEW * tunables.FAIR_OUTPUT_WEIGHT) * 1.25 ** nice_v
        return int((weighted + tunables.FAIR_MARGIN) * 1.25 ** -nice_f) + 2
    return 1                            # fifo: it is older; las: it has had no service


@pytest.mark.parametrize("policy", sorted(POLICIES))
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(nice_v=st.integers(-5, 10), nice_f=st.integers(0, 5), per_step=st.integers(1, 2),
       seats=st.integers(1, 4), num_blocks=st.integers(NEED, 2 * NEED),
       head=st.integers(0, 10), host=st.sampled_from([0, 16]))
def test_a_flood_cannot_starve_a_runnable_request(policy, nice_v, nice_f, per_step, seats,
                                                  num_blocks, head, host):
    """A flood arrives faster than it is served and never stops; the victim's request,
    arriving behind `head` steps of it, still finishes within a bound: the work queued
    ahead of it plus what arrives before it outranks the newcomers, one after another."""
    sim = Stepper(policy, num_blocks, host, seats, budget=16)
    flood, victim = Account(pid=1, nice=nice_f), Account(pid=2, nice=nice_v)

    def flood_in():
        for _ in range(per_step):
            sim.add(flood, [sim.steps % 3] * FLOOD_PROMPT, FLOOD_NEW)

    for _ in range(head):
        flood_in()
        sim.checked_step()
    req = sim.add(victim, [1] * VICTIM_PROMPT, VICTIM_NEW)
    h = horizon(policy, nice_v, nice_f)
    per_flood = -(-FLOOD_PROMPT // 16) + FLOOD_NEW
    bound = 2 * (sim.work() + h * per_step * per_flood) + h + 10
    for _ in range(bound):
        if req.finished:
            break
        flood_in()
        sim.checked_step()
    assert req.finished and req.finish_reason == "length", \
        f"the victim waited {bound} steps behind {len(sim.live)} flood requests"
    for r in list(sim.live):
        sim.abort(r)
    sim.assert_empty([flood, victim])
