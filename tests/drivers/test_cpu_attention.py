"""The C paged attention (drivers/cpu_attention.py) against the naive float64 reference.

The numeric tests skip, saying why, where the kernel cannot be built (no compiler, a
failed build, or LLMOS_CPU_ATTENTION=torch); the build-and-cache tests run it in fresh
processes with their own cache folder.
"""
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llmos.drivers import CpuDriver, cpu_attention
from tests.drivers.test_cpu_ops import SCENARIOS, TOL, make_batch, naive_attention

ROOT = Path(__file__).resolve().parents[2]
PROCESS_TIMEOUT = 240    # s: a fresh process imports torch and may compile, on a busy box

needs_kernel = pytest.mark.skipif(
    not cpu_attention.available(),
    reason=f"the C paged attention cannot be used here: {cpu_attention.unavailable_reason()}")


def attend(b, scale, **kw):
    return cpu_attention.paged_attention(b["q"], b["k_cache"], b["v_cache"], b["block_tables"],
                                         b["seq_lens"], b["query_start_loc"], scale, **kw)


def check_against_naive(b, scale, dtype, **kw):
    o = attend(b, scale, **kw)
    assert o.shape == b["q"].shape and o.dtype == dtype
    torch.testing.assert_close(o.double(), reference(b, scale), atol=TOL[dtype], rtol=0)
    return o


