"""Swap: a preempted sequence's KV moves to a host pool and comes back when it runs again.

Engine thread only. The host pool has its own BlockManager (no prefix caching: a block
there belongs to exactly one swapped sequence). Copies run at once, in the order the
scheduler decides them, so a device block is always copied out before anyone can be
handed it (or before debug mode poisons it).
"""
from __future__ import annotations

from .blocks import BlockManager, BlockTable


class Swapper:
    def __init__(self, driver, caches: list, host_caches: list, host_blocks: BlockManager):
        self.driver, self.caches, self.host_caches = driver, caches, host_caches
        self.host = host_blocks
        self.swapped_out = self.swapped_in = 0     # blocks moved, for meminfo and tests

    def can_swap_out(self, table: BlockTable) -> bool:
        return self.host.can_append(self.host.new_table(), table.num_tokens)

    def swap_out(self, table: BlockTable) -> BlockTable:
        """Copy the table's KV to fresh host blocks; return the host table. The caller then
        frees the device table."""
        host = self.host.new_table(account=table.account)
        self.host.append_slots(host, table.num_tokens)
        self.driver.swap_out(self.caches, self.host_caches, table.blocks, host.blocks)
        self.swapped_out += len(host.blocks)
        return host

    def swap_in(self, host: BlockTable, table: BlockTable, blocks: BlockManager) -> None:
        """Give the empty device `table` slots for the host table's tokens, copy them in,
        and free the host blocks. The caller has checked that the device pool has room."""
        blocks.append_slots(table, host.num_tokens)
        self.driver.swap_in(self.caches, self.host_caches, host.blocks, table.blocks)
        self.swapped_in += len(host.blocks)
        self.host.free(host)

    def drop(self, host: BlockTable) -> None:
        """Forget a swapped sequence that will never run again (aborted)."""
        self.host.free(host)
