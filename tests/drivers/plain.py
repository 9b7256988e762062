"""A driver that implements only what Driver leaves abstract: every model op, the swap
pool and copy_blocks come from the base class's torch defaults. It stands for a
third-party driver that accelerates nothing yet (its KV ops borrow the cpu driver's)."""
from __future__ import annotations

import torch

from llmos.drivers import CpuDriver, Driver


class PlainDriver(Driver):
    name = "plain"
    device = torch.device("cpu")
    priority = -1

    def __init__(self):
        self._kv = CpuDriver()

    @classmethod
    def is_available(cls) -> bool:
        return True

    def memory_info(self) -> tuple[int, int]:
        return self._kv.memory_info()

    def store_kv(self, k, v, k_cache, v_cache, slot_mapping) -> None:
        self._kv.store_kv(k, v, k_cache, v_cache, slot_mapping)

    def paged_attention(self, q, k_cache, v_cache, block_tables, seq_lens, query_start_loc,
                        scale):
        return self._kv.paged_attention(q, k_cache, v_cache, block_tables, seq_lens,
                                        query_start_loc, scale)

    def poison_blocks(self, caches, blocks) -> None:
        self._kv.poison_blocks(caches, blocks)
