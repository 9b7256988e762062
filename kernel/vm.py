"""Virtual memory for KV: idle contexts page out of the device pool and back in on use.

A context is a process's memory (a conversation it keeps between calls). When the device
pool is short, the KV of idle contexts (no request running on them) moves out, least
recently used first: to the host swap pool, or, when that is full and a disk tier is set
(`--kv-disk`), to a file under the home; with no room anywhere it is dropped and
recomputed from the context's tokens on the next call. A context used within the last
`ttl` seconds stays resident (an agent between two turns, waiting on a tool, as
Continuum's TTL pinning) unless nothing at all could run otherwise; a stopped process's
contexts go first. The next request on a paged-out context takes its KV back
(`take`/`restore`), so outputs are the same as if it had never left.

Where a context's KV is: on the device (ctx.seq.table has blocks), in `ctx.paged` (a host
BlockTable or a DiskImage), or nowhere (to be recomputed). Blocks are counted per process
in Account.kv: "device" and "host" by the block managers, "disk" here.
Engine thread only.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .blocks import BlockManager, BlockTable


@dataclass(eq=False)
class DiskImage:
    """A context's KV in a file: `num_blocks` blocks holding `num_tokens` tokens."""
    path: Path
    num_tokens: int
    num_blocks: int
    account: object


class DiskTier:
    """KV files in one directory, at most `capacity` blocks in all. The files hold raw
    tensors (torch.save of K and V per layer); the directory is the kernel's alone.
    `caches` are the device pool's (they are read from and written back to)."""

    def __init__(self, directory: Path, capacity: int, driver, caches: list):
        self.dir, self.capacity, self.driver, self.caches = Path(directory), capacity, driver, caches
        self.used = 0
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        for stale in self.dir.glob("*.kv"):        # a previous boot's: never read again
            stale.unlink()
        self._names = iter(range(1, 1 << 62))

    def can_hold(self, num_blocks: int) -> bool:
        return self.used + num_blocks <= self.capacity

    def write(self, source: list, blocks: list[int], num_tokens: int, account) -> DiskImage:
        """Save blocks of `source` (the device caches or the host pool's) to a new file."""
        idx = torch.as_tensor(blocks, dtype=torch.int64, device=source[0][0].device)
        data = [(k.index_select(0, idx).cpu(), v.index_select(0, idx).cpu()) for k, v in source]
        path = self.dir / f"{next(self._names)}.kv"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "wb") as f:
            torch.save(data, f)
        self.used += len(blocks)
        account.kv["disk"] += len(blocks)
        return DiskImage(path, num_tokens, len(blocks), account)

    def read_into(self, image: DiskImage, device_blocks: list[int]) -> None:
        """Copy the file's blocks into the given device blocks, then delete the file."""
        with open(image.path, "rb") as f:
            data = torch.load(f, weights_only=True)
        self.driver.swap_in(self.caches, data, list(range(image.num_blocks)), device_blocks)
        self.drop(image)

    def drop(self, image: DiskImage) -> None:
        image.path.unlink(missing_ok=True)
        self.used -= image.num_blocks
        image.account.kv["disk"] -= image.num_blocks


class Pager:
    def __init__(self, blocks: BlockManager, swapper, contexts: dict, ttl: float,
                 disk: DiskTier | None = None, clock: Callable[[], float] = time.monotonic):
        self.blocks, self.swapper, self.contexts = blocks, swapper, contexts
        self.ttl, self.disk, self.clock = ttl, disk, clock
        self.paged_out = self.paged_in = 0        # contexts moved, for stats and tests

    # ---- out ------------------------------------------------------------------------
    def reclaim(self, enough: Callable[[], bool], account=None, force: bool = False) -> bool:
        """Page out idle contexts until enough(): only `account`'s if given (its own limit:
        the TTL does not protect them from it); with force, recently used ones too.
        Returns enough()."""
        for ctx in self._candidates(account, force):
            if enough():
                return True
            self.page_out(ctx)
        return enough()

    def _candidates(self, account, force: bool) -> list:
        now = self.clock()
        idle = [c for c in self.contexts.values() if c.busy is None and c.seq.table.blocks
                and (account is None or c.account is account)]
        if account is None and not force:
            idle = [c for c in idle if c.account.stopped or now - c.last_used >= self.ttl]
        idle.sort(key=lambda c: (not c.account.stopped, c.last_used))
        return idle

    def page_out(self, ctx) -> None:
        """Move an idle context's KV off the device: to host swap, else disk, else drop."""
        table = ctx.seq.table
        n = len(table.blocks)
        if self.swapper is not None and not self.swapper.can_swap_out(table) and self.disk:
            self._spill(table.num_tokens)
        if self.swapper is not None and self.swapper.can_swap_out(table):
            ctx.paged = self.swapper.swap_out(table)
        elif self.disk is not None and self.disk.can_hold(n):
            ctx.paged = self.disk.write(self.disk.caches, table.blocks, table.num_tokens,
                                        ctx.account)
        ctx.account.swaps += n
        self.blocks.free(table)
        self.paged_out += 1

    def _spill(self, num_tokens: int) -> None:
        """Make host room for num_tokens by moving the least recently used host-resident
        contexts to disk."""
        host = self.swapper.host
        fits = lambda: host.can_append(host.new_table(), num_tokens)   # noqa: E731
        paged = sorted((c for c in self.contexts.values() if isinstance(c.paged, BlockTable)),
                       key=lambda c: c.last_used)
        for ctx in paged:
            if fits() or not self.disk.can_hold(len(ctx.paged.blocks)):
                return
            src = ctx.paged
            ctx.paged = self.disk.write(self.swapper.host_caches, src.blocks, src.num_tokens,
                                        ctx.account)
            host.free(src)

    # ---- in -------------------------------------------------------------------------
    def take(self, ctx):
        """A request starts on ctx: hand it the context's paged-out KV (or None)."""
        paged, ctx.paged = ctx.paged, None
        ctx.last_used = self.clock()
        return paged

    def give_back(self, ctx, paged) -> None:
        """A request on ctx ended while its KV was paged out (preempted, then aborted): the
        context keeps it."""
        if paged is not None and ctx.paged is None and not ctx.seq.table.blocks:
            ctx.paged = paged
        else:
            self.drop(paged)

    def restore(self, paged, table: BlockTable) -> None:
        """Bring paged-out KV into the empty device `table` (the caller checked for room)."""
        if isinstance(paged, DiskImage):
            self.blocks.append_slots(table, paged.num_tokens)
            self.disk.read_into(paged, table.blocks)
        else:
            self.swapper.swap_in(paged, table, self.blocks)
        self.paged_in += 1

    def drop(self, paged) -> None:
        """Forget paged-out KV that will never be used (its context or request is gone)."""
        if isinstance(paged, DiskImage):
            self.disk.drop(paged)
        elif paged is not None:
            self.swapper.drop(paged)

    def usage(self) -> dict:
        return {"disk_total": self.disk.capacity if self.disk else 0,
                "disk_used": self.disk.used if self.disk else 0}
