"""The cpu driver's KV ops against a naive reference (loops over sequences and tokens)."""
import math

import pytest
import torch

from llmos.drivers import CpuDriver, Driver, cpu_attention, get_driver

TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}  # atol against a float64 reference

# (tokens already cached, new tokens) per sequence
SCENARIOS = {
    # lengths 1, block boundaries (16, 32, 48) and one past them, several blocks
    "decode": [(0, 1), (15, 1), (16, 1), (31, 1), (47, 1), (100, 1)],
    "prefill": [(0, 1), (0, 16), (0, 33), (0, 50)],  # 50 < its blocks' 64 slots
    "chunked": [(32, 16), (17, 40), (64, 5)],
    "mixed": [(20, 1), (0, 37), (63, 1), (16, 16), (5, 1), (40, 0), (50, 9)],
}


@pytest.fixture(params=["c", "torch"])
def path(request) -> str:
    """The cpu driver's two attention paths: the C kernel (cpu_attention.py), and the torch
    one it falls back to where no C compiler is found."""
    if request.param == "c" and not cpu_attention.available():
        pytest.skip(f"the C paged attention is not available: {cpu_attention.unavailable_reason()}")
    return request.param


def driver_on(path: str) -> CpuDriver:
    drv = CpuDriver()
    drv.attention_in_c = path == "c"
    return drv


def naive_attention(q, ks, vs, ctx_lens, scale):
    """q [T, H, D]; ks, vs: per sequence [seq_len, Hkv, D]; dense softmax in float64."""
    T, H, _ = q.shape
    out = torch.empty(T, H, q.shape[2], dtype=torch.float64)
    t = 0
    for k, v, ctx in zip(ks, vs, ctx_lens):
        G = H // k.shape[1]
        k = k.double().repeat_interleave(G, dim=1)  # [seq_len, H, D]
        v = v.double().repeat_interleave(G, dim=1)
        for pos in range(ctx, k.shape[0]):
            scores = torch.einsum("hd,lhd->hl", q[t].double(), k[:pos + 1]) * scale
            out[t] = torch.einsum("hl,lhd->hd", torch.softmax(scores, -1), v[:pos + 1])
            t += 1
    return out


