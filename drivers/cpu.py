"""The cpu driver: Linear layers through oneDNN, paged attention in C, the rest in torch.

paged_attention runs the C kernel of cpu_attention.py, which reads each sequence's KV
blocks in place through its block table. Where that kernel cannot be built (no C
compiler) or LLMOS_CPU_ATTENTION=torch asks, the torch path here serves: it gathers each
sequence's blocks into a padded [S, L, Hkv, D] tensor and runs one
scaled_dot_product_attention per group of sequences; how a step's batch splits into
groups, and the index tensors that do it, are planned once per step and reused by every
layer.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import psutil
import torch
import torch.nn.functional as F
from torch import Tensor

from . import cpu_attention
from .base import Driver, LinearWeight

CPU_FLAGS_FILE = "/proc/cpuinfo"
BF16_FLAGS = ("avx512_bf16", "amx_bf16")   # either makes bf16 GEMMs faster than fp32 ones


def cpu_flags(path: str = CPU_FLAGS_FILE) -> frozenset[str]:
    """The first CPU's feature flags (empty where /proc/cpuinfo is not there)."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def bf16_support(flags: frozenset[str] | None = None) -> tuple[bool, str]:
    """(True, why) when this CPU computes bf16 natively, else (False, why not)."""
    flags = cpu_flags() if flags is None else flags
    have = [f for f in BF16_FLAGS if f in flags]
    if have:
        return True, f"the CPU has {' and '.join(f.upper().replace('_', '-') for f in have)}"
    return False, "the CPU has neither AVX512-BF16 nor AMX-BF16 (bf16 would be emulated, slower)"


class CpuDriver(Driver):
    name = "cpu"
    device = torch.device("cpu")

    def __init__(self):
        # Set once any block is poisoned (debug mode): from then on, slots past a
        # sequence's end may hold NaN and attention must zero them before use.
        self.poisoned = False
        self._plan_key: tuple | None = None   # the step whose attention plan is cached
        self._plan: list[_Group] = []
        # Built (or found in the user's cache) now, so the first step does not compile.
        self.attention_in_c = cpu_attention.available()

    def poison_blocks(self, caches, blocks) -> None:
        self.poisoned = True
        super().poison_blocks(caches, blocks)

    @classmethod
    def is_available(cls) -> bool:
        return True

    def preferred_dtype(self) -> tuple[torch.dtype, str]:
        ok, why = bf16_support()
        return (torch.bfloat16 if ok else torch.float32), why

    # ---- Linear layers through oneDNN ----------------------------------------------------
    # torch's default F.linear goes to MKL, which on AMD CPUs trails oneDNN: with its
    # weights reordered once at load (its blocked layout), oneDNN reached 128 GFLOP/s
    # against F.linear's 92 on bench/peers.py's 2048^3 peak, and 1.3-2x at batch-16 decode
    # shapes of a 100M model in a quick check; with one row (single-request decode) the two
    # were close. Where oneDNN cannot take the dtype (bf16 on a CPU without AVX-512), the
    # base class's F.linear serves. Quantized weights are the base class's too (int8 with
    # scales: drivers/quant.py); oneDNN's reorder is for float weights only.

    def prepare_linear(self, weight: Tensor, bias: Tensor | None = None,
                       quantize: str | None = None) -> LinearWeight:
        prepared = super().prepare_linear(weight, bias, quantize)
        packed = None if quantize is not None else _mkldnn_pack(prepared.weight)
        return prepared if packed is None else replace(prepared, weight=packed)

    def linear(self, x: Tensor, w: LinearWeight) -> Tensor:
        if not w.weight.is_mkldnn:
            return super().linear(x, w)
        if x.dim() != 2 or not x.is_contiguous():
            return self.linear(x.reshape(-1, w.in_features).contiguous(), w).view(
                *x.shape[:-1], w.out_features)
        return torch.ops.mkldnn._linear_pointwise(x, w.weight, w.bias, "none", [], "")

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
        if self.attention_in_c and q.dtype in cpu_attention.DTYPES and q.dtype == k_cache.dtype:
            return cpu_attention.paged_attention(q, k_cache, v_cache, block_tables, seq_lens,
                                                 query_start_loc, scale)
        # Every layer of a step passes the same metadata tensors: plan once per step.
        key = (block_tables, seq_lens, query_start_loc)
        if self._plan_key is None or any(a is not b for a, b in zip(key, self._plan_key)):
            self._plan_key = key
            self._plan = _plan(block_tables, seq_lens, query_start_loc, k_cache.shape[1])
        groups = self._plan
        if len(groups) == 1 and groups[0].max_q == 1:    # pure decode: rows are q in order
            return _attend(q, k_cache, v_cache, groups[0], scale, self.poisoned).view(q.shape)
        out = torch.empty_like(q)
        for g in groups:
            o = _attend(q, k_cache, v_cache, g, scale, self.poisoned)   # [S, max_q, H, D]
            out[g.out_rows] = o.view(-1, *q.shape[1:])[g.real]
        return out


def _mkldnn_pack(weight: Tensor) -> Tensor | None:
    """weight [out, in] reordered for oneDNN, or None where oneDNN cannot take it."""
    if not (torch.backends.mkldnn.is_available() and weight.dtype in (torch.float32, torch.bfloat16)):
        return None
    try:
        return torch.ops.mkldnn._reorder_linear_weight(weight, None)
    except RuntimeError:      # e.g. bf16 on a CPU without AVX-512: "bf16 path needs ..."
        return None


