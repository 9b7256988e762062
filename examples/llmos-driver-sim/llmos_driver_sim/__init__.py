"""sim: a simulated accelerator with a fixed memory capacity, running on the CPU.

It does the cpu driver's KV ops, but accounts for every pool it allocates against a
capacity (LLMOS_SIM_MEMORY for the device, LLMOS_SIM_HOST_MEMORY for the swap pool, or the
constructor's arguments), so a test can run out of KV memory on any machine. A pool's
bytes come back when its tensors are freed. Model weights are not counted: the kernel
loads them itself, not through the driver.
"""
from __future__ import annotations

import os
import threading
import weakref

import torch

from llmos.drivers import CpuDriver, KVCache, OutOfDeviceMemory
from llmos.drivers.base import parse_size

MEMORY_ENV = "LLMOS_SIM_MEMORY"            # device capacity, e.g. 64M; default 256M
HOST_MEMORY_ENV = "LLMOS_SIM_HOST_MEMORY"  # swap pool capacity; default: the device's
DEFAULT_MEMORY = "256M"


class Pool:
    """Bytes in use against a capacity; tensors hand theirs back when garbage-collected."""

    def __init__(self, what: str, capacity: int, env: str):
        self.what, self.capacity, self.env, self.used = what, capacity, env, 0
        self._lock = threading.Lock()  # finalizers may run on any thread

    def take(self, cache: KVCache) -> KVCache:
        for k, v in cache:
            for t in (k, v):
                self._charge(t.numel() * t.element_size())
                weakref.finalize(t, self._release, t.numel() * t.element_size())
        return cache

    def check(self, nbytes: int) -> None:
        """Raise OutOfDeviceMemory unless nbytes more fit."""
        if nbytes > self.capacity - self.used:
            raise OutOfDeviceMemory(
                f"sim: {self.what} of {_fmt(nbytes)} does not fit: capacity {_fmt(self.capacity)}, "
                f"in use {_fmt(self.used)}, free {_fmt(self.capacity - self.used)} "
                f"(set {self.env} higher, or ask for fewer blocks)")

    def _charge(self, nbytes: int) -> None:
        with self._lock:
            self.used += nbytes

    def _release(self, nbytes: int) -> None:
        with self._lock:
            self.used -= nbytes


class SimDriver(CpuDriver):
    name = "sim"
    priority = -1  # a test device: "auto" never picks it over a real one

    def __init__(self, memory: int | str | None = None, host_memory: int | str | None = None):
        super().__init__()
        memory = parse_size(memory or os.environ.get(MEMORY_ENV) or DEFAULT_MEMORY, "sim memory")
        host_memory = parse_size(host_memory or os.environ.get(HOST_MEMORY_ENV) or memory,
                                 "sim host memory")
        self.device_pool = Pool("KV cache", memory, MEMORY_ENV)
        self.host_pool = Pool("swap pool", host_memory, HOST_MEMORY_ENV)

    def memory_info(self) -> tuple[int, int]:
        pool = self.device_pool
        return pool.capacity - pool.used, pool.capacity

    def allocate_kv_cache(self, num_layers, num_blocks, block_size, num_kv_heads, head_dim,
                          dtype) -> KVCache:
        self.capabilities.check(dtype, block_size)  # a bad dtype is not an out-of-memory
        self.device_pool.check(_bytes(num_layers, num_blocks, block_size, num_kv_heads,
                                      head_dim, dtype))
        return self.device_pool.take(super().allocate_kv_cache(
            num_layers, num_blocks, block_size, num_kv_heads, head_dim, dtype))

    def allocate_swap(self, num_layers, num_blocks, block_size, num_kv_heads, head_dim,
                      dtype) -> KVCache:
        self.capabilities.check(dtype, block_size)
        self.host_pool.check(_bytes(num_layers, num_blocks, block_size, num_kv_heads,
                                    head_dim, dtype))
        return self.host_pool.take(super().allocate_swap(
            num_layers, num_blocks, block_size, num_kv_heads, head_dim, dtype))


def _bytes(num_layers, num_blocks, block_size, num_kv_heads, head_dim, dtype) -> int:
    elem = torch.empty((), dtype=dtype).element_size()
    return 2 * num_layers * num_blocks * block_size * num_kv_heads * head_dim * elem


def _fmt(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB" if n >= 1 << 20 else f"{n} B"


__all__ = ["SimDriver", "parse_size", "MEMORY_ENV", "HOST_MEMORY_ENV"]
