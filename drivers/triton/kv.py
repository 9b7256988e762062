"""Triton kernels that move KV data: store_kv (new tokens into their slots) and
copy_blocks (copy-on-write and fork). Semantics are the cpu driver's (drivers/base.py).

Caches are [num_blocks, block_size, Hkv, D], contiguous, as allocate_kv_cache makes them.
"""
from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

COPY_CHUNK = 1024  # elements of one block one copy program moves


@triton.jit
def _store_kv_kernel(k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
                     stride_kt, stride_kh, stride_vt, stride_vh,
                     HKV: tl.constexpr, D: tl.constexpr,
                     HKV_PAD: tl.constexpr, D_PAD: tl.constexpr):
    # one program per new token t: k[t], v[t] [Hkv, D] -> cache slot (-1: skip)
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    h = tl.arange(0, HKV_PAD)
    d = tl.arange(0, D_PAD)
    rows = tl.where(slot >= 0, HKV, 0)  # no rows for a skipped token (a block-shaped mask)
    mask = (h[:, None] < rows) & (d[None, :] < D)
    k = tl.load(k_ptr + t * stride_kt + h[:, None] * stride_kh + d[None, :], mask=mask)
    v = tl.load(v_ptr + t * stride_vt + h[:, None] * stride_vh + d[None, :], mask=mask)
    # a slot is block * block_size + offset, and a contiguous cache is slot-major
    dst = slot * (HKV * D) + h[:, None] * D + d[None, :]
    tl.store(k_cache_ptr + dst, k, mask=mask)
    tl.store(v_cache_ptr + dst, v, mask=mask)


def store_kv(k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor,
             slot_mapping: Tensor) -> None:
    """Write k, v [T, Hkv, D] into the caches at slot_mapping [T] int64; slot -1 is skipped.

    k and v may be strided over T and Hkv; they are cast to the cache dtype.
    """
    T, Hkv, D = k.shape
    if T == 0:
        return
    assert k_cache.is_contiguous() and v_cache.is_contiguous(), "KV caches must be contiguous"
    assert k_cache.shape[2:] == (Hkv, D) and v.shape == k.shape
    # cast in torch (round to nearest even, as the cpu driver; the interpreter's own
    # float32 -> bfloat16 cast truncates); the engine's k, v already have the cache dtype
    k = k.to(k_cache.dtype)
    v = v.to(v_cache.dtype)
    if k.stride(2) != 1:
        k = k.contiguous()
    if v.stride(2) != 1:
        v = v.contiguous()
    _store_kv_kernel[(T,)](
        k, v, k_cache, v_cache, slot_mapping,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        HKV=Hkv, D=D, HKV_PAD=triton.next_power_of_2(Hkv), D_PAD=triton.next_power_of_2(D))


@triton.jit
def _copy_blocks_kernel(ptr_table, src_ptr, dst_ptr, ref_ptr,
                        BLOCK_ELEMS: tl.constexpr, CHUNK: tl.constexpr):
    # program (pair i, cache c, chunk j): elements [j*CHUNK, (j+1)*CHUNK) of block src[i]
    # -> dst[i] in cache c; ptr_table [2 * layers] int64 holds every cache's address
    i = tl.program_id(0)
    c = tl.program_id(1)
    j = tl.program_id(2)
    base = tl.load(ptr_table + c).to(tl.pointer_type(ref_ptr.dtype.element_ty))
    src = tl.load(src_ptr + i).to(tl.int64)
    dst = tl.load(dst_ptr + i).to(tl.int64)
    e = j * CHUNK + tl.arange(0, CHUNK)
    mask = e < BLOCK_ELEMS
    x = tl.load(base + src * BLOCK_ELEMS + e, mask=mask)
    tl.store(base + dst * BLOCK_ELEMS + e, x, mask=mask)


def copy_blocks(caches: list[tuple[Tensor, Tensor]], src: Tensor | Sequence[int],
                dst: Tensor | Sequence[int]) -> None:
    """Copy block src[i] to block dst[i] in every layer, K and V, in one launch.

    src and dst are host lists or tensors (a device tensor costs a sync: the overlap check
    reads them). One launch copies in parallel, so when a block is both a source and a
    destination, "all reads before writes" is kept by falling back to a gather-then-scatter
    in torch; so are caches of mixed dtype or shape, or not contiguous.
    """
    src = [int(b) for b in (src.tolist() if isinstance(src, Tensor) else src)]
    dst = [int(b) for b in (dst.tolist() if isinstance(dst, Tensor) else dst)]
    assert len(src) == len(dst), "src and dst differ in length"
    if not src or not caches:
        return
    tensors = [c for pair in caches for c in pair]  # [2 * layers]
    ref = tensors[0]
    uniform = all(c.is_contiguous() and c.shape == ref.shape and c.dtype == ref.dtype
                  for c in tensors)
    if set(src) & set(dst) or not uniform:
        _copy_blocks_torch(caches, src, dst)
        return
    device = ref.device
    ptrs = torch.tensor([c.data_ptr() for c in tensors], dtype=torch.int64, device=device)
    src_t = torch.tensor(src, dtype=torch.int64, device=device)
    dst_t = torch.tensor(dst, dtype=torch.int64, device=device)
    block_elems = ref[0].numel()
    grid = (len(src), len(tensors), triton.cdiv(block_elems, COPY_CHUNK))
    _copy_blocks_kernel[grid](ptrs, src_t, dst_t, ref, BLOCK_ELEMS=block_elems, CHUNK=COPY_CHUNK)


def _copy_blocks_torch(caches, src: list[int], dst: list[int]) -> None:
    device = caches[0][0].device
    src_t = torch.tensor(src, dtype=torch.int64, device=device)
    dst_t = torch.tensor(dst, dtype=torch.int64, device=device)
    for k_cache, v_cache in caches:
        for c in (k_cache, v_cache):
            c.index_copy_(0, dst_t, c.index_select(0, src_t))  # gather completes first
