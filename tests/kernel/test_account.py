"""The limits the engine enforces per process (kernel/account.py, kernel/scheduler.py), on
the embedded tiny model: kv_blocks (ENOMEM for a call that alone needs more; otherwise the
process pages out its own contexts, never another's) and tokens_per_s (a token bucket that
slows only the process it limits, and never makes the engine spin)."""
from __future__ import annotations

import pytest

from llmos.kernel import KVOutOfMemory
from llmos.kernel.account import Account
from llmos.syscalls.errors import ENOMEM
from llmos.syscalls.types import Limits
from tests.kernel.engines import (fake_clock, filled, kv_of, paged_out, resident, run, tiny,
                                  tokens)

STEP_S = 0.01                   # seconds of the fake clock a step takes


# ---- kv_blocks -------------------------------------------------------------------------

def test_a_request_over_its_kv_blocks_limit_is_refused_with_enomem():
    engine = tiny(num_blocks=32)
    acct = Account(pid=1, limits=Limits(kv_blocks=4))
    with pytest.raises(KVOutOfMemory, match="kv_blocks") as err:
        engine.add_request(tokens(60, 1), max_tokens=10, account=acct)     # 5 blocks
    assert err.value.code == ENOMEM
    ok = engine.add_request(tokens(50, 1), max_tokens=10, ignore_eos=True, account=acct)
    run(engine, lambda: ok.finished)
    assert ok.finish_reason == "length"


def test_a_process_over_its_limit_pages_out_its_own_contexts_only():
    """The pool has room; the process's own limit does not. Its own idle contexts page
    out, even within the TTL, while another's older idle one stays where it is."""
    engine = tiny(num_blocks=32, num_swap_blocks=16, kv_ttl=5.0)
    clock = fake_clock(engine)
    other = Account(pid=2)
    theirs = filled(engine, other, seed=9)
    clock.t += 10                               # past the TTL, least recently used
    capped = Account(pid=1, limits=Limits(kv_blocks=7))
    mine = [filled(engine, capped, seed=i) for i in range(2)]      # 6 blocks held
    req = engine.add_request(tokens(40, 3), max_tokens=4, ignore_eos=True, account=capped)
    steps = 0
    while not req.finished and steps < 200:
        engine.step()
        steps += 1
        assert capped.kv["device"] <= 7
    assert req.finish_reason == "length"
    assert paged_out(engine, mine[0]) and resident(engine, theirs)
    assert capped.kv == kv_of(engine, capped)
    # The other process is untouched: its next turn computes only its new tokens.
    r = engine.add_request([5, 6], context=theirs, max_tokens=2, ignore_eos=True,
                           account=other)
    run(engine, lambda: r.finished)
    assert r.usage.computed_tokens == 1 + 2             # its last reply token + the new ones


@pytest.mark.parametrize("swap_blocks", [0, 16], ids=["recompute", "swap"])
def test_calls_waiting_on_resident_contexts_do_not_lock_a_process_s_limit(swap_blocks):
    """Two contexts hold a process's whole kv_blocks limit, and a call on each waits for
    one more block: as for the pool, their own KV must yield; one was refused ENOMEM
    ("holds 8 blocks in contexts that cannot be paged out") though each fits alone."""
    engine = tiny(num_blocks=32, num_swap_blocks=swap_blocks, kv_ttl=0.0)
    acct = Account(pid=1, limits=Limits(kv_blocks=8))
    ctxs = [filled(engine, acct, seed=i, n=61) for i in range(2)]     # 64 computed: 4 blocks
    assert acct.kv["device"] == 8
    reqs = [engine.add_request([], context=c, max_tokens=2, ignore_eos=True, account=acct)
            for c in ctxs]
    run(engine, lambda: all(r.finished for r in reqs))
    assert [r.error for r in reqs] == [None, None]


