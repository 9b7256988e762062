"""KV virtual memory (kernel/vm.py) on the embedded tiny model.

Idle contexts page out of a device pool a quarter the size of what they hold, to host swap,
to disk, or nowhere (recomputed), and every turn's tokens are those of an engine that kept
everything resident. The TTL keeps a just-used context resident unless nothing else could
run, a stopped process's contexts go first, and each account's kv counts where its blocks
are. Time is a fake clock wherever the order of events is the point. The same at random,
without a model: test_paging.py.
"""
from __future__ import annotations

import pytest

from llmos.kernel import Engine
from llmos.kernel.account import Account
from llmos.kernel.vm import DiskImage
from tests.kernel.engines import (fake_clock, filled, kv_of, paged_out, resident, run, tiny,
                                  tokens, turn)


# ---- the same tokens, whatever the pool ------------------------------------------------

CONTEXTS, TURNS, PROMPT, NEW = 8, 3, 16, 4     # 8 contexts of 60 tokens: 32 blocks in all
AT_ONCE = 4                                    # contexts running at once: 16 blocks at most


def converse(engine: Engine, watch=None) -> dict:
    """CONTEXTS conversations of TURNS turns from two accounts, AT_ONCE contexts at a
    time; {(turn, context index): output ids}. watch(engine, accounts) runs after each
    group."""
    accounts = [Account(pid=1), Account(pid=2, nice=5)]
    ctxs = [engine.context_create(account=accounts[i % 2]) for i in range(CONTEXTS)]
    out = {}
    for t in range(TURNS):
        for group in (range(i, i + AT_ONCE) for i in range(0, CONTEXTS, AT_ONCE)):
            reqs = {i: engine.add_request(tokens(PROMPT, 100 * t + i), context=ctxs[i],
                                          max_tokens=NEW, ignore_eos=True,
                                          account=accounts[i % 2]) for i in group}
            run(engine, lambda: all(r.finished for r in reqs.values()))
            for i, req in reqs.items():
                assert req.finish_reason == "length", req.error
                out[t, i] = req.output_ids
            if watch:
                watch(engine, accounts)
    for ctx in ctxs:
        engine.context_free(ctx)
    for acct in accounts:
        assert acct.kv == {"device": 0, "host": 0, "disk": 0}
    assert engine.blocks.num_free_blocks == engine.num_blocks
    engine.blocks.check_invariants()
    return out


@pytest.fixture(scope="module")
def resident_outputs():
    engine = tiny(num_blocks=64, kv_ttl=0.0)
    out = converse(engine)
    assert engine.pager.paged_out == 0 and engine.scheduler.num_preemptions == 0
    return out


@pytest.mark.parametrize("options", [
    dict(num_swap_blocks=64),                               # host swap holds it all
    dict(num_swap_blocks=0),                                # nowhere: recomputed
    dict(num_swap_blocks=64, kv_ttl=1000.0),                # all within the TTL: forced
], ids=["swap", "recompute", "ttl-forced"])
def test_paged_contexts_give_the_tokens_of_resident_ones(resident_outputs, options):
    options.setdefault("kv_ttl", 0.0)
    engine = tiny(num_blocks=8, **options)
    seen = []

    def watch(engine, accounts):
        for acct in accounts:
            assert acct.kv == kv_of(engine, acct)
        seen.append(engine.pager.paged_out)
    assert converse(engine, watch) == resident_outputs
    assert seen[-1] >= CONTEXTS, "contexts were not paged out"
    if engine.swapper is not None:
        assert engine.swapper.host.num_free_blocks == engine.swapper.host.num_blocks


def test_paged_contexts_spill_from_host_to_disk_and_come_back(resident_outputs, tmp_path):
    engine = tiny(num_blocks=8, num_swap_blocks=6, kv_ttl=0.0, kv_disk_blocks=64,
                  kv_disk_dir=tmp_path)
    disk = engine.pager.disk
    peak = {"blocks": 0, "files": 0}

    def watch(engine, accounts):
        for acct in accounts:
            assert acct.kv == kv_of(engine, acct)
        assert disk.used == sum(a.kv["disk"] for a in accounts)
        assert len(list(tmp_path.glob("*.kv"))) == sum(
            isinstance(c.paged, DiskImage) for c in engine.contexts.values())
        peak["blocks"] = max(peak["blocks"], disk.used)
        peak["files"] = max(peak["files"], len(list(tmp_path.glob("*.kv"))))
    assert converse(engine, watch) == resident_outputs
    assert peak["blocks"] > 0 and peak["files"] > 0, "the disk tier was never used"
    assert disk.used == 0 and not list(tmp_path.glob("*.kv"))    # context_free deleted them


