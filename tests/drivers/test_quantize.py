"""Weight-only int8 (drivers/quant.py) through prepare_linear(quantize="int8") / linear, on
the cpu driver and the base class's defaults (plain): against x @ (q * scales).T in
float64, on both kernels (torch's _weight_int8pack_mm for bfloat16 rows of a multiple of
16, the dequantized GEMM otherwise)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from llmos.drivers import CpuDriver, Driver
from llmos.drivers.quant import INT8_MAX, QUANTIZE, quantize_int8

from .plain import PlainDriver

# Error bound relative to |x| @ |w| + |b|, the size of the terms summed. float32: summation
# order only (observed <= 2e-7). bfloat16: the output is rounded, in the dequantized GEMM
# twice, before and after the scale (observed <= 0.0033). float16 rounds the scaled
# weight and the output (observed <= 8e-5).
REL = {torch.float32: 1e-5, torch.bfloat16: 2 ** -7, torch.float16: 2 ** -9}


@pytest.fixture(params=["cpu", "plain"])
def drv(request) -> Driver:
    return CpuDriver() if request.param == "cpu" else PlainDriver()


def randn(*shape, dtype=torch.float32, seed=0, scale=1.0):
    return (scale * torch.randn(*shape, generator=torch.Generator().manual_seed(seed))).to(dtype)


def check(got, x, w, b=None):
    """got is x @ (q * scales).T + b, q and scales those of the prepared int8 weight w."""
    assert got.dtype == x.dtype and got.shape == (*x.shape[:-1], w.out_features)
    weight = w.weight.double() * w.scales.double()[:, None]
    want, size = F.linear(x.double(), weight), F.linear(x.double().abs(), weight.abs())
    if b is not None:
        want, size = want + b.double(), size + b.double().abs()
    err = (got.double() - want).abs()
    assert bool((err <= REL[x.dtype] * size).all()), f"{(err / size).max().item():.2e} |x||w|"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("bias", [False, True], ids=["", "bias"])
@pytest.mark.parametrize("out_in", [(96, 64), (97, 65), (40, 100)], ids=str)
@pytest.mark.parametrize("T", [1, 33])
def test_int8_linear_matches_the_dequantized_weight(drv, dtype, bias, out_in, T):
    out_f, in_f = out_in
    w, b = randn(out_f, in_f, dtype=dtype), randn(out_f, dtype=dtype, seed=1) if bias else None
    x = randn(T, in_f, dtype=dtype, seed=2)
    prepared = drv.prepare_linear(w, b, quantize="int8")
    assert prepared.weight.dtype == torch.int8 and not prepared.weight.is_mkldnn
    assert (prepared.in_features, prepared.out_features, prepared.dtype) == (in_f, out_f, dtype)
    check(drv.linear(x, prepared), x, prepared, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_int8_weight_is_within_half_a_scale(dtype):
    w = randn(64, 48, dtype=dtype)
    w[3] = 0                                             # a row of zeros: scale 1, q 0
    q, scales = quantize_int8(w)
    assert q.dtype == torch.int8 and scales.dtype == dtype and scales.shape == (64,)
    assert int(q.abs().max()) == INT8_MAX                # each row's absmax maps to 127
    assert scales[3] == 1 and not q[3].any()
    err = (q.double() * scales.double()[:, None] - w.double()).abs()
    assert bool((err <= scales.double()[:, None] / 2 * (1 + 1e-6)).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_int8_linear_takes_non_contiguous_batched_and_misaligned_input(drv, dtype):
    w = randn(32, 64, dtype=dtype)
    prepared = drv.prepare_linear(w, quantize="int8")
    x = randn(64, 10, dtype=dtype).t()                   # [10, 64], not contiguous
    check(drv.linear(x, prepared), x, prepared)
    x3 = randn(3, 5, 64, dtype=dtype)
    check(drv.linear(x3, prepared), x3, prepared)
    # A contiguous view one element into its storage: torch's bf16 kernel faults on it.
    x = randn(4 * 64 + 1, dtype=dtype)[1:].view(4, 64)
    check(drv.linear(x, prepared), x, prepared)


def test_int8_float16_scales_before_the_gemm():
    # x @ q.T alone (|q| up to 127) would pass float16's 65504 here; the result does not.
    w = randn(64, 256, dtype=torch.float16, scale=0.01)
    x = randn(4, 256, dtype=torch.float16, seed=2, scale=300)
    prepared = PlainDriver().prepare_linear(w, quantize="int8")
    got = PlainDriver().linear(x, prepared)
    assert bool(got.isfinite().all())
    check(got, x, prepared)


@pytest.mark.parametrize("dtype, ratio", [(torch.float32, 0.26), (torch.bfloat16, 0.51)],
                         ids=["f32", "bf16"])
def test_int8_nbytes_counts_weight_scales_and_bias(drv, dtype, ratio):
    w, b = randn(256, 512, dtype=dtype), randn(256, dtype=dtype, seed=1)
    dense, int8 = drv.prepare_linear(w, b), drv.prepare_linear(w, b, quantize="int8")
    assert int8.nbytes == 256 * 512 + 2 * 256 * w.element_size()   # q, scales, bias
    assert int8.nbytes < ratio * dense.nbytes


def test_bf16_rows_of_16_take_torchs_int8_kernel(drv, monkeypatch):
    calls = []
    kernel = torch._weight_int8pack_mm
    monkeypatch.setattr(torch, "_weight_int8pack_mm", lambda *a: calls.append(1) or kernel(*a))
    for in_f, dtype, taken in [(64, torch.bfloat16, 1), (72, torch.bfloat16, 0),
                               (64, torch.float32, 0)]:
        prepared = drv.prepare_linear(randn(16, in_f, dtype=dtype), quantize="int8")
        x = randn(3, in_f, dtype=dtype, seed=2)
        check(drv.linear(x, prepared), x, prepared)
        assert len(calls) == taken, (in_f, dtype)
        calls.clear()


def test_cpu_driver_prepacks_only_float_weights():
    drv = CpuDriver()
    assert drv.prepare_linear(randn(64, 32)).weight.is_mkldnn
    assert drv.prepare_linear(randn(64, 32), quantize="int8").weight.dtype == torch.int8


@pytest.mark.parametrize("bad", ["int4", "INT8", "", "fp8"])
def test_unknown_quantize_is_refused(drv, bad):
    with pytest.raises(ValueError, match="int8"):
        drv.prepare_linear(randn(8, 8), quantize=bad)
    assert QUANTIZE == ("int8",)