def test_a_copy_on_write_does_not_count_against_the_limit():
    """A process's fork of another's context shares its partial last block; its next token
    copies that block (the copy replaces the shared one in its table). Its limit equals
    the blocks the call needs: it was refused, the copy counted as one block more."""
    engine = tiny(num_blocks=32)
    owner, forker = Account(pid=1), Account(pid=2, limits=Limits(kv_blocks=3))
    parent = filled(engine, owner, seed=1)                 # 44 tokens, 43 computed: 3 blocks
    child = engine.context_fork(parent, account=forker)
    assert forker.kv["device"] == 3
    req = engine.add_request([], context=child, max_tokens=1, ignore_eos=True,
                             account=forker)                # 45 tokens: 3 blocks
    run(engine, lambda: req.finished)
    assert req.error is None and forker.kv == kv_of(engine, forker)
    assert forker.kv["device"] == 3


def test_a_growing_call_takes_its_limit_back_from_its_own_waiting_call():
    """One seat: a process's call on one context runs and grows past its kv_blocks limit
    while its call on another context waits for the seat, holding that context's KV. The
    waiting call's KV must yield; the running one was refused ("this request alone needs
    more") though it alone needs 5 of the 8 blocks."""
    engine = tiny(num_blocks=32, kv_ttl=0.0, max_num_seqs=1)
    acct = Account(pid=1, limits=Limits(kv_blocks=8))
    waiting_ctx = filled(engine, acct, seed=1, n=61)                  # 4 blocks
    growing_ctx = filled(engine, acct, seed=2, n=40)                  # 3 blocks
    growing = engine.add_request([], context=growing_ctx, max_tokens=30, ignore_eos=True,
                                 account=acct)                        # to 73 tokens: 5 blocks
    engine.step()
    waiting = engine.add_request([], context=waiting_ctx, max_tokens=2, ignore_eos=True,
                                 account=acct)
    run(engine, lambda: growing.finished and waiting.finished)
    assert (growing.error, waiting.error) == (None, None)
    assert acct.kv == kv_of(engine, acct)


# ---- tokens_per_s ----------------------------------------------------------------------

def test_tokens_per_s_throttles_only_the_limited_process():
    """On the engine's clock (fake: STEP_S a step, and when idle, the wait wake_in()
    names, as the engine loop waits): n tokens at `rate`, with a burst of `rate` saved
    up, span at least (n - rate) / rate seconds, and not much more; the unlimited call
    beside them takes one step a token; and while only throttled work is left the engine
    has no work (it must not spin) and says when it will."""
    rate, n, m = 20.0, 50, 50                   # 20 at once, then 20/s: >= 1.5 s for 50
    engine = tiny(num_blocks=32)
    clock = fake_clock(engine)
    slow = Account(pid=1, limits=Limits(tokens_per_s=rate))
    fast = Account(pid=2)
    start = clock.t
    limited = engine.add_request([3, 4, 5], max_tokens=n, ignore_eos=True, account=slow)
    free = engine.add_request([3, 4, 5], max_tokens=m, ignore_eos=True, account=fast)
    idle_waits, free_done_at, span = [], None, None
    for _ in range(10 * (n + m)):
        if limited.finished and free.finished:
            break
        if engine.has_work():
            engine.step()
            clock.t += STEP_S
            if free.finished and free_done_at is None:
                free_done_at = engine.stats["steps"]
            if limited.finished and span is None:
                span = clock.t - start
        else:
            wait = engine.wake_in()
            assert wait is not None and wait > 0, "idle with no throttled work to wait for"
            idle_waits.append(wait)
            clock.t += max(wait, 1e-3)      # a timer's resolution: the bucket's arithmetic
                                            # may leave it a hair under one token
    assert limited.finished and len(limited.output_ids) == n
    least = (n - rate) / rate
    assert least <= span <= least + 0.2, f"{n} tokens at {rate}/s took {span:.2f} s"
    assert free_done_at is not None and free_done_at <= m + 2   # a step a token: not slowed
    assert idle_waits, "the engine never fell idle while only throttled work was left"
    assert not engine.has_work() and engine.wake_in() is None