# ---- who pages out first, and when ------------------------------------------------------

def test_the_ttl_keeps_a_just_used_context_resident():
    engine = tiny(num_blocks=8, num_swap_blocks=16, kv_ttl=5.0)
    clock = fake_clock(engine)
    acct = Account(pid=1)
    old = filled(engine, acct, seed=1)
    clock.t += 10
    recent = filled(engine, acct, seed=2)
    clock.t += 1                                # old: idle 11 s; recent: 1 s, within the TTL
    assert engine.blocks.num_free_blocks == 2
    req = engine.add_request(tokens(40, 3), max_tokens=4, ignore_eos=True, account=acct)
    run(engine, lambda: req.finished)           # 3 blocks: one context must go
    assert paged_out(engine, old) and resident(engine, recent)
    # Unless nothing could run otherwise: then the recent one goes too.
    req = engine.add_request(tokens(100, 4), max_tokens=4, ignore_eos=True, account=acct)
    run(engine, lambda: req.finished)           # 7 blocks
    assert req.finish_reason == "length" and paged_out(engine, recent)
    # Both come back, and their next turn is as if they had never left.
    for ctx in (old, recent):
        before = list(engine.contexts[ctx].seq.tokens)
        got = turn(engine, ctx, [7, 8, 9], acct)
        assert got == engine.generate([before + [7, 8, 9]], max_tokens=4,
                                      ignore_eos=True)[0].token_ids
    assert acct.kv == kv_of(engine, acct)


def test_a_request_that_outgrows_a_pool_of_just_used_contexts_pages_them_out():
    """The only running request needs one more block, and the rest of the pool is idle
    contexts within the TTL: nothing else can run, so they page out, and it goes on (it
    was refused ENOMEM: preempted to make room, it was then skipped by the forced retry
    that pages out recent contexts, and refused as if it could never fit)."""
    engine = tiny(num_blocks=8, num_swap_blocks=16, kv_ttl=1000.0)
    fake_clock(engine)
    acct = Account(pid=1)
    ctxs = [filled(engine, acct, seed=i) for i in range(2)]     # 6 blocks, just used
    req = engine.add_request(tokens(20, 3), max_tokens=20, ignore_eos=True, account=acct)
    run(engine, lambda: req.finished)           # 2 blocks, then a third at token 33
    assert req.finish_reason == "length", req.error
    assert any(paged_out(engine, c) for c in ctxs)


@pytest.mark.parametrize("paging", [True, False], ids=["pager", "no-pager"])
@pytest.mark.parametrize("low_prompt", [40, 44], ids=["low-fits", "neither-fits"])
def test_calls_that_cannot_fit_beside_a_pinned_context_do_not_take_turns_forever(
        low_prompt, paging):
    """Half the pool is an idle context within the TTL. A nice -5 call needs the whole
    pool; a nice 5 call needs 3 blocks (low-fits) or 4. The nice -5 call displaced the
    nice 5 one, took a chunk, could not grow (the context stays while anything else can
    run), preempted itself, and the other took its place: they took turns a chunk at a
    time, and neither ever finished. Now a running call left alone that cannot grow pages
    out even a context within the TTL; without a pager it can never fit: it is refused."""
    engine = tiny(num_blocks=6, kv_ttl=1000.0, policy="priority",
                  max_num_batched_tokens=16, kv_paging=paging)
    fake_clock(engine)
    pinned = filled(engine, Account(pid=1), seed=1)                  # 3 blocks
    low = engine.add_request(tokens(low_prompt, 2), max_tokens=8, ignore_eos=True,
                             account=Account(pid=2, nice=5))
    engine.step()
    high = engine.add_request(tokens(82, 3), max_tokens=4, ignore_eos=True,
                              account=Account(pid=3, nice=-5))       # 6 blocks: all of it
    run(engine, lambda: low.finished and high.finished, steps=200)
    if paging:
        assert (low.error, high.error) == (None, None) and paged_out(engine, pinned)
    else:
        assert "out of KV memory" in high.error
        assert (low.error is None) == (low_prompt == 40)
    engine.blocks.check_invariants()


