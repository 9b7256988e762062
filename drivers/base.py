"""The Driver interface: the narrow waist between the kernel and one kind of hardware.

The kernel sees a driver through these methods only. Shapes use the names of DESIGN.md:
T new tokens in a batch, S sequences, H query heads, Hkv KV heads (H a multiple of Hkv),
D head size. A KV cache is, per layer, a pair (k_cache, v_cache), each
[num_blocks, block_size, Hkv, D]; a slot is block * block_size + offset.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Sequence

import torch
from torch import Tensor

KVCache = list[tuple[Tensor, Tensor]]  # per layer (k_cache, v_cache)


class Driver(ABC):
    name: str  # the name get_driver() knows it by
    device: torch.device

    @classmethod
    @abstractmethod
    def is_available(cls) -> bool:
        """True when this machine has the hardware and libraries the driver needs."""

    @abstractmethod
    def memory_info(self) -> tuple[int, int]:
        """(free, total) bytes of the memory the KV pool and weights live in."""

    def synchronize(self) -> None:
        """Wait until every queued op on the device has finished (no-op where ops are eager)."""

    def allocate_kv_cache(self, num_layers: int, num_blocks: int, block_size: int,
                          num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> KVCache:
        """Per layer a zero-filled (k_cache, v_cache), each [num_blocks, block_size, Hkv, D]."""
        shape = (num_blocks, block_size, num_kv_heads, head_dim)
        return [(torch.zeros(shape, dtype=dtype, device=self.device),
                 torch.zeros(shape, dtype=dtype, device=self.device))
                for _ in range(num_layers)]

    @abstractmethod
    def store_kv(self, k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor,
                 slot_mapping: Tensor) -> None:
        """Write k, v [T, Hkv, D] into the caches at slot_mapping [T] int64; slot -1 is skipped."""

    @abstractmethod
    def paged_attention(self, q: Tensor, k_cache: Tensor, v_cache: Tensor,
                        block_tables: Tensor, seq_lens: Tensor, query_start_loc: Tensor,
                        scale: float) -> Tensor:
        """Attention of the new tokens over their sequences' cached KV; returns o [T, H, D].

        q: [T, H, D]; block_tables: [S, max_blocks] int32, entries past a sequence's
        blocks are ignored (any value); seq_lens: [S] int32, cached tokens including the
        new ones; query_start_loc: [S+1] int32, prefix sums of new tokens per sequence.
        New token j of sequence s (q_len new tokens) sits at position seq_len - q_len + j
        and attends to positions 0..that position. Its KV is already stored. Query head h
        uses KV head h // (H // Hkv).
        """

    def copy_blocks(self, caches: KVCache, src: Tensor | Sequence[int],
                    dst: Tensor | Sequence[int]) -> None:
        """Copy block src[i] to block dst[i] in every layer, K and V (all reads before writes)."""
        src = torch.as_tensor(src, dtype=torch.int64, device=self.device)
        dst = torch.as_tensor(dst, dtype=torch.int64, device=self.device)
        if src.numel() == 0:
            return
        for k_cache, v_cache in caches:
            k_cache.index_copy_(0, dst, k_cache.index_select(0, src))
            v_cache.index_copy_(0, dst, v_cache.index_select(0, src))

    def poison_blocks(self, caches: KVCache, blocks: Tensor | Sequence[int]) -> None:
        """Fill the given blocks with NaN in every layer (debug mode: freed blocks must not be read)."""
        blocks = torch.as_tensor(blocks, dtype=torch.int64, device=self.device)
        if blocks.numel() == 0:
            return
        for k_cache, v_cache in caches:
            k_cache.index_fill_(0, blocks, float("nan"))
            v_cache.index_fill_(0, blocks, float("nan"))
