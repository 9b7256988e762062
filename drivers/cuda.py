"""The cuda driver: an NVIDIA (or ROCm) GPU through torch, the KV ops as Triton kernels.

Model ops: rms_norm (residual add fused), rope and silu_and_mul are Triton kernels too,
one launch each where torch takes several; linear stays the default F.linear (cuBLAS,
which a Triton GEMM would not beat for dense weights) and embed the default gather.
int8 weights (prepare_linear's quantize) are the default's too: dequantized per call
into a cuBLAS GEMM (drivers/quant.py), which keeps the memory saving but not a speedup.

Importing this module makes no CUDA call and does not import triton: a machine without a
GPU can import it, ask is_available() and read unavailable_reason(). The kernels
(drivers/triton/) are imported when a driver is made.

Swap. The host swap pool is pinned memory, and swap_out / swap_in copy on a stream of
their own with non_blocking copies, so the host thread never waits for a copy. To keep
the Driver contract (blocks may be reused as soon as the call returns), each then makes
the compute stream wait for its copies: GPU-side ordering, not a host sync.
"""
from __future__ import annotations

import importlib.util
from typing import Sequence

import torch
from torch import Tensor

from .base import Driver, KVCache

Blocks = Tensor | Sequence[int]


class CudaDriver(Driver):
    name = "cuda"
    device = torch.device("cuda")   # the instance's is the exact device index

    def __init__(self, device: int | str | torch.device = "cuda"):
        reason = self.unavailable_reason()
        if reason is not None:
            raise RuntimeError(f"the cuda driver is not available: {reason}")
        from . import triton as kernels  # imports triton: not at module import time
        device = torch.device(device)
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        # Triton launches on the current device: one driver (device) per process.
        torch.cuda.set_device(device)
        self.device = device
        self.kernels = kernels
        self._swap_stream: torch.cuda.Stream | None = None  # made on first swap

    @classmethod
    def unavailable_reason(cls) -> str | None:
        """Why this machine cannot run the driver, or None when it can."""
        if not torch.cuda.is_available():
            if torch.version.cuda is None and torch.version.hip is None:
                return f"torch {torch.__version__} is built without CUDA"
            return "no CUDA device is visible (torch.cuda.is_available() is False)"
        if importlib.util.find_spec("triton") is None:
            return "triton is not installed (pip install 'llmos[triton]')"
        return None

    @classmethod
    def is_available(cls) -> bool:
        return cls.unavailable_reason() is None

    def memory_info(self) -> tuple[int, int]:
        return torch.cuda.mem_get_info(self.device)

    def synchronize(self) -> None:
        torch.cuda.synchronize(self.device)

    def preferred_dtype(self) -> tuple[torch.dtype, str]:
        name = torch.cuda.get_device_name(self.device)
        # emulated bfloat16 (before compute capability 8) would be slower than float16
        if torch.cuda.is_bf16_supported(including_emulation=False):
            return torch.bfloat16, f"the {name} computes bfloat16 natively"
        return torch.float16, f"the {name} has no native bfloat16, so float16"

    # ---- KV ops: Triton kernels -------------------------------------------------------

    def store_kv(self, k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor,
                 slot_mapping: Tensor) -> None:
        self.kernels.store_kv(k, v, k_cache, v_cache, slot_mapping)

    def paged_attention(self, q: Tensor, k_cache: Tensor, v_cache: Tensor,
                        block_tables: Tensor, seq_lens: Tensor, query_start_loc: Tensor,
                        scale: float) -> Tensor:
        return self.kernels.paged_attention(q, k_cache, v_cache, block_tables, seq_lens,
                                            query_start_loc, scale)

    def copy_blocks(self, caches: KVCache, src: Blocks, dst: Blocks) -> None:
        """As Driver.copy_blocks; pass src and dst as host lists or CPU tensors (the kernel
        reads them on the host to check for overlap, which a device tensor would sync)."""
        self.kernels.copy_blocks(caches, src, dst)

    # ---- model ops: Triton kernels (linear and embed are the defaults) -------------------

    def rms_norm(self, x: Tensor, weight: Tensor, eps: float,
                 residual: Tensor | None = None) -> Tensor | tuple[Tensor, Tensor]:
        return self.kernels.rms_norm(x, weight, eps, residual)

    def rope(self, q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> None:
        self.kernels.rope(q, k, cos, sin)

    def silu_and_mul(self, x: Tensor) -> Tensor:
        return self.kernels.silu_and_mul(x)

    # ---- swap: device pool <-> pinned host pool -----------------------------------------

    def allocate_swap(self, num_layers: int, num_blocks: int, block_size: int,
                           num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> KVCache:
        """Per layer a (k, v) host pool [num_blocks, block_size, Hkv, D] in pinned memory,
        laid out as the device pool, so one block is one contiguous DMA."""
        shape = (num_blocks, block_size, num_kv_heads, head_dim)
        return [(torch.empty(shape, dtype=dtype, pin_memory=True),
                 torch.empty(shape, dtype=dtype, pin_memory=True))
                for _ in range(num_layers)]

    def swap_out(self, caches: KVCache, host_caches: KVCache, device_blocks: Blocks,
                 host_blocks: Blocks) -> torch.cuda.Event:
        """Copy device block device_blocks[i] to host block host_blocks[i] in every layer.

        Returns at once. The copies start after all work queued so far on the compute
        stream (so KV written by earlier steps goes out) and run on the swap stream; the
        compute stream then waits for them, so later kernels may overwrite the device
        blocks. Call event.synchronize() before reading the host blocks on the CPU.
        """
        return self._swap(caches, host_caches, device_blocks, host_blocks, to_host=True)

    def swap_in(self, caches: KVCache, host_caches: KVCache, host_blocks: Blocks,
                device_blocks: Blocks) -> torch.cuda.Event:
        """Copy host block host_blocks[i] to device block device_blocks[i] in every layer.

        Returns at once; later kernels on the compute stream run after the copies, and
        later swaps (which run on the same swap stream) may reuse the host blocks.
        """
        return self._swap(caches, host_caches, device_blocks, host_blocks, to_host=False)

    def swap_wait(self, event: torch.cuda.Event) -> None:
        """Order all later work on the current stream after a swap; the host does not block."""
        torch.cuda.current_stream(self.device).wait_event(event)

    def _swap(self, caches: KVCache, host_caches: KVCache, blocks_dev: Blocks,
              blocks_host: Blocks, to_host: bool) -> torch.cuda.Event:
        if self._swap_stream is None:
            self._swap_stream = torch.cuda.Stream(self.device)
        stream = self._swap_stream
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for h0, dev in _host_runs(_ints(blocks_host), _ints(blocks_dev)):
                n = len(dev)
                contiguous = dev == list(range(dev[0], dev[0] + n))
                # allocated on the swap stream: freed memory is reused only after these copies
                idx = None if contiguous else _to_device(dev, self.device)
                for layer, host_layer in zip(caches, host_caches):
                    for d_cache, h_cache in zip(layer, host_layer):
                        host = h_cache[h0:h0 + n]
                        if to_host:
                            src = d_cache[dev[0]:dev[0] + n] if contiguous else d_cache.index_select(0, idx)
                            host.copy_(src, non_blocking=True)
                        elif contiguous:
                            d_cache[dev[0]:dev[0] + n].copy_(host, non_blocking=True)
                        else:
                            d_cache.index_copy_(0, idx, host.to(self.device, non_blocking=True))
        event = torch.cuda.Event()
        event.record(stream)
        self.swap_wait(event)
        return event


def _ints(blocks: Blocks) -> list[int]:
    return [int(b) for b in (blocks.tolist() if isinstance(blocks, Tensor) else blocks)]


def _host_runs(host: list[int], dev: list[int]) -> list[tuple[int, list[int]]]:
    """Pairs (host, dev) grouped into runs of consecutive host blocks: [(first host, devs)].

    One run is one contiguous host range, so one DMA per cache tensor."""
    assert len(host) == len(dev), "blocks_host and blocks_dev differ in length"
    runs: list[tuple[int, list[int]]] = []
    for h, d in sorted(zip(host, dev)):
        if runs and h == runs[-1][0] + len(runs[-1][1]):
            runs[-1][1].append(d)
        else:
            runs.append((h, [d]))
    return runs


def _to_device(ints: list[int], device: torch.device) -> Tensor:
    # pinned + non_blocking: a pageable copy would block the host until the stream drains
    return torch.tensor(ints, dtype=torch.int64).pin_memory().to(device, non_blocking=True)
