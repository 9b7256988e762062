"""Tests for the KV block manager: unit tests per method, then a stateful model check."""

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from llmos.kernel.blocks import BlockManager, NoFreeBlocks


def filled(mgr, token_ids, salt=None):
    """A table holding token_ids, computed and committed (what the engine does for a prompt)."""
    table = mgr.new_table(salt)
    hit = mgr.match_prefix(table, token_ids)
    mgr.append_slots(table, len(token_ids) - hit)
    mgr.commit_full_blocks(table, token_ids)
    return table


# ---- match_prefix -------------------------------------------------------------------

def test_prefix_hit_is_whole_blocks_and_never_the_last_token():
    mgr = BlockManager(16, block_size=4)
    prompt = list(range(12))  # three full blocks
    first = filled(mgr, prompt)
    assert len(first.hashes) == 3 and mgr.num_cached_blocks == 3

    cases = [(prompt, 8),                      # all three cached, but the last token is computed
             (prompt + [99], 12),              # one more token: every full block is a hit
             (prompt[:9], 8),                  # a partial third block is never a hit
             (prompt[:4], 0),                  # one block exactly: its last token is needed
             ([0, 1, 2, 3, 9, 9, 9, 9, 8], 4)]  # a miss in block 2 ends the run
    for tokens, want in cases:
        table = mgr.new_table()
        assert mgr.match_prefix(table, tokens) == want
        assert table.num_tokens == want and len(table.blocks) == len(table.hashes) == want // 4
        assert table.blocks == first.blocks[:want // 4]
        assert table.hashes == first.hashes[:want // 4]
        mgr.free(table)
    mgr.check_invariants()


def test_match_prefix_takes_references_and_revives_cached_blocks():
    mgr = BlockManager(8, block_size=4)
    prompt = list(range(9))
    first = filled(mgr, prompt)
    shared = first.blocks[:2]
    mgr.free(first)
    assert mgr.num_free_blocks == 8 and mgr.num_cached_blocks == 2
    table = mgr.new_table()
    assert mgr.match_prefix(table, prompt) == 8
    assert table.blocks == shared and mgr.num_free_blocks == 6
    mgr.check_invariants()
    other = mgr.new_table()
    assert mgr.match_prefix(other, prompt) == 8  # a referenced block is shared, not copied
    assert mgr.num_free_blocks == 6
    mgr.free(table)
    assert mgr.num_free_blocks == 6  # still referenced by `other`
    mgr.free(other)
    assert mgr.num_free_blocks == 8
    mgr.check_invariants()


def test_salt_isolation():
    mgr = BlockManager(16, block_size=4)
    prompt = list(range(9))
    filled(mgr, prompt, salt=b"alice")
    for salt, want in [(b"bob", 0), (None, 0), (b"alice", 8)]:
        table = mgr.new_table(salt)
        assert mgr.match_prefix(table, prompt) == want
        mgr.free(table)
    with pytest.raises(ValueError):
        mgr.new_table("alice")


def test_match_prefix_needs_an_empty_table_and_is_off_without_caching():
    mgr = BlockManager(8, block_size=4)
    table = filled(mgr, list(range(9)))
    with pytest.raises(ValueError):
        mgr.match_prefix(table, list(range(9)))
    off = BlockManager(8, block_size=4, enable_prefix_caching=False)
    filled(off, list(range(9)))
    assert off.num_cached_blocks == 0
    assert off.match_prefix(off.new_table(), list(range(9))) == 0


# ---- free list and LRU ----------------------------------------------------------------

def test_fresh_blocks_are_taken_before_cached_ones_and_cached_in_lru_order():
    mgr = BlockManager(6, block_size=2)
    a = filled(mgr, [1, 1, 1, 1])  # two cached blocks
    b = filled(mgr, [2, 2, 2, 2])
    a_blocks, b_blocks = list(a.blocks), list(b.blocks)
    mgr.free(a)  # freed first: reclaimed first
    mgr.free(b)
    assert mgr.num_free_blocks == 6 and mgr.num_cached_blocks == 4

    taker = mgr.new_table()
    mgr.append_slots(taker, 4)  # the two never-used blocks go first
    assert not set(taker.blocks) & set(a_blocks + b_blocks)
    assert mgr.num_cached_blocks == 4
    mgr.append_slots(taker, 2)  # then a's chain, from its tail (its head stays reachable)
    assert taker.blocks[-1] == a_blocks[1] and mgr.num_cached_blocks == 3
    probe = mgr.new_table()
    assert mgr.match_prefix(probe, [1, 1, 1, 1, 1]) == 2
    mgr.free(probe)  # a's head is freed again: now the most recent, after b's blocks
    mgr.append_slots(taker, 4)
    assert taker.blocks[-2:] == [b_blocks[1], b_blocks[0]]
    assert mgr.num_cached_blocks == 1
    mgr.check_invariants()
    with pytest.raises(NoFreeBlocks):
        mgr.append_slots(taker, 3)


# ---- append, fork, copy on write --------------------------------------------------------

def test_can_append_accounting():
    mgr = BlockManager(3, block_size=4)
    table = mgr.new_table()
    assert mgr.can_append(table, 0) and mgr.can_append(table, 12)
    assert not mgr.can_append(table, 13)
    mgr.append_slots(table, 5)  # two blocks, 3 slots left in the second
    assert mgr.can_append(table, 3 + 4) and not mgr.can_append(table, 3 + 4 + 1)
    child = mgr.fork(table)  # shared partial last block: the first write costs one block
    assert mgr.can_append(child, 3) and not mgr.can_append(child, 4)
    assert mgr.append_slots(child, 3) != []
    assert mgr.num_free_blocks == 0
    assert mgr.can_append(table, 3) and not mgr.can_append(table, 4)  # its own block again
    with pytest.raises(ValueError):
        mgr.can_append(table, -1)
    with pytest.raises(ValueError):
        mgr.append_slots(table, -1)


def test_append_slots_raises_no_free_blocks_and_changes_nothing():
    mgr = BlockManager(2, block_size=4)
    table = mgr.new_table()
    mgr.append_slots(table, 5)
    before = (list(table.blocks), table.num_tokens, mgr.usage())
    with pytest.raises(NoFreeBlocks):
        mgr.append_slots(table, 4)
    assert (table.blocks, table.num_tokens, mgr.usage()) == before
    mgr.check_invariants()


def test_fork_copies_the_shared_partial_last_block_on_write():
    mgr = BlockManager(8, block_size=4)
    parent = filled(mgr, list(range(6)))  # one full block and a partial one
    child = mgr.fork(parent)
    assert child.blocks == parent.blocks and child.num_tokens == 6
    assert child.hashes == parent.hashes and child is not parent
    parent_blocks = list(parent.blocks)

    copies = mgr.append_slots(child, 1)
    assert copies == [(parent_blocks[1], child.blocks[1])]
    assert child.blocks[0] == parent_blocks[0] and child.blocks[1] != parent_blocks[1]
    assert parent.blocks == parent_blocks  # the other table's block is untouched
    assert mgr.append_slots(child, 1) == []  # the copy is private now
    assert mgr.append_slots(parent, 1) == []  # and so is the original: refcount back to 1
    mgr.check_invariants()

    full = filled(mgr, list(range(8)))  # a full last block is never written again: no copy
    assert mgr.append_slots(mgr.fork(full), 1) == []
    mgr.check_invariants()


def test_slot():
    mgr = BlockManager(8, block_size=4)
    mgr.append_slots(mgr.new_table(), 4)  # so the next table does not start at block 0
    table = mgr.new_table()
    mgr.append_slots(table, 6)
    b0, b1 = table.blocks
    assert [mgr.slot(table, p) for p in range(6)] == [b0 * 4, b0 * 4 + 1, b0 * 4 + 2,
                                                      b0 * 4 + 3, b1 * 4, b1 * 4 + 1]
    for bad in (-1, 6):
        with pytest.raises(ValueError):
            mgr.slot(table, bad)


# ---- commit ---------------------------------------------------------------------------

def test_commit_hashes_only_full_computed_blocks():
    mgr = BlockManager(8, block_size=4)
    table = mgr.new_table()
    tokens = list(range(10))
    mgr.append_slots(table, 7)
    mgr.commit_full_blocks(table, tokens)  # longer token list is fine: num_tokens decides
    assert len(table.hashes) == 1 and mgr.num_cached_blocks == 1
    mgr.append_slots(table, 3)
    mgr.commit_full_blocks(table, tokens)
    assert len(table.hashes) == 2 and mgr.num_cached_blocks == 2
    with pytest.raises(ValueError):
        mgr.commit_full_blocks(table, tokens[:9])


def test_commit_keeps_the_existing_cache_entry():
    freed = []
    mgr = BlockManager(8, block_size=4, on_free=freed.extend)
    first = filled(mgr, list(range(8)))
    second = mgr.new_table()  # computed separately (e.g. admitted in the same step)
    mgr.append_slots(second, 8)
    mgr.commit_full_blocks(second, list(range(8)))
    assert second.hashes == first.hashes and mgr.num_cached_blocks == 2
    second_blocks = list(second.blocks)
    mgr.free(second)  # its blocks never entered the cache: garbage
    assert sorted(freed) == sorted(second_blocks)
    assert not set(second_blocks) & set(first.blocks)
    mgr.check_invariants()


# ---- truncate and free ------------------------------------------------------------------

def test_truncate_releases_blocks_and_hashes():
    mgr = BlockManager(8, block_size=4)
    table = filled(mgr, list(range(12)))
    mgr.truncate(table, 9)
    assert len(table.blocks) == 3 and len(table.hashes) == 2 and table.num_tokens == 9
    mgr.truncate(table, 8)
    assert len(table.blocks) == 2 and len(table.hashes) == 2
    assert mgr.num_free_blocks == 6
    for bad in (-1, 9):
        with pytest.raises(ValueError):
            mgr.truncate(table, bad)
    mgr.check_invariants()


def test_writing_into_a_truncated_cached_block_copies_it():
    mgr = BlockManager(8, block_size=4)
    table = filled(mgr, list(range(8)))
    cached = table.blocks[1]
    mgr.truncate(table, 6)  # block 1 is partial again, but the cache still vouches for it
    copies = mgr.append_slots(table, 1)
    assert copies == [(cached, table.blocks[1])]
    probe = mgr.new_table()
    assert mgr.match_prefix(probe, list(range(9))) == 8 and probe.blocks[1] == cached
    mgr.check_invariants()


def test_on_free_gets_only_unhashed_blocks():
    calls = []
    mgr = BlockManager(8, block_size=4, on_free=calls.append)
    table = filled(mgr, list(range(10)))  # two hashed blocks, one partial
    hashed, partial = table.blocks[:2], table.blocks[2]
    child = mgr.fork(table)
    mgr.free(table)
    assert calls == []  # everything still referenced by the child
    mgr.free(child)
    assert calls == [[partial]]
    assert child.blocks == [] and child.num_tokens == 0 and child.hashes == []
    assert set(hashed) <= set(range(8)) and mgr.num_cached_blocks == 2

    off_calls = []
    off = BlockManager(8, block_size=4, enable_prefix_caching=False, on_free=off_calls.append)
    table = filled(off, list(range(10)))
    blocks = list(table.blocks)
    off.free(table)
    assert sorted(off_calls[0]) == sorted(blocks)


def test_usage():
    mgr = BlockManager(8, block_size=4)
    table = filled(mgr, list(range(10)))
    assert mgr.usage() == {"total": 8, "free": 5, "cached": 2, "used": 3}
    mgr.free(table)
    assert mgr.usage() == {"total": 8, "free": 8, "cached": 2, "used": 0}
    with pytest.raises(ValueError):
        BlockManager(0)


# ---- stateful model check ---------------------------------------------------------------

tokens_st = st.lists(st.integers(0, 1), min_size=1, max_size=10)


class BlockMachine(RuleBasedStateMachine):
    """Random table lifecycles against a model of the device KV.

    `kv[slot]` holds what the engine would have written there: the token prefix whose last
    token sits at that slot (None once on_free poisons it). Every live table must read back
    its own prefixes, and every cached block must still hold what its hash promises.
    """

    @initialize(num_blocks=st.integers(8, 24), block_size=st.integers(2, 4),
                caching=st.booleans())
    def setup(self, num_blocks, block_size, caching):
        self.mgr = BlockManager(num_blocks, block_size, caching, on_free=self.poison)
        self.kv = [None] * (num_blocks * block_size)
        self.tables = []  # [(table, tokens)], tokens all computed
        self.promised = {}  # hash -> (salt, token prefix ending at that block)

    def poison(self, blocks):
        bs = self.mgr.block_size
        for b in blocks:
            assert self.mgr._refcount[b] == 0
            self.kv[b * bs:(b + 1) * bs] = [None] * bs

    def write(self, table, tokens, copies, start):
        bs = self.mgr.block_size
        for src, dst in copies:
            self.kv[dst * bs:(dst + 1) * bs] = self.kv[src * bs:(src + 1) * bs]
        for pos in range(start, len(tokens)):
            self.kv[self.mgr.slot(table, pos)] = tuple(tokens[:pos + 1])

    def try_append(self, table, tokens, n):
        """Append the last n of tokens if the pool allows; returns whether it did."""
        if not self.mgr.can_append(table, n):
            with pytest.raises(NoFreeBlocks):
                self.mgr.append_slots(table, n)
            return False
        copies = self.mgr.append_slots(table, n)
        assert len(copies) <= 1
        self.write(table, tokens, copies, len(tokens) - n)
        return True

    @rule(tokens=tokens_st, salt=st.sampled_from([None, b"x"]))
    def allocate(self, tokens, salt):
        table = self.mgr.new_table(salt)
        hit = self.mgr.match_prefix(table, tokens)
        bs = self.mgr.block_size
        assert hit % bs == 0 and hit <= len(tokens) - 1
        for i, h in enumerate(table.hashes):
            assert self.promised[h] == (salt, tuple(tokens[:(i + 1) * bs]))
        if self.try_append(table, tokens, len(tokens) - hit):
            self.tables.append((table, list(tokens)))
        else:
            self.mgr.free(table)

    def pick(self, data):
        """A random live table entry, or a fresh one if none is live (no invalid steps)."""
        if not self.tables:
            self.allocate([0, 1, 0], None)  # fits: with no live table every block is free
        return self.tables[data.draw(st.integers(0, len(self.tables) - 1))]

    @rule(data=st.data(), more=tokens_st)
    def append(self, data, more):
        table, tokens = self.pick(data)
        if self.try_append(table, tokens + more, len(more)):
            tokens.extend(more)

    @rule(data=st.data())
    def commit(self, data):
        table, tokens = self.pick(data)
        self.mgr.commit_full_blocks(table, tokens)
        bs = self.mgr.block_size
        for i, h in enumerate(table.hashes):
            self.promised.setdefault(h, (table.salt, tuple(tokens[:(i + 1) * bs])))

    @rule(data=st.data())
    def fork(self, data):
        table, tokens = self.pick(data)
        self.tables.append((self.mgr.fork(table), list(tokens)))

    @rule(data=st.data())
    def truncate(self, data):
        table, tokens = self.pick(data)
        keep = data.draw(st.integers(0, len(tokens)))
        self.mgr.truncate(table, keep)
        del tokens[keep:]

    @rule(data=st.data())
    def free(self, data):
        entry = self.pick(data)
        self.mgr.free(entry[0])
        self.tables.remove(entry)

    @invariant()
    def consistent(self):
        if not hasattr(self, "mgr"):
            return
        mgr, bs = self.mgr, self.mgr.block_size
        mgr.check_invariants()
        holders = [0] * mgr.num_blocks
        for table, tokens in self.tables:
            assert table.num_tokens == len(tokens)
            assert len(table.blocks) == -(-len(tokens) // bs)  # blocks cover num_tokens
            assert len(set(table.blocks)) == len(table.blocks)
            assert len(table.hashes) <= len(tokens) // bs
            for b in table.blocks:
                holders[b] += 1
            for pos in range(len(tokens)):
                assert self.kv[mgr.slot(table, pos)] == tuple(tokens[:pos + 1])
        assert holders == mgr._refcount
        for h, b in mgr._cache.items():
            prefix = self.promised[h][1]
            assert self.kv[b * bs:(b + 1) * bs] == [prefix[:len(prefix) - bs + j + 1]
                                                    for j in range(bs)]

    def teardown(self):
        if not hasattr(self, "mgr"):
            return
        for table, _ in self.tables:
            self.mgr.free(table)
        self.mgr.check_invariants()
        assert self.mgr.num_free_blocks == self.mgr.num_blocks
        assert self.mgr.usage()["used"] == 0


BlockMachine.TestCase.settings = settings(
    max_examples=200, stateful_step_count=40, deadline=None,
    suppress_health_check=[HealthCheck.too_slow])
TestBlockMachine = BlockMachine.TestCase
