"""The cpu driver: the KV ops in plain torch, vectorized over sequences and tokens.

paged_attention gathers each sequence's blocks into a padded [S, L, Hkv, D] tensor and
runs one scaled_dot_product_attention per group of sequences: decode sequences (one new
token) in one group, prefill chunks in the other, so a long chunk does not pad every
decode query to its length.
"""
from __future__ import annotations

import psutil
import torch
import torch.nn.functional as F
from torch import Tensor

from .base import Driver


class CpuDriver(Driver):
    name = "cpu"
    device = torch.device("cpu")

    @classmethod
    def is_available(cls) -> bool:
        return True

    def memory_info(self) -> tuple[int, int]:
        mem = psutil.virtual_memory()
        return mem.available, mem.total

    def store_kv(self, k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor,
                 slot_mapping: Tensor) -> None:
        slots = slot_mapping.long()
        skip = slots < 0
        if bool(skip.any()):
            keep = ~skip
            k, v, slots = k[keep], v[keep], slots[keep]
        # view, not reshape: a copy would silently drop the write
        k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slots, k.to(k_cache.dtype))
        v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slots, v.to(v_cache.dtype))

    def paged_attention(self, q: Tensor, k_cache: Tensor, v_cache: Tensor,
                        block_tables: Tensor, seq_lens: Tensor, query_start_loc: Tensor,
                        scale: float) -> Tensor:
        starts = query_start_loc[:-1].long()
        q_lens = query_start_loc[1:].long() - starts
        seq_lens = seq_lens.long()
        lens = q_lens.tolist()
        if lens and min(lens) == 1 and max(lens) == 1:  # pure decode: rows are q in order
            o = _attend(q, k_cache, v_cache, block_tables, seq_lens, starts, q_lens, 1, scale)
            return o.reshape(q.shape).to(q.dtype)
        out = torch.empty_like(q)
        for group in (q_lens == 1, q_lens > 1):
            idx = group.nonzero().squeeze(1)
            if idx.numel() == 0:
                continue
            g_starts, g_q_lens = starts[idx], q_lens[idx]
            max_q = int(g_q_lens.max())
            o = _attend(q, k_cache, v_cache, block_tables[idx], seq_lens[idx],
                        g_starts, g_q_lens, max_q, scale)  # [Sg, max_q, H, D]
            j = torch.arange(max_q)
            real = j[None] < g_q_lens[:, None]  # [Sg, max_q]
            out[(g_starts[:, None] + j[None])[real]] = o[real].to(q.dtype)
        return out


def _gather_kv(k_cache: Tensor, v_cache: Tensor, block_tables: Tensor, seq_lens: Tensor,
               dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Each sequence's K and V through its block table, padded: [S, Hkv, L, D] in dtype.

    L is max(seq_lens) rounded up to whole blocks; slots past a sequence's end are zero.
    """
    S = seq_lens.shape[0]
    _, bs, Hkv, D = k_cache.shape
    nb = -(-int(seq_lens.max()) // bs)
    L = nb * bs
    # Table entries past a sequence's blocks hold any value: read block 0 instead.
    blk = torch.arange(nb)
    bt = torch.where(blk[None] * bs < seq_lens[:, None], block_tables[:, :nb].long(), 0)
    bt = bt.flatten()
    k = k_cache.index_select(0, bt).view(S, L, Hkv, D).to(dtype)  # fresh: safe to write
    v = v_cache.index_select(0, bt).view(S, L, Hkv, D).to(dtype)
    # Slots past seq_len may hold NaN (a poisoned free block) and 0 * NaN would leak
    # through the softmax, so zero them. Positions below the shortest length are live.
    lo = int(seq_lens.min())
    if lo < L:
        dead = (torch.arange(lo, L)[None] >= seq_lens[:, None])[:, :, None, None]
        k[:, lo:].masked_fill_(dead, 0)
        v[:, lo:].masked_fill_(dead, 0)
    return k.transpose(1, 2), v.transpose(1, 2)


def _attend(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor,
            seq_lens: Tensor, starts: Tensor, q_lens: Tensor, max_q: int,
            scale: float) -> Tensor:
    """Attention for one group of S sequences; returns o padded to [S, max_q, H, D].

    Padded query rows (j >= q_len) are computed and dropped by the caller; none is
    fully masked, so none makes NaN.
    """
    S = seq_lens.shape[0]
    _, H, D = q.shape
    G = H // k_cache.shape[2]
    cdt = torch.promote_types(q.dtype, torch.float32)  # bf16/fp16 computed in float32
    k, v = _gather_kv(k_cache, v_cache, block_tables, seq_lens, cdt)  # [S, Hkv, L, D]
    pos = torch.arange(k.shape[2])

    # Query j of a sequence sits at seq_len - q_len + j and sees keys up to there.
    j = torch.arange(max_q)
    rows = torch.where(j[None] < q_lens[:, None], starts[:, None] + j[None], 0)  # [S, max_q]
    qp = q.index_select(0, rows.flatten()).view(S, max_q, H, D).to(cdt)  # padded rows: token 0
    if max_q == 1:
        # Decode: fold a KV head's G query heads into the query axis (one pass over K, V).
        mask = (pos[None] < seq_lens[:, None])[:, None, None]  # [S, 1, 1, L]
        o = F.scaled_dot_product_attention(qp.view(S, -1, G, D), k, v, attn_mask=mask,
                                           scale=scale)  # [S, Hkv, G, D]
        return o.reshape(S, 1, H, D)
    if bool((seq_lens == q_lens).all()):
        # No cached prefix: plain (top-left) causal, which lets SDPA skip the upper
        # triangle. Padded rows see zeroed keys but never make NaN.
        mask, causal = None, True
    else:
        # Padded rows are clamped to the last real key, so no row is fully masked.
        qpos = torch.minimum(seq_lens[:, None] - q_lens[:, None] + j[None], seq_lens[:, None] - 1)
        mask, causal = (pos[None, None, :] <= qpos[:, :, None])[:, None], False  # [S, 1, max_q, L]
    o = F.scaled_dot_product_attention(qp.transpose(1, 2), k, v, attn_mask=mask, is_causal=causal,
                                       scale=scale, enable_gqa=True)  # [S, H, max_q, D]
    return o.transpose(1, 2)