def reference(b, scale):
    """The naive attention, on one thread: its hundreds of tiny ops only lose time waking
    a thread pool, most of all on a small, shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return naive_attention(b["q"], b["ks"], b["vs"], b["ctx_lens"], scale)
    finally:
        torch.set_num_threads(threads)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("block_size", [1, 16, 32])
@pytest.mark.parametrize("D", [24, 128])
@pytest.mark.parametrize("H,Hkv", [(4, 4), (4, 2), (8, 2)])    # G = 1, 2, 4
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_matches_naive(scenario, H, Hkv, D, block_size, dtype):
    b = make_batch(SCENARIOS[scenario], block_size, H, Hkv, D, dtype)
    check_against_naive(b, D ** -0.5, dtype)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("H,Hkv,D", [(4, 2, 20), (6, 3, 64), (4, 1, 96), (2, 2, 256),
                                     (32, 2, 32), (80, 1, 16)])   # G up to 80 > a tile's rows
def test_head_shapes(H, Hkv, D, dtype):
    b = make_batch(SCENARIOS["mixed"], 16, H, Hkv, D, dtype, seed=1)
    check_against_naive(b, D ** -0.5, dtype)


@needs_kernel
@pytest.mark.parametrize("threads", [1, 2, 3, 8])
@pytest.mark.parametrize("scenario", [[(6000, 1)], [(2000, 40)], [(3000, 1), (5, 1)],
                                      [(0, 300), (700, 1)]], ids=["decode", "chunk", "two", "pre"])
def test_long_contexts_and_split_keys(scenario, threads):
    """Few tiles and enough work: with several threads the kernel splits each tile's keys
    into parts and merges them (flash-decoding); with one it does not. Same answer."""
    b = make_batch(scenario, 16, 8, 2, 64, torch.float32, seed=2)
    check_against_naive(b, 0.125, torch.float32, num_threads=threads)


@needs_kernel
def test_bf16_output_is_the_rounded_f32_result():
    """bf16 is widened exactly, accumulated in f32, rounded to nearest even at the end."""
    b = make_batch(SCENARIOS["mixed"], 16, 8, 2, 64, torch.bfloat16, seed=3)
    o16 = attend(b, 0.125)
    f32 = {k: (v.float() if k in ("q", "k_cache", "v_cache") else v) for k, v in b.items()}
    o32 = attend(f32, 0.125)
    assert torch.equal(o16, o32.bfloat16())


def poison_everything_unowned(b, block_size):
    """NaN in every block no sequence owns and in every slot past a sequence's end; table
    entries past each sequence's blocks point at poison or outside the cache."""
    drv = CpuDriver()
    seq_lens, bt = b["seq_lens"].tolist(), b["block_tables"]
    num_blocks = b["k_cache"].shape[0]
    owned = {int(bt[s, i]) for s, n in enumerate(seq_lens)
             for i in range(math.ceil(n / block_size))}
    free = [i for i in range(num_blocks) if i not in owned]
    drv.poison_blocks([(b["k_cache"], b["v_cache"])], free)
    for s, n in enumerate(seq_lens):
        if n % block_size:
            last = int(bt[s, n // block_size])
            b["k_cache"][last, n % block_size:] = float("nan")
            b["v_cache"][last, n % block_size:] = float("nan")
        rest = bt[s, math.ceil(n / block_size):]
        garbage = torch.tensor([free[s % len(free)], -7, num_blocks, 2 ** 31 - 1],
                               dtype=torch.int32)
        rest.copy_(garbage.repeat(rest.numel() // 4 + 1)[:rest.numel()])


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("block_size", [1, 16, 32])
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_poisoned_free_blocks_and_table_garbage_do_not_leak(scenario, block_size, dtype):
    b = make_batch(SCENARIOS[scenario], block_size, 4, 2, 64, dtype, free_zero=True)
    poison_everything_unowned(b, block_size)
    o = check_against_naive(b, 0.125, dtype)
    assert not o.isnan().any()


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_poisoned_block_in_use_yields_nan_only_there(dtype):
    """A sequence reading a freed (poisoned) block gets NaN: a use-after-free shows."""
    b = make_batch(SCENARIOS["mixed"], 16, 4, 2, 64, dtype)
    victim = 3   # the (16, 16) sequence: two full blocks
    CpuDriver().poison_blocks([(b["k_cache"], b["v_cache"])], [int(b["block_tables"][victim, 1])])
    o = attend(b, 0.125)
    qsl = b["query_start_loc"].tolist()
    rows = torch.zeros(o.shape[0], dtype=torch.bool)
    rows[qsl[victim]:qsl[victim + 1]] = True
    assert o[rows].isnan().all()
    assert not o[~rows].isnan().any()


@needs_kernel
def test_takes_strided_q_and_int64_metadata():
    b = make_batch(SCENARIOS["chunked"], 16, 4, 2, 32, torch.float32)
    want = attend(b, 0.2)
    wide = torch.randn(b["q"].shape[0], 4, 64)
    wide[..., ::2] = b["q"]
    got = cpu_attention.paged_attention(wide[..., ::2], b["k_cache"], b["v_cache"],
                                        b["block_tables"].long(), b["seq_lens"].long(),
                                        b["query_start_loc"].long(), 0.2)
    assert torch.equal(got, want)


@needs_kernel
def test_no_new_tokens():
    b = make_batch([(40, 0), (3, 0)], 16, 4, 2, 32, torch.float32)
    assert attend(b, 0.2).shape == (0, 4, 32)


@needs_kernel
def test_callers_mistakes_raise_value_error():
    b = make_batch(SCENARIOS["mixed"], 16, 4, 2, 32, torch.float32)
    args = [b[k] for k in ("q", "k_cache", "v_cache", "block_tables", "seq_lens",
                           "query_start_loc")] + [0.2]

    def call(i, value, match):
        bad = list(args)
        bad[i] = value
        with pytest.raises(ValueError, match=match):
            cpu_attention.paged_attention(*bad)

    bt = b["block_tables"].clone()
    bt[1, 0] = b["k_cache"].shape[0]          # inside sequence 1's blocks: must name a block
    call(3, bt, r"block_tables\[1\]")
    lens = b["seq_lens"].clone()
    lens[2] = bt.shape[1] * 16 + 1             # longer than its table
    call(4, lens, r"seq_lens\[2\]")
    call(5, b["query_start_loc"] + 1, "query_start_loc")
    call(0, b["q"].bfloat16(), "dtype")
    call(1, b["k_cache"].transpose(1, 2).contiguous().transpose(1, 2), "contiguous")
    call(0, b["q"][:, :3], "multiple of Hkv")


def test_forced_torch_makes_it_unavailable(monkeypatch):
    monkeypatch.setenv("LLMOS_CPU_ATTENTION", "torch")
    assert not cpu_attention.available()
    assert "LLMOS_CPU_ATTENTION=torch" in cpu_attention.unavailable_reason()
    with pytest.raises(RuntimeError, match="not available"):
        cpu_attention.paged_attention(torch.zeros(1, 1, 8), torch.zeros(1, 1, 1, 8),
                                      torch.zeros(1, 1, 1, 8), torch.zeros(1, 1),
                                      torch.ones(1), torch.tensor([0, 1]), 1.0)


# ---- building and caching, each in a fresh process with its own cache folder ------------

PROBE = ("from llmos.drivers import cpu_attention as c; "
         "print(c.available(), c.library_path(), c.unavailable_reason(), sep='\\n')")


def start_probe(cache: Path, **env) -> subprocess.Popen:
    clean = {k: v for k, v in os.environ.items() if k not in ("CC", "LLMOS_CPU_ATTENTION")}
    return subprocess.Popen([sys.executable, "-c", PROBE], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**clean, "XDG_CACHE_HOME": str(cache), **env})


def finish_probe(proc: subprocess.Popen) -> tuple[bool, Path, str]:
    """(available, library path, reason) as the probe process saw them."""
    out, err = proc.communicate(timeout=PROCESS_TIMEOUT)
    assert proc.returncode == 0, err
    ok, path, reason = out.splitlines()[-3:]
    return ok == "True", Path(path), reason


@needs_kernel
def test_built_once_then_loaded_from_the_cache(tmp_path):
    # Two processes build into an empty cache at once: both load a whole library.
    first = [finish_probe(p) for p in [start_probe(tmp_path), start_probe(tmp_path)]]
    assert all(ok for ok, _, _ in first), first
    path = first[0][1]
    assert path.parent == tmp_path / "llmos" and first[1][1] == path
    assert [p.name for p in path.parent.iterdir()] == [path.name]    # no temporary left
    built = path.stat().st_mtime_ns
    # A compiler that always fails: a later process must not need it.
    ok, again, reason = finish_probe(start_probe(tmp_path, CC="false"))
    assert ok, reason
    assert again == path and path.stat().st_mtime_ns == built


@pytest.mark.parametrize("cc,words", [("/nonexistent/cc", "cannot run the C compiler"),
                                      ("false", "the C compiler failed")])
def test_no_compiler_means_unavailable_with_a_reason(tmp_path, cc, words):
    ok, path, reason = finish_probe(start_probe(tmp_path, CC=cc))
    assert not ok and words in reason and not path.exists()
