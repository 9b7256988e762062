"""What each policy (kernel/policy.py) promises, step by step on a fake clock.

The scheduler is stepped without a model (tests/kernel/stepper.py); a step is DT seconds.
fifo runs calls in arrival order; priority by nice, aged so that a niced call still runs;
fair divides service by nice weight and gives no credit for idling; las runs a short
program before a long one's calls; and under the last three neither a flood of calls
nor a running hog delays another process's call by more than a few steps.
"""
from __future__ import annotations

import pytest

from llmos.kernel import tunables
from llmos.kernel.account import Account, nice_weight
from tests.kernel.stepper import DT, Stepper

BIG = 4096          # blocks: room for everything, where memory is not the point


def hold(s: Stepper, acct: Account, backlog: int, prompt: int = 8, new: int = 8) -> None:
    """Keep acct saturating: at least `backlog` of its requests live."""
    while sum(r.account is acct for r in s.live) < backlog:
        s.add(acct, [acct.pid % 3] * prompt, new)


# ---- fifo -------------------------------------------------------------------------

def test_fifo_runs_calls_in_arrival_order_whatever_nice_and_service():
    s = Stepper("fifo", BIG, seats=1, budget=64)
    accounts = [Account(pid=1, nice=10), Account(pid=2, nice=-5), Account(pid=3, nice=0)]
    accounts[0].generated_tokens = accounts[0].root.program_service = 10_000
    reqs = [s.add(accounts[i % 3], [i % 3] * 4, 2) for i in range(9)]
    s.run(lambda: not s.live, 100)
    order = sorted(reqs, key=lambda r: s.first_ran[r.id])
    assert order == reqs


# ---- priority ---------------------------------------------------------------------

def test_priority_runs_nice_minus_5_before_nice_5_that_came_first():
    s = Stepper("priority", BIG, seats=1, budget=64)
    hog = s.add(Account(pid=1), [0] * 4, 4)
    s.checked_step()                                    # the seat is taken
    low = s.add(Account(pid=2, nice=5), [1] * 4, 2)
    high = s.add(Account(pid=3, nice=-5), [2] * 4, 2)
    s.run(lambda: not s.live, 100)
    assert s.first_ran[hog.id] < s.first_ran[high.id] < s.first_ran[low.id]


def test_priority_aging_lets_a_niced_call_run_through_a_stream():
    """One seat; a nice -5 call arrives every step and takes one step. The nice 5 call
    waiting since the start outranks a fresh one once it has waited 10 levels of AGING_S:
    it runs then, not before and not much after."""
    s = Stepper("priority", BIG, seats=1, budget=64)
    stream = Account(pid=1, nice=-5)
    niced = s.add(Account(pid=2, nice=5), [1] * 4, 1)
    due = 10 * tunables.AGING_S / DT                     # steps to climb 10 nice levels
    for _ in range(int(2 * due)):
        if niced.finished:
            break
        s.add(stream, [0] * 4, 1)
        s.checked_step()
    assert niced.finished, "aging did not let the nice 5 call run"
    assert due - 2 <= s.first_ran[niced.id] <= due + 2


# ---- fair ---------------------------------------------------------------------------

def test_fair_divides_service_by_nice_weight():
    """Two saturating processes at nice 0 and nice 5: service in the ratio of their
    weights (1.25^5 = 3.05), within 15%."""
    s = Stepper("fair", BIG, seats=4, budget=32)
    a, b = Account(pid=1, nice=0), Account(pid=2, nice=5)
    for _ in range(1500):
        hold(s, a, 8)
        hold(s, b, 8)
        s.checked_step()
    want = nice_weight(0) / nice_weight(5)
    got = a.service / b.service
    assert abs(got / want - 1) < 0.15, f"service ratio {got:.2f}, weights {want:.2f}"


def test_fair_gives_no_credit_for_idling():
    """A process that becomes backlogged starts at the smallest counter of the active
    ones (not at its own 0), so it gets its share from then on, not all of the engine."""
    s = Stepper("fair", BIG, seats=6, budget=64)
    a, b, late = Account(pid=1), Account(pid=2), Account(pid=3)
    for _ in range(200):
        hold(s, a, 6)
        hold(s, b, 6)
        s.checked_step()
    floor = min(a.vtc, b.vtc)
    assert floor > 1000
    s.add(late, [2] * 8, 8)
    assert late.vtc == floor
    before = {x: x.service for x in (a, b, late)}
    for _ in range(200):
        hold(s, a, 6)
        hold(s, b, 6)
        hold(s, late, 6)
        s.checked_step()
    got = {x: x.service - before[x] for x in before}
    share = got[late] / sum(got.values())
    assert 0.25 < share < 0.42, f"the late process got {share:.0%} of the service"
    # One that was ahead keeps its counter when it comes back: no reset downwards.
    ahead = Account(pid=4)
    ahead.vtc = 10 * max(a.vtc, b.vtc)
    s.add(ahead, [1] * 4, 1)
    assert ahead.vtc == 10 * max(a.vtc, b.vtc)


