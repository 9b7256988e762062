"""The Triton kernels (drivers/triton/) on the CPU under TRITON_INTERPRET=1, against torch.

Isolation. Triton picks interpreter or compiler when a function is decorated with
triton.jit, and triton.language's own helpers (tl.cdiv, the combine functions of tl.max
and tl.sum) are decorated when triton is first imported: one process is either all
interpreted or all compiled. So:

- When this module is imported before anything imported triton, on a machine without a
  GPU, it sets TRITON_INTERPRET=1 for the process (there, triton can only interpret
  anyway) and the tests run here, one pytest item each.
- Otherwise (triton already imported compiled-mode by an earlier test, or a GPU machine,
  where interpreting every later kernel would be wrong) the kernel tests skip, and
  test_interpreted_in_subprocess runs this file in a fresh `python -m pytest` with
  TRITON_INTERPRET=1 set from the start.
"""
from __future__ import annotations

import inspect
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

if "triton" not in sys.modules and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: see the docstring

triton = pytest.importorskip("triton")

from llmos.drivers import CpuDriver  # noqa: E402

from .plain import PlainDriver  # noqa: E402


def _interpreting() -> bool:
    """True when triton and our kernels were decorated by the interpreter in this process."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return False
    helper = getattr(triton.language.standard, "cdiv", None)  # a @triton.jit of triton's own
    if type(helper).__name__ != "InterpretedFunction":
        return False  # triton was imported before the variable was set
    from llmos.drivers.triton import attention as attn
    return type(attn._attn_kernel).__name__ == "InterpretedFunction"


IN_PROCESS = _interpreting()
CHILD = "LLMOS_TEST_TRITON_CHILD"  # set in the subprocess, so it never spawns another
if IN_PROCESS:
    from llmos.drivers.triton import attention, kv, norm
interpreted = pytest.mark.skipif(
    not IN_PROCESS, reason="triton is compiled-mode in this process: these run in "
                           "test_interpreted_in_subprocess under TRITON_INTERPRET=1")

# Against a float64 reference. float32: observed <= 1.3e-6. bfloat16: the output (and p
# before p @ V) is rounded to bfloat16, and the interpreter's casts truncate, so errors scale
# with |o| (observed <= 0.0078 |o| + 0.005); on a GPU rounding is to nearest, half that.
TOL = {torch.float32: dict(atol=1e-5, rtol=0), torch.bfloat16: dict(atol=1e-2, rtol=1e-2)}


@pytest.mark.skipif(IN_PROCESS, reason="already interpreted in this process")
def test_interpreted_in_subprocess():
    if os.environ.get(CHILD):
        pytest.fail("TRITON_INTERPRET=1 from the start, yet the kernels are not interpreted")
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "TRITON_INTERPRET": "1", CHILD: "1"}
    child = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                            str(Path(__file__).resolve())], cwd=root, env=env,
                           capture_output=True, text=True, timeout=280)
    assert child.returncode == 0, child.stdout[-8000:] + child.stderr[-2000:]


@interpreted
def test_kernels_are_interpreted():
    for kernel in (kv._store_kv_kernel, kv._copy_blocks_kernel, attention._attn_kernel,
                   attention._reduce_kernel, norm._rms_norm_kernel, norm._rope_kernel,
                   norm._silu_and_mul_kernel):
        assert type(kernel).__name__ == "InterpretedFunction"


def test_package_exports_driver_signatures():
    from llmos.drivers import triton as pkg
    for name in ("store_kv", "paged_attention", "copy_blocks", "rms_norm", "rope",
                 "silu_and_mul"):
        ours = list(inspect.signature(getattr(pkg, name)).parameters)
        theirs = list(inspect.signature(getattr(CpuDriver, name)).parameters)[1:]  # minus self
        assert ours[:len(theirs)] == theirs, name


# ---- paged attention ---------------------------------------------------------------

# (tokens already cached, new tokens) per sequence
SCENARIOS = {
    # lengths 1, block boundaries and one past them, several blocks
    "decode": [(0, 1), (15, 1), (16, 1), (31, 1), (32, 1), (70, 1)],
    "prefill": [(0, 1), (0, 16), (0, 33), (0, 45)],
    "chunked": [(32, 16), (17, 30), (64, 5)],
    "mixed": [(20, 1), (0, 37), (63, 1), (16, 16), (5, 1), (40, 0), (50, 9)],
    # T == S but not one token each: the decode-sized tiles meet multi-token queries
    "uneven": [(9, 3), (30, 0), (0, 1), (47, 0)],
}

# (scenario, H, Hkv, D, block_size, dtype, split_k): every GQA ratio (1, 2, 4, 8), head size,
# block size, dtype and split-K setting appears with several scenarios; not the full product.
F32, BF16 = torch.float32, torch.bfloat16
CASES = [
    ("decode", 4, 4, 64, 16, F32, False),
    ("decode", 8, 2, 128, 32, F32, True),
    ("decode", 8, 1, 64, 16, BF16, True),
    ("decode", 7, 1, 64, 32, F32, True),   # G = 7 (Qwen2-0.5B's 14/2): rows not a power of 2
    ("prefill", 2, 1, 64, 16, F32, False),
    ("prefill", 8, 2, 64, 32, BF16, False),
    ("prefill", 4, 4, 128, 16, F32, True),
    ("chunked", 8, 1, 128, 16, F32, False),
    ("chunked", 4, 2, 64, 32, BF16, True),
    ("mixed", 4, 2, 64, 16, F32, False),
    ("mixed", 4, 1, 64, 16, F32, True),
    ("mixed", 8, 8, 128, 32, BF16, False),
    ("uneven", 8, 1, 64, 16, F32, False),
    ("uneven", 4, 2, 128, 32, F32, True),
    ("mixed", 6, 2, 80, 24, F32, True),    # head size and block size not powers of 2
]


def make_batch(scenario, block_size, H, Hkv, D, dtype, seed=0, spare=7):
    """Caches full of junk, sequences on shuffled blocks (never block 0), garbage past each
    table (including ids out of range). Returns the kernel inputs and, per sequence, its
    keys and values [seq_len, Hkv, D] for the reference."""
    gen = torch.Generator().manual_seed(seed)
    seq_lens = [c + n for c, n in scenario]
    need = [math.ceil(n / block_size) for n in seq_lens]
    num_blocks = sum(need) + spare
    shape = (num_blocks, block_size, Hkv, D)
    k_cache = torch.randn(shape, generator=gen).to(dtype)
    v_cache = torch.randn(shape, generator=gen).to(dtype)
    perm = (torch.randperm(num_blocks - 1, generator=gen) + 1).tolist()
    width = max(need) + 2
    block_tables = torch.randint(-1000, 1000, (len(scenario), width), generator=gen,
                                 dtype=torch.int32)
    ks, vs = [], []
    for s, n in enumerate(seq_lens):
        blocks, perm = perm[:need[s]], perm[need[s]:]
        block_tables[s, :need[s]] = torch.tensor(blocks, dtype=torch.int32)
        ks.append(torch.cat([k_cache[b] for b in blocks])[:n] if blocks else k_cache[:0, 0])
        vs.append(torch.cat([v_cache[b] for b in blocks])[:n] if blocks else v_cache[:0, 0])
    q_lens = [n for _, n in scenario]
    q = torch.randn(sum(q_lens), H, D, generator=gen).to(dtype)
    qsl = torch.tensor([0] + q_lens).cumsum(0).to(torch.int32)
    return dict(q=q, k_cache=k_cache, v_cache=v_cache, block_tables=block_tables,
                seq_lens=torch.tensor(seq_lens, dtype=torch.int32), query_start_loc=qsl,
                ks=ks, vs=vs, q_lens=q_lens)


def reference(b, scale):
    """Dense causal attention per sequence in float64; o [T, H, D]."""
    q = b["q"].double()
    out = torch.zeros_like(q)
    G = q.shape[1] // b["k_cache"].shape[2]
    start = 0
    for k, v, n in zip(b["ks"], b["vs"], b["q_lens"]):
        L = k.shape[0]
        k = k.double().repeat_interleave(G, dim=1)       # [L, H, D]
        v = v.double().repeat_interleave(G, dim=1)
        scores = torch.einsum("thd,lhd->htl", q[start:start + n], k) * scale
        pos = torch.arange(L - n, L)[:, None]              # [n, 1] position of each new token
        scores = scores.masked_fill(torch.arange(L)[None] > pos, float("-inf"))
        out[start:start + n] = torch.einsum("htl,lhd->thd", scores.softmax(-1), v)
        start += n
    return out


def run(b, scale, **options):
    return attention.paged_attention(b["q"], b["k_cache"], b["v_cache"], b["block_tables"],
                                     b["seq_lens"], b["query_start_loc"], scale, **options)


@interpreted
@pytest.mark.parametrize("scenario,H,Hkv,D,block_size,dtype,split_k", CASES,
                         ids=lambda v: str(v).replace("torch.", ""))
def test_paged_attention_matches_reference(scenario, H, Hkv, D, block_size, dtype, split_k):
    b = make_batch(SCENARIOS[scenario], block_size, H, Hkv, D, dtype)
    scale = D ** -0.5
    o = run(b, scale, split_k=split_k)
    assert o.shape == b["q"].shape and o.dtype == dtype
    torch.testing.assert_close(o.double(), reference(b, scale), **TOL[dtype])


@interpreted
@pytest.mark.parametrize("seed", range(4))
def test_paged_attention_random_batches(seed):
    """Random ragged batches: lengths, new tokens (some 0), GQA ratio and split-K drawn."""
    gen = torch.Generator().manual_seed(100 + seed)
    draw = lambda n: int(torch.randint(n, (), generator=gen))  # noqa: E731
    scenario = [(draw(80), 1 + draw(24) if draw(3) else draw(2)) for _ in range(1 + draw(6))]
    if not sum(n for _, n in scenario):
        scenario[0] = (scenario[0][0], 1)
    Hkv = (1, 2)[draw(2)]
    H = Hkv * (1, 2, 4, 8)[draw(4)]
    b = make_batch(scenario, (16, 32)[draw(2)], H, Hkv, 64, F32, seed=seed)
    o = run(b, 0.125, split_k=bool(draw(2)), num_segments=(2, 4, 8)[draw(3)])
    torch.testing.assert_close(o.double(), reference(b, 0.125), **TOL[F32])


@interpreted
@pytest.mark.parametrize("num_segments", [2, 8])
def test_split_k_segments_agree(num_segments):
    """More segments than a short sequence has KV tiles leaves some empty: they must weigh 0."""
    b = make_batch(SCENARIOS["decode"], 16, 4, 2, 64, F32, seed=1)
    o = run(b, 0.125, split_k=True, num_segments=num_segments)
    torch.testing.assert_close(o.double(), reference(b, 0.125), **TOL[F32])


@interpreted
def test_split_k_heuristic():
    choose = attention._num_segments
    cpu = torch.device("cpu")
    assert choose(4, 8192, 32, cpu, None, None) > 1        # few programs, long tables
    assert choose(4, 256, 32, cpu, None, None) == 1        # short tables
    assert choose(4096, 8192, 32, cpu, None, None) == 1    # enough programs already
    assert choose(4, 64, 32, cpu, True, None) == 4         # forced
    assert choose(4, 8192, 32, cpu, False, None) == 1      # forced off
    n = choose(1, 1 << 20, 32, cpu, None, None)
    assert n & (n - 1) == 0 and n <= attention.SPLIT_MAX_SEGMENTS
    with pytest.raises(AssertionError, match="power of two"):
        choose(4, 64, 32, cpu, True, 3)


@interpreted
def test_auto_split_on_long_context_decode():
    """Two long sequences: the heuristic splits, and agrees with the unsplit kernel."""
    b = make_batch([(1100, 1), (700, 1)], 32, 2, 1, 64, F32, seed=2)
    assert attention._num_segments(2 + 2, b["block_tables"].shape[1] * 32, 32,
                                   torch.device("cpu"), None, None) > 1
    torch.testing.assert_close(run(b, 0.125).double(), reference(b, 0.125), **TOL[F32])


@interpreted
def test_strided_q():
    """q straight out of a fused qkv projection: rows strided, heads contiguous."""
    b = make_batch(SCENARIOS["mixed"], 16, 4, 2, 64, F32, seed=3)
    qkv = torch.cat([b["q"], torch.randn_like(b["q"])], dim=1)  # [T, 2H, D]
    b["q"] = qkv[:, :4]
    assert not b["q"].is_contiguous()
    torch.testing.assert_close(run(b, 0.125).double(), reference(b, 0.125), **TOL[F32])


def poison_unowned(b, block_size):
    """NaN into every block no sequence owns, into slots past each sequence's end, and table
    garbage pointing at a poisoned block: none of it may be read."""
    seq_lens, bt = b["seq_lens"].tolist(), b["block_tables"]
    owned = {int(bt[s, i]) for s, n in enumerate(seq_lens) for i in range(math.ceil(n / block_size))}
    free = [i for i in range(b["k_cache"].shape[0]) if i not in owned]
    b["k_cache"][free] = float("nan")
    b["v_cache"][free] = float("nan")
    for s, n in enumerate(seq_lens):
        if n % block_size:
            last = int(bt[s, n // block_size])
            b["k_cache"][last, n % block_size:] = float("nan")
            b["v_cache"][last, n % block_size:] = float("nan")
        bt[s, math.ceil(n / block_size):] = free[s % len(free)]


@interpreted
@pytest.mark.parametrize("scenario,split_k", [("mixed", False), ("decode", True),
                                              ("chunked", False)])
def test_poisoned_free_blocks_do_not_leak(scenario, split_k):
    b = make_batch(SCENARIOS[scenario], 16, 4, 2, 64, F32, seed=4)
    poison_unowned(b, 16)
    o = run(b, 0.125, split_k=split_k)
    assert not o.isnan().any()
    torch.testing.assert_close(o.double(), reference(b, 0.125), **TOL[F32])


@interpreted
def test_poisoned_block_in_use_yields_nan_only_there():
    b = make_batch(SCENARIOS["mixed"], 16, 4, 2, 64, F32)
    victim = 3  # the (16, 16) sequence: its second block holds its new tokens
    blk = int(b["block_tables"][victim, 1])
    b["k_cache"][blk] = float("nan")
    o = run(b, 0.125)
    qsl = b["query_start_loc"].tolist()
    rows = torch.zeros(o.shape[0], dtype=torch.bool)
    rows[qsl[victim]:qsl[victim + 1]] = True
    assert o[rows].isnan().all() and not o[~rows].isnan().any()


@interpreted
def test_empty_batch():
    q = torch.empty(0, 4, 64)
    cache = torch.zeros(2, 16, 2, 64)
    o = attention.paged_attention(q, cache, cache, torch.zeros(0, 1, dtype=torch.int32),
                                  torch.zeros(0, dtype=torch.int32),
                                  torch.zeros(1, dtype=torch.int32), 0.125)
    assert o.shape == (0, 4, 64)


# ---- store_kv and copy_blocks -------------------------------------------------------

@interpreted
def test_store_kv_matches_cpu_and_skips_minus_one():
    k, v = torch.randn(6, 2, 64), torch.randn(6, 2, 64)
    slots = torch.tensor([3, -1, 17, -1, 63, 40])
    ours = [torch.full((4, 16, 2, 64), 7.0) for _ in range(2)]
    theirs = [c.clone() for c in ours]
    kv.store_kv(k, v, *ours, slots)
    CpuDriver().store_kv(k, v, *theirs, slots)
    assert torch.equal(ours[0], theirs[0]) and torch.equal(ours[1], theirs[1])
    assert (ours[0].view(64, 2, 64)[[0, 1, 2, 4]] == 7).all()  # untouched slots


@interpreted
def test_store_kv_strided_input_and_cast():
    kvx = torch.randn(5, 2, 3, 128)  # [T, K|V, Hkv, D]: k and v are strided views
    k, v = kvx[:, 0], kvx[:, 1]
    slots = torch.tensor([0, 31, 16, -1, 5])
    ours = [torch.zeros(2, 16, 3, 128, dtype=BF16) for _ in range(2)]
    theirs = [c.clone() for c in ours]
    kv.store_kv(k, v, *ours, slots)
    CpuDriver().store_kv(k, v, *theirs, slots)
    assert torch.equal(ours[0], theirs[0]) and torch.equal(ours[1], theirs[1])


def random_caches(layers=2, blocks=6, shape=(4, 2, 8), seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(blocks, *shape, generator=gen), torch.randn(blocks, *shape, generator=gen))
            for _ in range(layers)]


@interpreted
@pytest.mark.parametrize("as_tensor", [False, True])
def test_copy_blocks_matches_cpu(as_tensor):
    ours = random_caches(layers=3)
    theirs = [(k.clone(), v.clone()) for k, v in ours]
    src, dst = [0, 2, 2], [5, 3, 1]
    if as_tensor:
        src, dst = torch.tensor(src), torch.tensor(dst)
    kv.copy_blocks(ours, src, dst)
    CpuDriver().copy_blocks(theirs, src, dst)
    for (k, v), (k0, v0) in zip(ours, theirs):
        assert torch.equal(k, k0) and torch.equal(v, v0)


@interpreted
def test_copy_blocks_reads_before_writes():
    ours = random_caches(layers=1, blocks=3)
    before = [c.clone() for c in ours[0]]
    kv.copy_blocks(ours, [0, 1], [1, 2])  # block 1 is both a source and a destination
    for c, c0 in zip(ours[0], before):
        assert torch.equal(c[1], c0[0]) and torch.equal(c[2], c0[1])


@interpreted
def test_copy_blocks_large_block_and_empty():
    ours = random_caches(layers=1, blocks=3, shape=(16, 2, 64))  # 2048 elements: 2 chunks
    before = [c.clone() for c in ours[0]]
    kv.copy_blocks(ours, [], [])
    kv.copy_blocks(ours, [2], [0])
    for c, c0 in zip(ours[0], before):
        assert torch.equal(c[0], c0[2]) and torch.equal(c[1:], c0[1:])


# ---- rms_norm, rope, silu_and_mul ---------------------------------------------------

# Against the Driver base class's torch defaults (PlainDriver). float32: summation order,
# rsqrt and exp differ by an ulp (observed <= 1.9e-6). bfloat16: the interpreter's casts
# truncate where torch rounds to nearest, and rms_norm rounds three times (h, the normalized
# row, the product with the weight): observed <= 3 ulps (2.3e-2 relative). On a GPU casts
# round to nearest, and bench/gpu_check.py holds the kernels to tighter bounds.
OP_TOL = {F32: dict(atol=1e-5, rtol=1e-6), BF16: dict(atol=1e-2, rtol=3e-2)}


def randn(*shape, dtype=F32, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def assert_same_results(ours, theirs, dtype):
    ours, theirs = (ours, theirs) if isinstance(ours, tuple) else ((ours,), (theirs,))
    for a, b in zip(ours, theirs, strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype
        torch.testing.assert_close(a, b, **OP_TOL[dtype])


@interpreted
@pytest.mark.parametrize("shape,dtype,with_residual", [
    ((1, 896), F32, False),
    ((37, 100), F32, True),       # C not a power of two
    ((1, 896), BF16, True),
    ((37, 100), BF16, False),
    ((3, 5, 80), F32, True),      # qk-norm's [T, H, D]
    ((3, 5, 80), BF16, False),
    ((2, 2, 3, 32), F32, True),   # more leading dims: folded into rows
], ids=lambda v: str(v).replace("torch.", ""))
def test_rms_norm_matches_default(shape, dtype, with_residual):
    x = randn(*shape, dtype=dtype, seed=1)
    residual = randn(*shape, dtype=dtype, seed=2) if with_residual else None
    weight = 1 + 0.1 * randn(shape[-1], dtype=dtype, seed=3)
    inputs = [t for t in (x, residual, weight) if t is not None]
    before = [t.clone() for t in inputs]
    ours = norm.rms_norm(x, weight, 1e-6, residual)
    assert_same_results(ours, PlainDriver().rms_norm(x, weight, 1e-6, residual), dtype)
    assert all(map(torch.equal, inputs, before))  # the inputs are left as they were


@interpreted
def test_rms_norm_strided_inputs():
    """qk-norm on q straight out of a fused qkv; a residual add on row and column strides."""
    qkv = randn(4, 6 + 2 * 2, 64)          # [T, H + 2 Hkv, D]
    q = qkv[:, :6]                          # [T, 6, D]: T strided past k and v
    weight = 1 + 0.1 * randn(64, seed=1)
    assert_same_results(norm.rms_norm(q, weight, 1e-6), PlainDriver().rms_norm(q, weight, 1e-6), F32)
    wide = randn(5, 2 * 48, seed=2)
    x, residual = wide[:, ::2], randn(48, 5, seed=3).t()  # [5, 48]: a column stride, a transpose
    assert not x.is_contiguous() and not residual.is_contiguous()
    assert_same_results(norm.rms_norm(x, weight[:48], 1e-5, residual),
                        PlainDriver().rms_norm(x, weight[:48], 1e-5, residual), F32)


def rope_inputs(T, D, dtype, seed=0):
    angles = torch.rand(T, D // 2, generator=torch.Generator().manual_seed(seed)) * 6
    return angles.cos().to(dtype), angles.sin().to(dtype)


@interpreted
@pytest.mark.parametrize("T,H,Hkv,D,dtype", [
    (1, 4, 4, 64, F32),
    (37, 4, 1, 64, BF16),
    (5, 6, 2, 80, F32),    # H and D/2 = 40 not powers of two
    (3, 14, 2, 64, BF16),  # Qwen2-0.5B's heads
], ids=lambda v: str(v).replace("torch.", ""))
def test_rope_matches_default(T, H, Hkv, D, dtype):
    q, k = randn(T, H, D, dtype=dtype, seed=1), randn(T, Hkv, D, dtype=dtype, seed=2)
    cos, sin = rope_inputs(T, D, dtype)
    ours = (q.clone(), k.clone())
    norm.rope(*ours, cos, sin)
    if dtype == F32:
        theirs = (q.clone(), k.clone())
        PlainDriver().rope(*theirs, cos, sin)
        assert_same_results(ours, theirs, F32)
        return
    # bfloat16: the kernel rounds once, from float32; the default rounds each product in
    # bfloat16 (observed 2 ulps apart, <= 3.1e-2). So against float64 too: within one ulp.
    exact = (q.double(), k.double())
    PlainDriver().rope(*exact, cos.double(), sin.double())
    theirs = (q.clone(), k.clone())
    PlainDriver().rope(*theirs, cos, sin)
    for a, b, e in zip(ours, theirs, exact):
        torch.testing.assert_close(a.double(), e, atol=1e-5, rtol=2 ** -7)
        torch.testing.assert_close(a, b, atol=5e-2, rtol=0)


@interpreted
def test_rope_strided_q_and_k_leave_v():
    """q and k as views of one fused qkv [T, H + 2 Hkv, D]: rotated in place, v untouched."""
    qkv = randn(6, 4 + 2 * 2, 32)
    ours = qkv.clone()
    cos, sin = rope_inputs(6, 32, F32)
    norm.rope(ours[:, :4], ours[:, 4:6], cos, sin)
    PlainDriver().rope(qkv[:, :4], qkv[:, 4:6], cos, sin)
    assert_same_results(ours, qkv, F32)
    assert torch.equal(ours[:, 6:], randn(6, 4 + 2 * 2, 32)[:, 6:])


@interpreted
@pytest.mark.parametrize("shape,dtype", [
    ((1, 2 * 300), F32),
    ((37, 2 * 100), BF16),
    ((2, 3, 2 * 1100), F32),  # leading [T, H]; I past one program's SILU_BLOCK columns
], ids=lambda v: str(v).replace("torch.", ""))
def test_silu_and_mul_matches_default(shape, dtype):
    x = 2 * randn(*shape, dtype=dtype)
    assert_same_results(norm.silu_and_mul(x), PlainDriver().silu_and_mul(x), dtype)


@interpreted
def test_silu_and_mul_strided_and_empty():
    wide = randn(3, 2 * 50 + 16)
    x = wide[:, :100]  # [T, 2I] with rows strided
    assert_same_results(norm.silu_and_mul(x), PlainDriver().silu_and_mul(x), F32)
    assert norm.silu_and_mul(torch.empty(0, 64)).shape == (0, 32)
    assert norm.rms_norm(torch.empty(0, 64), torch.ones(64), 1e-6).shape == (0, 64)
    norm.rope(torch.empty(0, 2, 8), torch.empty(0, 1, 8), torch.empty(0, 4), torch.empty(0, 4))


# ---- the cuda driver, on a machine without a GPU -------------------------------------

def test_cuda_driver_imports_without_gpu():
    from llmos.drivers.cuda import CudaDriver
    assert CudaDriver.name == "cuda"
    if CudaDriver.is_available():
        pytest.skip("this machine has a GPU")
    assert CudaDriver.unavailable_reason()
    with pytest.raises(RuntimeError, match="not available"):
        CudaDriver()


def test_swap_groups_host_runs():
    from llmos.drivers.cuda import _host_runs
    assert _host_runs([5, 3, 4, 9, 0], [1, 2, 3, 4, 7]) == [(0, [7]), (3, [2, 3, 1]), (9, [4])]
    assert _host_runs([], []) == []
