"""Zero-filled KV pools: per layer a (k, v) pair, committed lazily on the CPU."""
from __future__ import annotations

import mmap

import torch
from torch import Tensor


def zeroed_pool(num_layers: int, shape: tuple[int, ...], dtype: torch.dtype,
                device: torch.device) -> list[tuple[Tensor, Tensor]]:
    return [(zero_tensor(shape, dtype, device), zero_tensor(shape, dtype, device))
            for _ in range(num_layers)]


def zero_tensor(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """torch.zeros(shape), lazily committed on the CPU.

    torch.zeros writes every byte, so a pool costs its full size in resident memory at
    once. On the CPU the tensor is instead backed by a private anonymous mapping: the OS
    hands out zero pages and commits one only when it is first written, so the resident
    size of a pool follows the blocks actually used. (Private, not mmap's default shared:
    a read of a shared anonymous page commits it, and a forked child would share it.)
    torch.frombuffer holds a reference to the mapping, so it lives as long as any view of
    the tensor and is unmapped after the last one goes. Other devices use torch.zeros.
    """
    device = torch.device(device)
    nbytes = dtype.itemsize
    for n in shape:
        nbytes *= n
    if device.type != "cpu" or nbytes == 0 or not hasattr(mmap, "MAP_PRIVATE"):
        return torch.zeros(shape, dtype=dtype, device=device)  # empty, or no mmap flags (Windows)
    buf = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    # As bytes, then reinterpreted: frombuffer reads any buffer as uint8, whatever the dtype.
    return torch.frombuffer(buf, dtype=torch.uint8).view(dtype).view(shape)
