"""KV block manager: which device KV blocks each sequence holds, and the prefix cache.

Unit: one block holds the K and V of `block_size` consecutive tokens of one sequence, for
every layer. This module is bookkeeping only; the engine moves the device data.

A block is in exactly one of three states:
  referenced  refcount >= 1, held by one or more tables (fork shares blocks);
  cached      refcount == 0 but its hash is in the prefix cache: free to take, yet its KV
              is kept until a fresh block is needed and it is the least recently freed;
  free        refcount == 0, no hash, content is garbage.
`num_free_blocks` counts cached + free: both can be taken now. Free blocks are taken most
recently freed first (a stack; from a fresh pool, block 0 first), so a block just released
is reused before one never written. On the CPU a pool's pages are committed on first write
(drivers/base.py), so without the prefix cache the written part of the pool stays near the
most blocks ever in use at once; cached blocks are kept while a free one is left, so with
the cache on it grows with the cache.

Ask before acting: `can_append` then `append_slots`. NoFreeBlocks means the caller broke
that rule; ValueError means a bad argument. Neither leaves the manager half-changed.
Engine thread only: nothing here takes a lock.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable


class NoFreeBlocks(Exception):
    """Raised by append_slots when the pool is short: the caller did not ask can_append."""


@dataclass
class BlockTable:
    """One sequence's (or context's) KV: which blocks, and how far they are filled."""

    blocks: list[int] = field(default_factory=list)  # physical block ids, in order
    num_tokens: int = 0  # tokens whose KV slots are assigned (computed or computed this step)
    hashes: list[bytes] = field(default_factory=list)  # chained hash of each full, hashed block
    salt: bytes | None = None  # owners with different salts never share cached blocks
    account: object = None  # whose blocks they are: its .kv[tier] counts them (accounting)


class BlockManager:
    """Hands out KV blocks with reference counts and caches full blocks by content."""

    def __init__(self, num_blocks: int, block_size: int = 16, enable_prefix_caching: bool = True,
                 on_free: Callable[[list[int]], None] | None = None, tier: str = "device"):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need num_blocks >= 1 and block_size >= 1, "
                             f"got {num_blocks} and {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.on_free = on_free  # debug hook: receives blocks whose content became garbage
        self.tier = tier  # the key of a table's account.kv that counts this pool's blocks
        self._refcount = [0] * num_blocks
        self._hash: list[bytes | None] = [None] * num_blocks  # set iff the block is in _cache
        self._cache: dict[bytes, int] = {}  # hash -> block id (referenced or cached)
        # unhashed, refcount 0; a stack whose top (the end) is taken next: most recently
        # freed first, and from a fresh pool block 0 first
        self._free: list[int] = list(reversed(range(num_blocks)))
        # hashed, refcount 0, least recently freed first; an OrderedDict so that a prefix
        # hit can revive a block from the middle in O(1)
        self._lru: OrderedDict[int, None] = OrderedDict()

    # ---- counters -------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        """Blocks that can be taken now: free plus cached-but-unreferenced."""
        return len(self._free) + len(self._lru)

    @property
    def num_cached_blocks(self) -> int:
        """Blocks with a hash in the prefix cache, referenced or not."""
        return len(self._cache)

    def usage(self) -> dict:
        """Block counts for meminfo: total, free (takeable), cached (hashed), used (referenced)."""
        free = self.num_free_blocks
        return {"total": self.num_blocks, "free": free, "cached": self.num_cached_blocks,
                "used": self.num_blocks - free}

    # ---- tables ---------------------------------------------------------------------

    def new_table(self, salt: bytes | None = None, account=None) -> BlockTable:
        """An empty table; blocks are cached under and matched against `salt` only, and
        counted in account.kv[tier] (account: anything with a `kv` dict, or None)."""
        if salt is not None and not isinstance(salt, bytes):
            raise ValueError(f"salt must be bytes or None, got {type(salt).__name__}")
        return BlockTable(salt=salt, account=account)

    def match_prefix(self, table: BlockTable, token_ids: list[int]) -> int:
        """Give an empty table the longest cached run of full blocks that prefixes token_ids.

        Never covers the last token, so the caller always computes at least one token and
        gets logits. Takes a reference on each hit block. Returns the tokens covered, a
        multiple of block_size; 0 when caching is off. ValueError if the table is not empty.
        """
        if table.blocks or table.num_tokens:
            raise ValueError("match_prefix needs an empty table")
        if not self.enable_prefix_caching:
            return 0
        bs = self.block_size
        parent = b""
        for i in range((len(token_ids) - 1) // bs):
            h = self._chain_hash(parent, token_ids[i * bs:(i + 1) * bs], table.salt)
            block = self._cache.get(h)
            if block is None:
                break
            self._ref(block)
            table.blocks.append(block)
            table.hashes.append(h)
            parent = h
        table.num_tokens = len(table.blocks) * bs
        self._meter(table, len(table.blocks))
        return table.num_tokens

    def can_append(self, table: BlockTable, n: int) -> bool:
        """Whether append_slots(table, n) would succeed now. ValueError if n < 0."""
        return self._blocks_needed(table, n) <= self.num_free_blocks

    def append_slots(self, table: BlockTable, n: int) -> list[tuple[int, int]]:
        """Assign KV slots for n more tokens, allocating blocks as needed.

        A partial last block that others may read (shared after a fork, or holding a cached
        hash after a truncate) is copied on write: a new block replaces it in this table.
        Returns the (src, dst) block copies the engine must do before the forward.
        Raises NoFreeBlocks (nothing changed) if the pool is short, ValueError if n < 0.
        """
        needed = self._blocks_needed(table, n)
        if needed > self.num_free_blocks:
            raise NoFreeBlocks(f"need {needed} blocks, {self.num_free_blocks} free")
        copies = []
        if self._needs_cow(table, n):
            src, dst = table.blocks[-1], self._take()
            table.blocks[-1] = dst
            copies.append((src, dst))
        before = len(table.blocks)
        while len(table.blocks) < self._blocks_for(table.num_tokens + n):
            table.blocks.append(self._take())
        table.num_tokens += n
        self._meter(table, len(table.blocks) - before)
        # Released last: the engine still reads src for the copy. If src drops to cached it
        # may be retaken later, but its new owner writes only in the forward, after the copy.
        for src, _ in copies:
            self._release([src])
        return copies

    def slot(self, table: BlockTable, pos: int) -> int:
        """The KV slot (block * block_size + offset) of token position pos < num_tokens."""
        if not 0 <= pos < table.num_tokens:
            raise ValueError(f"position {pos} outside 0..{table.num_tokens - 1}")
        return table.blocks[pos // self.block_size] * self.block_size + pos % self.block_size

    def commit_full_blocks(self, table: BlockTable, token_ids: list[int]) -> None:
        """After the forward: hash every newly full block and enter it into the prefix cache.

        token_ids are the table's tokens (at least num_tokens of them); only blocks fully
        covered by num_tokens are hashed. If another block already holds the same hash, the
        cache keeps that one and this block stays unhashed (no dedup). No-op when caching
        is off. ValueError if token_ids is too short or disagrees with a cached block.
        """
        if not self.enable_prefix_caching:
            return
        if len(token_ids) < table.num_tokens:
            raise ValueError(f"{len(token_ids)} token ids for {table.num_tokens} tokens")
        bs = self.block_size
        for i in range(len(table.hashes), table.num_tokens // bs):
            parent = table.hashes[-1] if table.hashes else b""
            h = self._chain_hash(parent, token_ids[i * bs:(i + 1) * bs], table.salt)
            block = table.blocks[i]
            if self._hash[block] not in (None, h):
                # A forked sibling committed this shared block with other tokens.
                raise ValueError(f"token ids disagree with the cached content of block {block}")
            if self._hash[block] is None and h not in self._cache:
                self._cache[h] = block
                self._hash[block] = h
            table.hashes.append(h)

    def fork(self, table: BlockTable, account=None) -> BlockTable:
        """A new table sharing every block, counted for `account` (default: table's); the
        partial last one is copied on write later."""
        for block in table.blocks:
            self._ref(block)
        child = BlockTable(list(table.blocks), table.num_tokens, list(table.hashes), table.salt,
                           table.account if account is None else account)
        self._meter(child, len(child.blocks))
        return child

    def truncate(self, table: BlockTable, num_tokens: int) -> None:
        """Drop KV beyond num_tokens, releasing blocks no longer needed.

        ValueError unless 0 <= num_tokens <= table.num_tokens.
        """
        if not 0 <= num_tokens <= table.num_tokens:
            raise ValueError(f"cannot truncate {table.num_tokens} tokens to {num_tokens}")
        keep = self._blocks_for(num_tokens)
        self._release(table.blocks[keep:])
        self._meter(table, keep - len(table.blocks))
        del table.blocks[keep:]
        del table.hashes[num_tokens // self.block_size:]
        table.num_tokens = num_tokens

    def free(self, table: BlockTable) -> None:
        """Release every block of the table and leave it empty (blocks, tokens, hashes)."""
        self.truncate(table, 0)

    def blocks_needed(self, table: BlockTable, n: int) -> int:
        """Blocks append_slots(table, n) would take (copy-on-write included)."""
        return self._blocks_needed(table, n)

    # ---- internals ------------------------------------------------------------------

    def _meter(self, table: BlockTable, delta: int) -> None:
        if table.account is not None and delta:
            table.account.kv[self.tier] += delta

    def _blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _needs_cow(self, table: BlockTable, n: int) -> bool:
        """Whether writing n tokens would land in a partial last block others may read."""
        if n == 0 or table.num_tokens % self.block_size == 0:
            return False
        last = table.blocks[-1]
        return self._refcount[last] > 1 or self._hash[last] is not None

    def _blocks_needed(self, table: BlockTable, n: int) -> int:
        if n < 0:
            raise ValueError(f"cannot append {n} tokens")
        grow = self._blocks_for(table.num_tokens + n) - len(table.blocks)
        return grow + self._needs_cow(table, n)

    def _chain_hash(self, parent: bytes, token_ids: list[int], salt: bytes | None) -> bytes:
        # A cryptographic hash, so equal hashes mean equal prefixes and a collision cannot
        # silently hand out wrong KV. The parent is empty or 32 bytes and the block has a
        # fixed token count, so the salt tag at the end cannot be confused with tokens.
        h = hashlib.blake2b(digest_size=32)
        h.update(parent)
        h.update(array("q", token_ids).tobytes())
        h.update(b"\0" if salt is None else b"\1" + salt)
        return h.digest()

    def _take(self) -> int:
        """A fresh block with refcount 1: the most recently freed free one, else evict the
        least recently freed cached one."""
        if self._free:
            block = self._free.pop()
        else:
            block, _ = self._lru.popitem(last=False)
            del self._cache[self._hash[block]]
            self._hash[block] = None
            # No on_free here: the block is reused at once, and poisoning it now could hit
            # a copy-on-write source that the engine has not copied yet.
        assert self._refcount[block] == 0, f"block {block} taken while referenced"
        self._refcount[block] = 1
        return block

    def _ref(self, block: int) -> None:
        if self._refcount[block] == 0:
            del self._lru[block]  # a cached block comes back to life
        self._refcount[block] += 1

    def _release(self, blocks: list[int]) -> None:
        """Drop one reference to each block; blocks reaching 0 become cached or free."""
        garbage = []
        # Tail first: a chain then ages from its end, so its reachable prefix outlives it.
        for block in reversed(blocks):
            assert self._refcount[block] > 0, f"block {block} released while free"
            self._refcount[block] -= 1
            if self._refcount[block]:
                continue
            if self._hash[block] is not None:
                self._lru[block] = None
            else:
                self._free.append(block)
                garbage.append(block)
        if garbage and self.on_free is not None:
            self.on_free(garbage)

    def check_invariants(self) -> None:
        """Raise AssertionError if the bookkeeping is inconsistent. For tests."""
        free, lru = set(self._free), set(self._lru)
        _require(len(free) == len(self._free), "a block is twice in the free list")
        _require(not free & lru, "a block is both free and cached-free")
        _require(all(r >= 0 for r in self._refcount), "negative refcount")
        idle = {b for b, r in enumerate(self._refcount) if r == 0}
        _require(idle == free | lru, "free lists disagree with refcounts")
        _require(len(free) + len(lru) + sum(r > 0 for r in self._refcount) == self.num_blocks,
                 "free + referenced != num_blocks")
        _require(all(self._hash[b] == h for h, b in self._cache.items()),
                 "cache map and block hash disagree")
        _require(sum(h is not None for h in self._hash) == len(self._cache),
                 "a block has a hash that is not in the cache")
        _require(all(self._hash[b] is None for b in free), "a free block has a hash")
        _require(all(self._hash[b] is not None for b in lru), "a cached-free block has no hash")


def _require(cond: bool, msg: str) -> None:
    # Not `assert`: check_invariants must still check under python -O.
    if not cond:
        raise AssertionError(msg)
