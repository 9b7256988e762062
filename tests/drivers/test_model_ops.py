"""The model ops of the driver ABI (prepare_linear / linear, rms_norm, rope, silu_and_mul,
embed, preferred_dtype) on every CPU-side driver: cpu (oneDNN linear), sim (the plugin),
and plain (tests/drivers/plain.py: the base class's defaults only). References are
transformers' own modules, so float32 outputs are checked bit for bit where the driver
promises transformers' numerics. The Triton versions are in test_triton.py."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from llmos.drivers import CpuDriver, Driver, LinearWeight, get_driver
from llmos.drivers.cpu import bf16_support, cpu_flags
from llmos.kernel.load import pick_dtype

from .plain import PlainDriver

DTYPES = [torch.float32, torch.bfloat16]
LINEAR_TOL = {torch.float32: dict(atol=1e-4, rtol=1e-5), torch.bfloat16: dict(atol=0.1, rtol=0.02)}


@pytest.fixture(params=["cpu", "sim", "plain"])
def drv(request) -> Driver:
    return PlainDriver() if request.param == "plain" else get_driver(request.param)


def randn(*shape, dtype=torch.float32, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "bf16"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("T", [1, 7, 64])
def test_linear_equals_torch(drv, dtype, bias, T):
    w, b = randn(96, 40, dtype=dtype), randn(96, dtype=dtype, seed=1) if bias else None
    x = randn(T, 40, dtype=dtype, seed=2)
    prepared = drv.prepare_linear(w, b)
    assert isinstance(prepared, LinearWeight)
    assert (prepared.in_features, prepared.out_features, prepared.dtype) == (40, 96, dtype)
    assert prepared.nbytes == (w.numel() + (96 if bias else 0)) * w.element_size()
    want = F.linear(x.double(), w.double(), None if b is None else b.double())
    got = drv.linear(x, prepared)
    assert got.dtype == dtype and got.shape == (T, 96)
    torch.testing.assert_close(got.double(), want, **LINEAR_TOL[dtype])


def test_linear_takes_non_contiguous_and_batched_input(drv):
    w = randn(32, 16)
    prepared = drv.prepare_linear(w)
    x = randn(16, 10).t()                                 # [10, 16], not contiguous
    torch.testing.assert_close(drv.linear(x, prepared), F.linear(x, w), atol=1e-5, rtol=1e-5)
    x3 = randn(3, 5, 16)
    torch.testing.assert_close(drv.linear(x3, prepared), F.linear(x3, w), atol=1e-5, rtol=1e-5)


def test_prepare_linear_refuses_bad_shapes(drv):
    with pytest.raises(ValueError, match=r"\[out, in\]"):
        drv.prepare_linear(randn(4))
    with pytest.raises(ValueError, match="bias"):
        drv.prepare_linear(randn(4, 3), randn(3))


def test_cpu_linear_is_prepacked_for_onednn_in_float32():
    prepared = CpuDriver().prepare_linear(randn(64, 32))
    if not torch.backends.mkldnn.is_available():
        pytest.skip("this torch has no oneDNN")
    assert prepared.weight.is_mkldnn     # reordered once at load, not per call


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "bf16"])
@pytest.mark.parametrize("shape", [(1, 64), (9, 96), (5, 4, 24)])
def test_rms_norm_is_transformers_bit_for_bit(drv, dtype, shape):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    ref = LlamaRMSNorm(shape[-1], eps=1e-6)
    ref.weight.data = randn(shape[-1], seed=3).to(dtype)
    ref = ref.to(dtype)
    x, res = randn(*shape, dtype=dtype), randn(*shape, dtype=dtype, seed=4)
    with torch.no_grad():
        assert torch.equal(drv.rms_norm(x, ref.weight, 1e-6), ref(x))
        # fused: as transformers' decoder layer, residual + hidden, then the norm
        out, h = drv.rms_norm(x, ref.weight, 1e-6, residual=res)
        assert torch.equal(h, res + x) and torch.equal(out, ref(res + x))
    assert torch.equal(x, randn(*shape, dtype=dtype)), "rms_norm wrote its input"


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "bf16"])
@pytest.mark.parametrize("H, Hkv", [(4, 4), (8, 2)])
def test_rope_in_place_is_transformers_bit_for_bit(drv, dtype, H, Hkv):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
    T, D = 11, 32
    angles = torch.arange(T).float()[:, None] * (1.0 / 10000 ** (torch.arange(0, D, 2).float() / D))
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)                # [T, D/2]
    q, k = randn(T, H, D, dtype=dtype), randn(T, Hkv, D, dtype=dtype, seed=5)
    full_cos, full_sin = torch.cat((cos, cos), -1), torch.cat((sin, sin), -1)
    # transformers' layout: q [B, H, T, D], cos [B, T, D], unsqueezed on the head axis
    want_q, want_k = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None],
                                          full_cos[None], full_sin[None])
    drv.rope(q, k, cos, sin)
    assert torch.equal(q, want_q[0].transpose(0, 1)) and torch.equal(k, want_k[0].transpose(0, 1))


def test_rope_on_views_of_one_tensor(drv):
    """The model ropes q and k as views of one fused qkv GEMM output."""
    T, H, Hkv, D = 5, 4, 2, 16
    qkv = randn(T, (H + 2 * Hkv) * D)
    q, k, v = qkv.split([H * D, Hkv * D, Hkv * D], -1)
    q, k, v = q.view(T, H, D), k.view(T, Hkv, D), v.view(T, Hkv, D)
    want_q, want_k, want_v = q.clone(), k.clone(), v.clone()
    cos, sin = randn(T, D // 2, seed=1), randn(T, D // 2, seed=2)
    PlainDriver().rope(want_q, want_k, cos, sin)
    drv.rope(q, k, cos, sin)
    assert torch.equal(q, want_q) and torch.equal(k, want_k) and torch.equal(v, want_v)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "bf16"])
def test_silu_and_mul_and_embed(drv, dtype):
    x = randn(6, 2 * 40, dtype=dtype)
    assert torch.equal(drv.silu_and_mul(x), F.silu(x[:, :40]) * x[:, 40:])
    table, ids = randn(50, 8, dtype=dtype), torch.tensor([0, 49, 7, 7])
    assert torch.equal(drv.embed(ids, table), table[ids])


# ---- dtype by capability ------------------------------------------------------------

@pytest.mark.parametrize("flags, want", [
    ({"avx2", "fma"}, False),
    ({"avx512f", "avx512_bf16"}, True),
    ({"amx_bf16", "amx_tile"}, True),
])
def test_bf16_support_reads_the_cpu_flags(flags, want):
    ok, why = bf16_support(frozenset(flags))
    assert ok is want and why


def test_cpu_flags_of_this_machine_and_of_a_file(tmp_path):
    assert isinstance(cpu_flags(), frozenset)
    f = tmp_path / "cpuinfo"
    f.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512_bf16\n")
    assert cpu_flags(str(f)) == {"fpu", "avx2", "avx512_bf16"}
    assert cpu_flags(str(tmp_path / "none")) == frozenset()


def test_auto_dtype_is_the_drivers_choice_and_a_name_is_taken_as_asked(monkeypatch):
    drv = CpuDriver()
    for have, want in ((False, torch.float32), (True, torch.bfloat16)):
        monkeypatch.setattr("llmos.drivers.cpu.bf16_support", lambda h=have: (h, "because"))
        assert pick_dtype(None, drv) == (want, "auto: because")
        assert pick_dtype("auto", drv) == (want, "auto: because")
    assert pick_dtype("float16", drv) == (torch.float16, "asked")
    assert pick_dtype(torch.bfloat16, drv) == (torch.bfloat16, "asked")
    with pytest.raises(ValueError, match="int8"):
        pick_dtype("int8", drv)
    assert PlainDriver().preferred_dtype()[0] == torch.float32


# ---- a driver with only the defaults runs a model token-identical to transformers ------

@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_plain_driver_engine_matches_transformers(checkpoints, kind):
    from llmos.kernel import Engine
    from tests.kernel.test_engine import hf_greedy, prompts_for
    engine = Engine.from_pretrained(str(checkpoints[kind]), driver=PlainDriver(),
                                    num_blocks=64, dtype="auto")
    assert engine.model.dtype == torch.float32
    prompts = prompts_for(engine.config.vocab_size)
    got = engine.generate(prompts, max_tokens=16, ignore_eos=True)
    assert [c.token_ids for c in got] == hf_greedy(checkpoints[kind], prompts, new_tokens=16)