@dataclass
class _Group:
    """Sequences attended in one SDPA call, padded to S x max_q queries over L keys."""
    S: int
    max_q: int
    L: int
    kv_index: Tensor        # [S * L / block_size] block ids to gather (past the end: block 0)
    seq_lens: Tensor        # [S]
    q_rows: Tensor          # [S * max_q] rows of q (padded rows read row 0)
    real: Tensor            # [S * max_q] bool: which padded rows are real
    out_rows: Tensor        # [real rows] where they go in o
    mask: Tensor | None     # [S, 1, max_q or 1, L] bool, or None for plain causal


def _plan(block_tables: Tensor, seq_lens: Tensor, query_start_loc: Tensor, bs: int
          ) -> list[_Group]:
    """Decode sequences (one new token) form one group, prefill chunks the other, so a
    long chunk does not pad every decode query to its length."""
    starts = query_start_loc[:-1].long()
    q_lens = query_start_loc[1:].long() - starts
    seq_lens = seq_lens.long()
    groups = []
    for sel in (q_lens == 1, q_lens > 1):
        idx = sel.nonzero().squeeze(1)
        if idx.numel():
            groups.append(_plan_group(block_tables[idx], seq_lens[idx], starts[idx],
                                      q_lens[idx], bs))
    return groups


def _plan_group(block_tables, seq_lens, starts, q_lens, bs) -> _Group:
    S = seq_lens.shape[0]
    nb = -(-int(seq_lens.max()) // bs)
    L = nb * bs
    # Table entries past a sequence's blocks hold any value: read block 0 instead.
    blk = torch.arange(nb)
    kv_index = torch.where(blk[None] * bs < seq_lens[:, None], block_tables[:, :nb].long(), 0)
    max_q = int(q_lens.max())
    j = torch.arange(max_q)
    real = j[None] < q_lens[:, None]                                       # [S, max_q]
    rows = starts[:, None] + j[None]
    pos = torch.arange(L)
    if max_q == 1:
        mask = (pos[None] < seq_lens[:, None])[:, None, None]              # [S, 1, 1, L]
    elif bool((seq_lens == q_lens).all()):
        mask = None     # no cached prefix: plain causal lets SDPA skip the upper triangle
    else:
        # Query j sits at seq_len - q_len + j; padded rows are clamped to the last real
        # key, so no row is fully masked (which would make NaN).
        qpos = torch.minimum(seq_lens[:, None] - q_lens[:, None] + j[None], seq_lens[:, None] - 1)
        mask = (pos[None, None, :] <= qpos[:, :, None])[:, None]           # [S, 1, max_q, L]
    return _Group(S, max_q, L, kv_index.flatten(), seq_lens,
                  torch.where(real, rows, 0).flatten(), real.flatten(), rows[real], mask)


def _gather_kv(cache: Tensor, g: _Group, dtype: torch.dtype, zero_dead: bool) -> Tensor:
    """Each sequence's K (or V) through its block table, padded: [S, Hkv, L, D] in dtype.

    With zero_dead, slots past a sequence's end are zeroed: they may hold NaN (a
    poisoned free block) and 0 * NaN would leak through the softmax. Otherwise they hold
    stale but finite values, which the mask removes.
    """
    _, _, Hkv, D = cache.shape
    x = cache.index_select(0, g.kv_index).view(g.S, g.L, Hkv, D).to(dtype)
    lo = int(g.seq_lens.min())
    if zero_dead and lo < g.L:
        dead = (torch.arange(lo, g.L)[None] >= g.seq_lens[:, None])[:, :, None, None]
        x[:, lo:].masked_fill_(dead, 0)
    return x.transpose(1, 2)


def _attend(q: Tensor, k_cache: Tensor, v_cache: Tensor, g: _Group, scale: float,
            zero_dead: bool) -> Tensor:
    """Attention for one group; returns o [S, max_q, H, D] in q's dtype (padded rows too)."""
    _, H, D = q.shape
    G = H // k_cache.shape[2]
    cdt = torch.promote_types(q.dtype, torch.float32)     # bf16/fp16 computed in float32
    k = _gather_kv(k_cache, g, cdt, zero_dead)            # [S, Hkv, L, D]
    v = _gather_kv(v_cache, g, cdt, zero_dead)
    qp = q.index_select(0, g.q_rows).view(g.S, g.max_q, H, D).to(cdt)
    if g.max_q == 1:
        # Decode: fold a KV head's G query heads into the query axis (one pass over K, V).
        o = F.scaled_dot_product_attention(qp.view(g.S, -1, G, D), k, v, attn_mask=g.mask,
                                           scale=scale)   # [S, Hkv, G, D]
        return o.reshape(g.S, 1, H, D).to(q.dtype)
    o = F.scaled_dot_product_attention(qp.transpose(1, 2), k, v, attn_mask=g.mask,
                                       is_causal=g.mask is None, scale=scale,
                                       enable_gqa=True)   # [S, H, max_q, D]
    return o.transpose(1, 2).to(q.dtype)
