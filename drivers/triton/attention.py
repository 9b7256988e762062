"""Paged attention in Triton: one kernel for mixed batches of prefill chunks and decodes.

A program owns one tile of a sequence's new tokens (BLOCK_Q tokens x the G query heads
that share one KV head, packed into BLOCK_M rows, so each K/V tile is loaded once for
all of them) and walks that sequence's KV through its block table, TILE_N positions at
a time, with an online softmax in float32 (flash attention). Rows are (token, head):
row r is token r // G, head kv_head * G + r % G.

Programs map to tiles without a host sync: sequence s's tiles start at
query_start_loc[s] // BLOCK_Q + s, which leaves at least cdiv(q_len, BLOCK_Q) tiles per
sequence; a program finds its sequence by binary search and spare programs exit.

Split-K (flash decoding): with few programs and long contexts, a third grid axis cuts
each tile's KV range into NUM_SEGMENTS segments; each writes its partial (max, sum, acc)
and a second kernel combines them. Scores are kept in base 2 (exp2), scale folded in.

Nothing past a sequence's seq_len is read, neither table entries nor slots, so poisoned
(NaN) free blocks and garbage block ids never reach the result.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

LOG2E = 1.4426950408889634
SPLIT_MIN_LEN = 1024     # auto split-K only when a sequence may hold this many tokens
SPLIT_MAX_SEGMENTS = 16  # auto: at most this many segments per tile
SPLIT_MIN_TILES = 4      # auto: at least this many KV tiles per segment
CPU_SM_COUNT = 8         # "SMs" assumed off-GPU (the interpreter), for the heuristic only


@triton.jit
def _find_seq(qsl_ptr, tile, num_seqs, BLOCK_Q: tl.constexpr):
    # the last s with qsl[s] // BLOCK_Q + s <= tile
    lo: tl.int32 = 0  # typed: a loop-carried variable may not start as a constexpr
    hi: tl.int32 = num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        if tl.load(qsl_ptr + mid) // BLOCK_Q + mid <= tile:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


@triton.jit
def _attn_kernel(q_ptr, k_ptr, v_ptr, o_ptr, bt_ptr, seq_lens_ptr, qsl_ptr,
                 part_m_ptr, part_l_ptr, part_acc_ptr,
                 qk_scale, num_seqs,
                 stride_qt, stride_qh, stride_ot, stride_oh, stride_bt,
                 stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
                 H: tl.constexpr, G: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr,
                 BLOCK_SIZE: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr,
                 TILE_N: tl.constexpr, NUM_SEGMENTS: tl.constexpr, DOT_F32: tl.constexpr):
    # grid: (query tiles, Hkv, NUM_SEGMENTS)
    tile = tl.program_id(0)
    kvh = tl.program_id(1)
    seg = tl.program_id(2)
    seq = _find_seq(qsl_ptr, tile, num_seqs, BLOCK_Q)
    q_start = tl.load(qsl_ptr + seq)
    q_len = tl.load(qsl_ptr + seq + 1) - q_start
    q_tile = tile - (q_start // BLOCK_Q + seq)
    if q_tile * BLOCK_Q >= q_len:  # a spare tile
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    ctx = seq_len - q_len  # cached tokens before the new ones

    r = tl.arange(0, BLOCK_M)
    qi = q_tile * BLOCK_Q + r // G                       # [BLOCK_M] new-token index
    head = kvh * G + r % G                               # [BLOCK_M] query head
    row_ok = (r // G < BLOCK_Q) & (qi < q_len)
    d = tl.arange(0, D_PAD)
    d_ok = d < D
    t = (q_start + qi).to(tl.int64)                      # [BLOCK_M] row of q and o
    q = tl.load(q_ptr + t[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)  # [BLOCK_M, D_PAD]
    q = q.to(k_ptr.dtype.element_ty)
    q_pos = ctx + qi                                     # [BLOCK_M] position of each row

    # KV positions this tile needs: 0 .. position of its last new token
    kv_end = ctx + tl.minimum((q_tile + 1) * BLOCK_Q, q_len)
    n_tiles = tl.cdiv(kv_end, TILE_N)
    per_seg = tl.cdiv(n_tiles, NUM_SEGMENTS)
    j_lo = seg * per_seg
    j_hi = tl.minimum(j_lo + per_seg, n_tiles)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D_PAD], tl.float32)
    for j in range(j_lo, j_hi):
        pos = j * TILE_N + tl.arange(0, TILE_N)          # [TILE_N]
        live = pos < kv_end
        blk = tl.load(bt_ptr + seq * stride_bt + pos // BLOCK_SIZE, mask=live, other=0)
        blk = blk.to(tl.int64)
        off = pos % BLOCK_SIZE
        kv_ok = live[:, None] & d_ok[None, :]
        k = tl.load(k_ptr + blk[:, None] * stride_kb + off[:, None] * stride_ks
                    + kvh * stride_kh + d[None, :], mask=kv_ok, other=0.0)  # [TILE_N, D_PAD]
        v = tl.load(v_ptr + blk[:, None] * stride_vb + off[:, None] * stride_vs
                    + kvh * stride_vh + d[None, :], mask=kv_ok, other=0.0)  # [TILE_N, D_PAD]
        if DOT_F32:
            s = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        s = s * qk_scale                                 # [BLOCK_M, TILE_N], base 2
        seen = (pos[None, :] <= q_pos[:, None]) & live[None, :]
        s = tl.where(seen, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing seen yet
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        p_v = p.to(v.dtype)  # as the tensor cores would take it
        if DOT_F32:
            pv = tl.dot(p_v.to(tl.float32), v.to(tl.float32), input_precision="ieee")
        else:
            pv = tl.dot(p_v, v)
        acc = acc * alpha[:, None] + pv
        m_i = m_new

    if NUM_SEGMENTS == 1:
        o = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        tl.store(o_ptr + t[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :],
                 o.to(o_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    else:
        part = (t * H + head) * NUM_SEGMENTS + seg       # [BLOCK_M] into [T, H, NUM_SEGMENTS]
        tl.store(part_m_ptr + part, m_i, mask=row_ok)
        tl.store(part_l_ptr + part, l_i, mask=row_ok)
        tl.store(part_acc_ptr + part[:, None] * D + d[None, :], acc,
                 mask=row_ok[:, None] & d_ok[None, :])


@triton.jit
def _reduce_kernel(o_ptr, part_m_ptr, part_l_ptr, part_acc_ptr, stride_ot, stride_oh,
                   H: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr,
                   NUM_SEGMENTS: tl.constexpr):
    # grid: (T, H); combines the segments' partials of one (token, head)
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    part = (t * H + h) * NUM_SEGMENTS + tl.arange(0, NUM_SEGMENTS)  # [NUM_SEGMENTS]
    m = tl.load(part_m_ptr + part)
    l = tl.load(part_l_ptr + part)
    m_max = tl.max(m, 0)  # finite: every token sees at least itself
    w = tl.exp2(m - m_max)  # empty segments (m = -inf) weigh 0
    d = tl.arange(0, D_PAD)
    acc = tl.load(part_acc_ptr + part[:, None] * D + d[None, :], mask=d[None, :] < D,
                  other=0.0)  # [NUM_SEGMENTS, D_PAD]
    o = tl.sum(acc * w[:, None], 0) / tl.sum(l * w, 0)
    tl.store(o_ptr + t * stride_ot + h * stride_oh + d, o.to(o_ptr.dtype.element_ty),
             mask=d < D)


def paged_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor,
                    seq_lens: Tensor, query_start_loc: Tensor, scale: float, *,
                    split_k: bool | None = None, num_segments: int | None = None) -> Tensor:
    """Attention of the new tokens over their sequences' cached KV; returns o [T, H, D].

    Shapes and semantics as Driver.paged_attention (drivers/base.py). split_k: None picks
    by a heuristic (few programs, long tables), True forces flash decoding with
    num_segments (a power of two; default 4) segments, False never splits. Nothing here
    syncs with the device: every choice uses shapes only.
    """
    T, H, D = q.shape
    S = seq_lens.shape[0]
    Hkv, bs = k_cache.shape[2], k_cache.shape[1]
    o = torch.empty_like(q)
    if T == 0 or S == 0:
        return o
    assert H % Hkv == 0 and q.stride(2) == 1 and k_cache.stride(3) == 1 and v_cache.stride(3) == 1
    G = H // Hkv
    decode = T == S  # one new token per sequence (or close): small query tiles
    BLOCK_M = max(16 if decode else 64, triton.next_power_of_2(G))
    BLOCK_Q = BLOCK_M // G
    # float32 tiles are twice the bytes: keep them (and the pipeline) within shared memory
    TILE_N = 32 if decode or k_cache.dtype == torch.float32 else 64
    num_tiles = T // BLOCK_Q + S
    nseg = _num_segments(min(num_tiles, T) * Hkv, block_tables.shape[1] * bs, TILE_N, q.device,
                         split_k, num_segments)
    if nseg > 1:
        part_m = torch.empty(T, H, nseg, dtype=torch.float32, device=q.device)
        part_l = torch.empty_like(part_m)
        part_acc = torch.empty(T, H, nseg, D, dtype=torch.float32, device=q.device)
    else:
        part_m = part_l = part_acc = o  # unused
    # float32 caches: exact float32 dots (tf32 would miss float32 tolerances). Off the GPU
    # (the interpreter) too: its dot multiplies bfloat16's raw bits as integers.
    dot_f32 = k_cache.dtype == torch.float32 or q.device.type != "cuda"
    _attn_kernel[(num_tiles, Hkv, nseg)](
        q, k_cache, v_cache, o, block_tables, seq_lens, query_start_loc,
        part_m, part_l, part_acc, scale * LOG2E, S,
        q.stride(0), q.stride(1), o.stride(0), o.stride(1), block_tables.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        H=H, G=G, D=D, D_PAD=max(16, triton.next_power_of_2(D)), BLOCK_SIZE=bs,
        BLOCK_Q=BLOCK_Q, BLOCK_M=BLOCK_M, TILE_N=TILE_N, NUM_SEGMENTS=nseg, DOT_F32=dot_f32,
        num_warps=4, num_stages=2)
    if nseg > 1:
        _reduce_kernel[(T, H)](o, part_m, part_l, part_acc, o.stride(0), o.stride(1),
                               H=H, D=D, D_PAD=triton.next_power_of_2(D), NUM_SEGMENTS=nseg)
    return o


def _num_segments(programs: int, max_len: int, tile_n: int, device: torch.device,
                  split_k: bool | None, num_segments: int | None) -> int:
    """Segments per tile: 1 without split-K. max_len bounds any sequence's length."""
    if split_k is False:
        return 1
    if split_k:
        n = num_segments or 4
        assert n & (n - 1) == 0, f"num_segments must be a power of two, not {n}"
        return n
    if max_len < SPLIT_MIN_LEN:
        return 1
    target = 2 * _sm_count(device)  # enough programs for two waves
    n = min(SPLIT_MAX_SEGMENTS, -(-target // programs), max_len // (tile_n * SPLIT_MIN_TILES))
    return 1 if n < 2 else 1 << (n.bit_length() - 1)  # a power of two, rounded down


_SM_COUNT: dict[torch.device, int] = {}


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return CPU_SM_COUNT
    if device not in _SM_COUNT:
        _SM_COUNT[device] = torch.cuda.get_device_properties(device).multi_processor_count
    return _SM_COUNT[device]