def make_batch(scenario, block_size, H, Hkv, D, dtype, seed=0, free_zero=False):
    """Caches full of stale junk, sequences on shuffled blocks, garbage past each table.

    free_zero keeps block 0 out of every sequence (the driver reads it for table garbage).
    """
    gen = torch.Generator().manual_seed(seed)
    drv = CpuDriver()
    seq_lens = [c + n for c, n in scenario]
    need = [math.ceil(n / block_size) for n in seq_lens]
    num_blocks = sum(need) + 7
    (k_cache, v_cache), = drv.allocate_kv_cache(1, num_blocks, block_size, Hkv, D, dtype)
    k_cache.copy_(torch.randn(k_cache.shape, generator=gen) * 5)
    v_cache.copy_(torch.randn(v_cache.shape, generator=gen) * 5)
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    if free_zero:
        perm.remove(0)
    max_blocks = max(need) + 2
    block_tables = torch.randint(-3, 3 * num_blocks, (len(scenario), max_blocks),
                                 generator=gen, dtype=torch.int32)
    ks, vs, slots = [], [], []
    for s, n in enumerate(seq_lens):
        blocks, perm = perm[:need[s]], perm[need[s]:]
        block_tables[s, :need[s]] = torch.tensor(blocks, dtype=torch.int32)
        slots += [blocks[p // block_size] * block_size + p % block_size for p in range(n)]
        ks.append(torch.randn(n, Hkv, D, generator=gen).to(dtype))
        vs.append(torch.randn(n, Hkv, D, generator=gen).to(dtype))
    drv.store_kv(torch.cat(ks), torch.cat(vs), k_cache, v_cache, torch.tensor(slots))
    q_lens = [n for _, n in scenario]
    q = torch.randn(sum(q_lens), H, D, generator=gen).to(dtype)
    qsl = torch.tensor([0] + q_lens, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    return dict(q=q, k_cache=k_cache, v_cache=v_cache, block_tables=block_tables,
                seq_lens=torch.tensor(seq_lens, dtype=torch.int32), query_start_loc=qsl,
                ks=ks, vs=vs, ctx_lens=[c for c, _ in scenario])


def run(drv, b, scale):
    return drv.paged_attention(b["q"], b["k_cache"], b["v_cache"], b["block_tables"],
                               b["seq_lens"], b["query_start_loc"], scale)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("H,Hkv", [(4, 4), (4, 2), (8, 2), (8, 1)])
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_paged_attention_matches_naive(scenario, H, Hkv, D, block_size, dtype):
    """The torch path; the C kernel has the same matrix and more in test_cpu_attention.py."""
    b = make_batch(SCENARIOS[scenario], block_size, H, Hkv, D, dtype)
    scale = D ** -0.5
    o = run(driver_on("torch"), b, scale)
    assert o.shape == b["q"].shape and o.dtype == dtype
    ref = naive_attention(b["q"], b["ks"], b["vs"], b["ctx_lens"], scale)
    torch.testing.assert_close(o.double(), ref, atol=TOL[dtype], rtol=0)


def test_store_kv_skips_minus_one():
    drv = CpuDriver()
    (k_cache, v_cache), = drv.allocate_kv_cache(1, 4, 16, 2, 8, torch.float32)
    k, v = torch.randn(5, 2, 8), torch.randn(5, 2, 8)
    slots = torch.tensor([3, -1, 17, -1, 63])
    drv.store_kv(k, v, k_cache, v_cache, slots)
    flat_k, flat_v = k_cache.view(64, 2, 8), v_cache.view(64, 2, 8)
    for t, slot in enumerate(slots.tolist()):
        if slot >= 0:
            assert torch.equal(flat_k[slot], k[t]) and torch.equal(flat_v[slot], v[t])
    untouched = [i for i in range(64) if i not in (3, 17, 63)]
    assert not flat_k[untouched].any() and not flat_v[untouched].any()


def test_store_kv_casts_to_cache_dtype():
    drv = CpuDriver()
    (k_cache, v_cache), = drv.allocate_kv_cache(1, 2, 16, 1, 4, torch.bfloat16)
    k = torch.randn(2, 1, 4)
    drv.store_kv(k, k, k_cache, v_cache, torch.tensor([0, 20]))
    assert torch.equal(k_cache.view(32, 1, 4)[20], k[1].bfloat16())


def test_allocate_kv_cache_shapes():
    caches = CpuDriver().allocate_kv_cache(3, 10, 16, 2, 64, torch.bfloat16)
    assert len(caches) == 3
    for k_cache, v_cache in caches:
        for c in (k_cache, v_cache):
            assert c.shape == (10, 16, 2, 64) and c.dtype == torch.bfloat16 and not c.any()
    assert caches[0][0].data_ptr() != caches[1][0].data_ptr()


@pytest.mark.parametrize("as_list", [False, True])
def test_copy_blocks(as_list):
    drv = CpuDriver()
    caches = drv.allocate_kv_cache(2, 6, 4, 2, 8, torch.float32)
    for k_cache, v_cache in caches:
        k_cache.copy_(torch.randn(k_cache.shape))
        v_cache.copy_(torch.randn(v_cache.shape))
    before = [(k.clone(), v.clone()) for k, v in caches]
    src, dst = [0, 2, 2], [5, 3, 1]
    if not as_list:
        src, dst = torch.tensor(src), torch.tensor(dst)
    drv.copy_blocks(caches, src, dst)
    for (k, v), (k0, v0) in zip(caches, before):
        for s, d in [(0, 5), (2, 3), (2, 1)]:
            assert torch.equal(k[d], k0[s]) and torch.equal(v[d], v0[s])
        for blk in (0, 2, 4):
            assert torch.equal(k[blk], k0[blk]) and torch.equal(v[blk], v0[blk])


def test_copy_blocks_reads_before_writes():
    drv = CpuDriver()
    caches = drv.allocate_kv_cache(1, 3, 2, 1, 2, torch.float32)
    k, v = caches[0]
    k.copy_(torch.arange(12.0).view(k.shape))
    k0 = k.clone()
    drv.copy_blocks(caches, [0, 1], [1, 2])  # block 1 is both a source and a destination
    assert torch.equal(k[1], k0[0]) and torch.equal(k[2], k0[1])


def test_poison_blocks_fills_nan():
    drv = CpuDriver()
    caches = drv.allocate_kv_cache(2, 4, 16, 2, 8, torch.float32)
    drv.poison_blocks(caches, [1, 3])
    for k, v in caches:
        for c in (k, v):
            assert c[[1, 3]].isnan().all() and not c[[0, 2]].isnan().any()


def test_poisoned_block_in_use_yields_nan_only_there(path):
    drv = driver_on(path)
    b = make_batch(SCENARIOS["mixed"], 16, 4, 2, 64, torch.float32)
    victim = 3  # the (16, 16) sequence: two full blocks
    blk = int(b["block_tables"][victim, 1])
    drv.poison_blocks([(b["k_cache"], b["v_cache"])], [blk])
    o = run(drv, b, 0.125)
    qsl = b["query_start_loc"].tolist()
    rows = torch.zeros(o.shape[0], dtype=torch.bool)
    rows[qsl[victim]:qsl[victim + 1]] = True
    assert o[rows].isnan().all()
    assert not o[~rows].isnan().any()


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_poisoned_free_blocks_do_not_leak(scenario, path):
    """NaN in blocks a sequence does not own (table garbage, block 0, tail slots) stays out."""
    drv = driver_on(path)
    b = make_batch(SCENARIOS[scenario], 16, 4, 2, 64, torch.float32, free_zero=True)
    seq_lens, bt = b["seq_lens"].tolist(), b["block_tables"]
    owned = {int(bt[s, i]) for s, n in enumerate(seq_lens) for i in range(math.ceil(n / 16))}
    free = [i for i in range(b["k_cache"].shape[0]) if i not in owned]
    assert 0 in free
    caches = [(b["k_cache"], b["v_cache"])]
    drv.poison_blocks(caches, free)
    for s, n in enumerate(seq_lens):  # slots past each sequence's end in its last block
        if n % 16:
            last = int(bt[s, n // 16])
            b["k_cache"][last, n % 16:] = float("nan")
            b["v_cache"][last, n % 16:] = float("nan")
        bt[s, math.ceil(n / 16):] = free[s % len(free)]  # table garbage points at poison
    o = run(drv, b, 0.125)
    assert not o.isnan().any()
    ref = naive_attention(b["q"], b["ks"], b["vs"], b["ctx_lens"], 0.125)
    torch.testing.assert_close(o.double(), ref, atol=1e-5, rtol=0)


def test_get_driver():
    assert isinstance(get_driver(), CpuDriver) and isinstance(get_driver("auto"), Driver)
    assert get_driver("cpu").name == "cpu"
    with pytest.raises(ValueError, match="'nope'.*cpu"):
        get_driver("nope")