# ---- las ----------------------------------------------------------------------------

def test_las_runs_a_short_program_before_a_long_programs_calls():
    """A program that has had much service queues calls; a new program's call, arriving
    after them, runs first. A child of the long program ranks with its program."""
    s = Stepper("las", BIG, seats=1, budget=64)
    long = Account(pid=1)
    child = Account(pid=2, program=long)
    for i in range(4):                                  # 4 quanta of service, no cache hits
        s.add(long, list(range(10 * i, 10 * i + 32)), tunables.LAS_QUANTUM - 32)
    s.run(lambda: not s.live, 1000)
    assert long.program_service >= 4 * tunables.LAS_QUANTUM
    hog = s.add(long, [0] * 4, 4)
    s.checked_step()                                    # the seat is taken
    queued = [s.add(long, [0] * 4, 2) for _ in range(3)]
    from_child = s.add(child, [1] * 4, 2)
    short = s.add(Account(pid=3), [2] * 4, 2)
    s.run(lambda: not s.live, 100)
    assert s.first_ran[hog.id] < s.first_ran[short.id]
    assert s.first_ran[short.id] < min(s.first_ran[r.id] for r in queued + [from_child])
    assert s.first_ran[from_child.id] > max(s.first_ran[r.id] for r in queued)


# ---- a flood and a hog --------------------------------------------------------------

@pytest.mark.parametrize("policy, flood_nice, most", [
    ("fair", 0, 2), ("las", 0, 2), ("priority", 5, 2), ("fifo", 0, None)])
def test_a_flood_of_300_calls_does_not_delay_another_process(policy, flood_nice, most):
    """300 calls wait from one process (under priority a niced one: at equal nice,
    priority is arrival order); another's single call, arriving a step later, runs
    within `most` steps, where under fifo it waits for the flood's prefills."""
    s = Stepper(policy, BIG, seats=512, budget=256)
    flood = Account(pid=1, nice=flood_nice)
    for i in range(300):
        s.add(flood, [i % 3] * 16, 16)
    s.checked_step()
    call = s.add(Account(pid=2), [1] * 16, 4)
    waited = s.run(lambda: call.id in s.first_ran, 200)
    if most is None:
        assert waited > 10, f"fifo ran the late call after {waited} steps"
    else:
        assert waited <= most, f"the call waited {waited} steps behind the flood"


@pytest.mark.parametrize("policy", ["priority", "las", "fair", "fifo"])
def test_a_call_that_outranks_a_running_hog_takes_its_seat(policy):
    """Every seat is held by a long-running call of a process that ranks far worse (nice
    10; under las with a long program behind it). A policy that displaces preempts one
    for the newcomer within a few steps (fair: once the hog's counter is FAIR_MARGIN
    ahead); fifo never displaces: the newcomer waits for a seat."""
    s = Stepper(policy, BIG, seats=2, budget=64)
    hog = Account(pid=1, nice=10)
    hog.program_service = 64 * tunables.LAS_QUANTUM
    hogs = [s.add(hog, [0] * 8, 200) for _ in range(2)]
    s.run(lambda: all(h.id in s.first_ran for h in hogs), 5)
    call = s.add(Account(pid=2, nice=0), [1] * 8, 4)
    if policy == "fifo":
        for _ in range(50):
            s.checked_step()
        assert call.id not in s.first_ran
        return
    # fair: the hogs' counter grows by 2 decodes x FAIR_OUTPUT_WEIGHT, weighted, a step.
    per_step = 2 * tunables.FAIR_OUTPUT_WEIGHT * nice_weight(0) / nice_weight(10)
    most = int(tunables.FAIR_MARGIN / per_step) + 2 if policy == "fair" else 1
    waited = s.run(lambda: call.id in s.first_ran, 100)
    assert waited <= most, f"the call waited {waited} steps for a seat"
    assert s.sched.num_preemptions >= 1
    s.run(lambda: call.finished, 20)
