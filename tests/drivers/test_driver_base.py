"""The Driver base class's defaults: the swap pool and swap_out / swap_in, capabilities,
and CPU pools that take memory only as they are written."""
import gc
import mmap

import psutil
import pytest
import torch

from llmos.drivers import Capabilities, CpuDriver, get_driver

LAYERS, BS, HKV, D = 3, 4, 2, 8


def filled_pool(drv, num_blocks, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    caches = drv.allocate_kv_cache(LAYERS, num_blocks, BS, HKV, D, dtype)
    for k, v in caches:
        k.copy_(torch.randn(k.shape, generator=gen))
        v.copy_(torch.randn(v.shape, generator=gen))
    return caches


@pytest.fixture(params=["cpu", "sim"])
def drv(request):
    return get_driver(request.param)


def test_allocate_swap_is_host_memory_of_the_pool_layout(drv):
    host = drv.allocate_swap(LAYERS, 5, BS, HKV, D, torch.bfloat16)
    assert len(host) == LAYERS
    for k, v in host:
        for t in (k, v):
            assert t.shape == (5, BS, HKV, D) and t.dtype == torch.bfloat16
            assert t.device.type == "cpu" and not t.any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("as_tensor", [False, True])
def test_swap_round_trip(drv, dtype, as_tensor):
    caches = filled_pool(drv, 8, dtype)
    before = [(k.clone(), v.clone()) for k, v in caches]
    host = drv.allocate_swap(LAYERS, 4, BS, HKV, D, dtype)
    dev_out, host_blocks, dev_in = [5, 2, 7], [0, 3, 1], [1, 4, 6]
    if as_tensor:
        dev_out, host_blocks, dev_in = (torch.tensor(b, dtype=torch.int32)
                                        for b in (dev_out, host_blocks, dev_in))
    drv.swap_out(caches, host, dev_out, host_blocks)
    for (k, v), (kh, vh) in zip(before, host):
        assert torch.equal(kh[[0, 3, 1]], k[[5, 2, 7]]) and torch.equal(vh[[0, 3, 1]], v[[5, 2, 7]])
        assert not kh[2].any() and not vh[2].any()  # host block 2 untouched
    for k, v in caches:  # the swapped-out blocks are free for reuse
        k[[5, 2, 7]] = 0
        v[[5, 2, 7]] = 0
    drv.swap_in(caches, host, host_blocks, dev_in)
    for (k, v), (k0, v0) in zip(caches, before):
        assert torch.equal(k[[1, 4, 6]], k0[[5, 2, 7]]) and torch.equal(v[[1, 4, 6]], v0[[5, 2, 7]])
        for blk in (0, 3):  # neither swapped nor reused
            assert torch.equal(k[blk], k0[blk]) and torch.equal(v[blk], v0[blk])


def test_swapped_in_blocks_attend_like_the_originals():
    """A sequence swapped out, its blocks poisoned, then swapped into other blocks, gives
    the same attention output through its new block table."""
    drv = CpuDriver()
    caches = filled_pool(drv, 8)
    (k, v), = caches[:1]
    q = torch.randn(1, 4, D)
    seq_lens, qsl = torch.tensor([10], dtype=torch.int32), torch.tensor([0, 1], dtype=torch.int32)
    table = torch.tensor([[6, 0, 3]], dtype=torch.int32)
    o = drv.paged_attention(q, k, v, table, seq_lens, qsl, 0.3)
    host = drv.allocate_swap(LAYERS, 3, BS, HKV, D, torch.float32)
    drv.swap_out(caches, host, [6, 0, 3], [2, 0, 1])
    drv.poison_blocks(caches, [6, 0, 3])
    drv.swap_in(caches, host, [2, 0, 1], [1, 5, 7])
    o2 = drv.paged_attention(q, k, v, torch.tensor([[1, 5, 7]], dtype=torch.int32), seq_lens,
                             qsl, 0.3)
    torch.testing.assert_close(o2, o, atol=0, rtol=0)


def test_swap_nothing_and_mismatched_lengths(drv):
    caches = filled_pool(drv, 4)
    host = drv.allocate_swap(LAYERS, 4, BS, HKV, D, torch.float32)
    drv.swap_out(caches, host, [], [])
    drv.swap_in(caches, host, torch.tensor([], dtype=torch.int64), [])
    assert not any(t.any() for pair in host for t in pair)
    with pytest.raises(ValueError, match="2 source blocks but 1 destination"):
        drv.swap_out(caches, host, [0, 1], [0])
    with pytest.raises(ValueError, match="1 source blocks but 2 destination"):
        drv.swap_in(caches, host, [0], [0, 1])


def test_capabilities_default_and_refusal():
    caps = CpuDriver.capabilities
    assert torch.float32 in caps.dtypes and torch.bfloat16 in caps.dtypes
    assert caps.block_sizes is None  # any block size
    strict = Capabilities(dtypes=(torch.float16,), block_sizes=(16, 32))
    strict.check(torch.float16, 32)
    with pytest.raises(ValueError, match="dtype float32 .*float16"):
        strict.check(torch.float32, 16)
    with pytest.raises(ValueError, match="block size 8 .*16, 32"):
        strict.check(torch.float16, 8)


def test_allocate_kv_cache_checks_capabilities():
    class Strict(CpuDriver):
        name = "strict"
        capabilities = Capabilities(block_sizes=(16,))
    with pytest.raises(ValueError, match="block size 4"):
        Strict().allocate_kv_cache(1, 2, 4, 1, 8, torch.float32)
    with pytest.raises(ValueError, match="block size 4"):
        Strict().allocate_swap(1, 2, 4, 1, 8, torch.float32)


# ---- CPU pools are committed lazily ---------------------------------------------------

lazy = pytest.mark.skipif(not hasattr(mmap, "MAP_PRIVATE"),
                          reason="no private anonymous mmap: CPU pools are zero-filled here")


@lazy
@pytest.mark.parametrize("allocate", ["allocate_kv_cache", "allocate_swap"])
def test_big_cpu_pool_reads_as_zeros_and_costs_memory_only_where_written(allocate):
    rss = lambda: psutil.Process().memory_info().rss  # noqa: E731
    before = rss()
    layers, blocks, bs, hkv, d = 4, 4096, 16, 2, 64  # 2 x 4 x 32 MiB in float32
    pool = getattr(get_driver("cpu"), allocate)(layers, blocks, bs, hkv, d, torch.float32)
    tensors = [t for pair in pool for t in pair]
    assert sum(t.numel() * t.element_size() for t in tensors) == 256 << 20
    assert all(t.is_contiguous() and t.shape == (blocks, bs, hkv, d) for t in tensors)
    assert rss() - before < 32 << 20, "allocating the pool committed its memory"
    # Every byte reads as zero, and reading commits nothing. (In chunks: a whole-tensor
    # any() makes a temporary the allocator may keep, which would count here.)
    assert not any(chunk.any() for t in tensors for chunk in t.split(256))
    assert rss() - before < 32 << 20, "reading the zero pool committed its memory"
    for t in tensors:  # writing one block commits about that block
        t[7].fill_(1.5)
    assert rss() - before < 32 << 20
    assert all(t[7].eq(1.5).all() and not t[:7].any() and not t[8:].any() for t in tensors)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cpu_pool_outlives_the_pool_while_a_view_of_it_is_held(dtype):
    (k, v), = get_driver("cpu").allocate_kv_cache(1, 32, BS, HKV, D, dtype)
    assert k.dtype == v.dtype == dtype and not k.any() and not v.any()
    block = k[5]
    del k, v
    gc.collect()
    block.fill_(3)  # the memory under the view is still mapped
    assert block.eq(3).all() and block.dtype == dtype