@pytest.mark.parametrize("swap_blocks", [0, 16], ids=["recompute", "swap"])
def test_calls_waiting_on_resident_contexts_do_not_lock_the_pool(swap_blocks):
    """Three contexts fill the pool, and a call on each waits for one more block. A
    waiting call's context is busy, so the pager cannot take its KV, and nothing runs: one
    call was refused ENOMEM though each fits the pool alone. Their KV must yield instead."""
    engine = tiny(num_blocks=9, num_swap_blocks=swap_blocks, kv_ttl=0.0)
    acct = Account(pid=1)
    ctxs = [filled(engine, acct, seed=i, n=45) for i in range(3)]     # 48 computed: 3 blocks
    assert engine.blocks.num_free_blocks == 0
    reqs = [engine.add_request([], context=c, max_tokens=2, ignore_eos=True, account=acct)
            for c in ctxs]
    run(engine, lambda: all(r.finished for r in reqs))
    assert [r.error for r in reqs] == [None] * 3
    for c, r in zip(ctxs, reqs):                # and each went on as if alone
        before = engine.contexts[c].seq.tokens[:-2]
        assert r.output_ids == engine.generate([before], max_tokens=2,
                                               ignore_eos=True)[0].token_ids


def test_a_stopped_process_s_idle_context_pages_out_first():
    engine = tiny(num_blocks=8, num_swap_blocks=16, kv_ttl=5.0)
    clock = fake_clock(engine)
    idle, stopped = Account(pid=1), Account(pid=2)
    older = filled(engine, idle, seed=1)
    clock.t += 10                               # past the TTL, least recently used
    just_used = filled(engine, stopped, seed=2)
    engine.pause(stopped, True)                 # within the TTL, but stopped
    req = engine.add_request(tokens(40, 3), max_tokens=4, ignore_eos=True, account=idle)
    run(engine, lambda: req.finished)
    assert paged_out(engine, just_used) and resident(engine, older)
    assert stopped.kv == kv_of(engine, stopped) == {"device": 0, "host": 3, "disk": 0}
    engine.pause(stopped, False)
    turn(engine, just_used, [5], stopped)       # and it comes back on its next call
    assert stopped.kv == kv_of(engine, stopped) and stopped.kv["host"] == 0


# ---- accounting ------------------------------------------------------------------------

def test_kv_counts_follow_blocks_across_tiers_and_free(tmp_path):
    engine = tiny(num_blocks=8, num_swap_blocks=4, kv_ttl=0.0, kv_disk_blocks=16,
                  kv_disk_dir=tmp_path)
    a, b = Account(pid=1), Account(pid=2)
    ctxs = [filled(engine, acct, seed=i) for i, acct in enumerate([a, b, a, b])]
    fork = engine.context_fork(ctxs[-1], account=a)     # shares b's blocks, counted for a
    for acct in (a, b):
        assert acct.kv == kv_of(engine, acct)
    assert sum(acct.kv["host"] for acct in (a, b)) > 0     # 12 blocks in an 8-block pool
    assert sum(acct.kv["disk"] for acct in (a, b)) > 0     # and a 4-block host pool
    assert len(list(tmp_path.glob("*.kv"))) > 0
    for ctx in ctxs + [fork]:
        engine.context_free(ctx)
        for acct in (a, b):
            assert acct.kv == kv_of(engine, acct)
    for acct in (a, b):
        assert acct.kv == {"device": 0, "host": 0, "disk": 0}
    assert engine.pager.disk.used == 0 and not list(tmp_path.glob("*.kv"))
    assert engine.swapper.host.num_free_blocks == engine.swapper.host.num_blocks
    assert engine.blocks.num_free_blocks == engine.num_blocks


def test_a_fork_of_a_paged_out_context_shares_its_host_blocks():
    engine = tiny(num_blocks=8, num_swap_blocks=16, kv_ttl=0.0)
    acct = Account(pid=1)
    parent = filled(engine, acct, seed=1)                 # 3 blocks
    others = [filled(engine, Account(pid=2), seed=2),
              filled(engine, Account(pid=3), seed=3)]     # page the parent out
    assert paged_out(engine, parent)
    host_used = engine.swapper.host.num_blocks - engine.swapper.host.num_free_blocks
    child = engine.context_fork(parent)
    assert engine.swapper.host.num_blocks - engine.swapper.host.num_free_blocks == host_used
    assert acct.kv == kv_of(engine, acct)                 # the child's share counted too
    computed = engine.stats["computed_tokens"]
    got = turn(engine, child, [5], acct)
    assert engine.stats["computed_tokens"] - computed <= 4 + 1   # restored, not recomputed
    assert got == turn(engine, parent, [5], acct)         # the same KV, the same tokens
    for ctx in [child, parent] + others:
        engine.context_free(ctx)
    assert acct.kv == {"device": 0, "host": 0, "disk": 0}
    assert engine.swapper.host.num_free_blocks == engine.swapper.host.num_blocks
