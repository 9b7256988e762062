"""Triton kernels for the model ops around attention (used by the cuda driver): rms_norm
with the residual add fused, rope in place, silu_and_mul.

Contracts are the Driver defaults' (drivers/base.py). Each kernel loads its inputs,
computes in float32 and rounds where the torch default rounds, so on a GPU (which rounds
to nearest, as torch does; the interpreter truncates) bfloat16 results match it up to a
last-bit difference in a float32 sum, rsqrt or exp: rms_norm rounds the residual sum and
the normalized x before the weight multiplies; silu_and_mul rounds silu(gate) before the
product. rope alone rounds once, at the end (torch rounds each product and sum in the
input dtype), so in bfloat16 it is the more accurate of the two and differs from the
default by a rounding or two.

Inputs may be strided views (a q straight out of a fused qkv projection): kernels take
strides, so the model's layouts are never copied. Outputs are new contiguous tensors;
rope writes q and k in place.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

SILU_BLOCK = 1024  # output columns of one silu_and_mul program


@triton.jit
def _rms_norm_kernel(x_ptr, r_ptr, w_ptr, out_ptr, h_ptr, rows_b, eps,
                     sx_a, sx_b, sx_c, sr_a, sr_b, sr_c,
                     C: tl.constexpr, BLOCK_C: tl.constexpr, RESIDUAL: tl.constexpr):
    # one program per row of x viewed as [A, B, C]: row = a * B + b. out and h are
    # contiguous [rows, C]. h_ptr is h, or x when there is no residual (never written
    # then); its dtype is the one the normalized row rounds to.
    row = tl.program_id(0).to(tl.int64)
    a = row // rows_b
    b = row % rows_b
    c = tl.arange(0, BLOCK_C)
    mask = c < C
    x = tl.load(x_ptr + a * sx_a + b * sx_b + c * sx_c, mask=mask, other=0.0).to(tl.float32)
    if RESIDUAL:
        r = tl.load(r_ptr + a * sr_a + b * sr_b + c * sr_c, mask=mask, other=0.0)
        h = (x + r.to(tl.float32)).to(h_ptr.dtype.element_ty)  # as torch's x + residual
        tl.store(h_ptr + row * C + c, h, mask=mask)
        x = h.to(tl.float32)
    rstd = tl.math.rsqrt(tl.sum(x * x, axis=0) / C + eps)
    normed = (x * rstd).to(h_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + c, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * C + c, (normed * w).to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm(x: Tensor, weight: Tensor, eps: float,
             residual: Tensor | None = None) -> Tensor | tuple[Tensor, Tensor]:
    """As Driver.rms_norm: x [..., C], weight [C]; returns weight * normalize(x), or with
    residual [..., C] (x's shape) the pair (weight * normalize(h), h) for h = x + residual.
    Dtypes follow torch's promotion as the default's do (all x's dtype when the three
    agree). The inputs are not modified."""
    C = x.shape[-1]
    assert weight.shape == (C,), f"weight must be [{C}], got {tuple(weight.shape)}"
    h_dtype = x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)
    out = torch.empty(x.shape, dtype=torch.promote_types(h_dtype, weight.dtype), device=x.device)
    h = None if residual is None else torch.empty(x.shape, dtype=h_dtype, device=x.device)
    if x.numel():
        x3 = _as_3d(x)
        r3 = x3 if residual is None else _as_3d(residual)
        assert r3.shape == x3.shape, f"residual {tuple(residual.shape)} is not x's {tuple(x.shape)}"
        A, B, _ = x3.shape
        block_c = triton.next_power_of_2(C)
        _rms_norm_kernel[(A * B,)](
            x3, r3, weight.contiguous(), out, x3 if h is None else h, B, eps,
            *x3.stride(), *r3.stride(),
            C=C, BLOCK_C=block_c, RESIDUAL=residual is not None,
            num_warps=min(max(block_c // 512, 1), 16))
    return out if h is None else (out, h)


def _as_3d(x: Tensor) -> Tensor:
    """x [..., C] as a view [A, B, C]: [T, C] is [1, T, C], [T, H, D] itself. More leading
    dims are folded into two, a copy only where their strides do not fold."""
    if x.dim() > 3:
        return x.flatten(0, -3)
    return x.view((1,) * (3 - x.dim()) + tuple(x.shape)) if x.dim() < 3 else x


@triton.jit
def _rotate(x_ptr, stride_h, stride_d, cos, sin, H: tl.constexpr, HALF: tl.constexpr,
            H_PAD: tl.constexpr, HALF_PAD: tl.constexpr):
    # x_ptr: one token's heads [H, D]; cos, sin [1, HALF_PAD] float32
    h = tl.arange(0, H_PAD)[:, None]
    d = tl.arange(0, HALF_PAD)[None, :]
    mask = (h < H) & (d < HALF)
    p1 = x_ptr + h * stride_h + d * stride_d
    p2 = p1 + HALF * stride_d
    x1 = tl.load(p1, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(p2, mask=mask, other=0.0).to(tl.float32)
    tl.store(p1, (x1 * cos - x2 * sin).to(x_ptr.dtype.element_ty), mask=mask)
    tl.store(p2, (x2 * cos + x1 * sin).to(x_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rope_kernel(q_ptr, k_ptr, cos_ptr, sin_ptr,
                 sq_t, sq_h, sq_d, sk_t, sk_h, sk_d, scos_t, scos_d, ssin_t, ssin_d,
                 H: tl.constexpr, HKV: tl.constexpr, HALF: tl.constexpr,
                 H_PAD: tl.constexpr, HKV_PAD: tl.constexpr, HALF_PAD: tl.constexpr):
    # one program per token t: its cos, sin [D/2] rotate all heads of q[t] and k[t]
    t = tl.program_id(0).to(tl.int64)
    d = tl.arange(0, HALF_PAD)
    cos = tl.load(cos_ptr + t * scos_t + d * scos_d, mask=d < HALF, other=0.0)
    sin = tl.load(sin_ptr + t * ssin_t + d * ssin_d, mask=d < HALF, other=0.0)
    cos = cos.to(tl.float32)[None, :]
    sin = sin.to(tl.float32)[None, :]
    _rotate(q_ptr + t * sq_t, sq_h, sq_d, cos, sin, H, HALF, H_PAD, HALF_PAD)
    _rotate(k_ptr + t * sk_t, sk_h, sk_d, cos, sin, HKV, HALF, HKV_PAD, HALF_PAD)


def rope(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> None:
    """As Driver.rope: rotate-half rotary embedding of q [T, H, D] and k [T, Hkv, D] in
    place, with cos, sin [T, D/2]. q and k may be strided views (of a fused qkv)."""
    T, H, D = q.shape
    Hkv = k.shape[1]
    half = D // 2
    assert k.shape == (T, Hkv, D) and D % 2 == 0, f"q {tuple(q.shape)}, k {tuple(k.shape)}"
    assert cos.shape == (T, half) and sin.shape == (T, half), \
        f"cos, sin must be [{T}, {half}], got {tuple(cos.shape)}, {tuple(sin.shape)}"
    if T == 0:
        return
    _rope_kernel[(T,)](
        q, k, cos, sin, *q.stride(), *k.stride(), *cos.stride(), *sin.stride(),
        H=H, HKV=Hkv, HALF=half, H_PAD=triton.next_power_of_2(H),
        HKV_PAD=triton.next_power_of_2(Hkv), HALF_PAD=triton.next_power_of_2(half))


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, stride_row, stride_col, inter,
                         BLOCK: tl.constexpr):
    # program (row, j): output columns [j*BLOCK, (j+1)*BLOCK) of one row; out is
    # contiguous [rows, I], inter = I
    row = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = c < inter
    base = x_ptr + row * stride_row
    gate = tl.load(base + c * stride_col, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(base + (c + inter) * stride_col, mask=mask, other=0.0).to(tl.float32)
    act = (gate / (1.0 + tl.exp(-gate))).to(x_ptr.dtype.element_ty)  # torch rounds silu()
    tl.store(out_ptr + row * inter + c, (act.to(tl.float32) * up).to(out_ptr.dtype.element_ty),
             mask=mask)


def silu_and_mul(x: Tensor) -> Tensor:
    """As Driver.silu_and_mul: x [..., 2I] (gate, then up) -> silu(gate) * up [..., I]."""
    inter = x.shape[-1] // 2
    out = torch.empty(x.shape[:-1] + (inter,), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    x2 = x.reshape(-1, x.shape[-1])  # a view for the [T, 2I] of a projection
    _silu_and_mul_kernel[(x2.shape[0], triton.cdiv(inter, SILU_BLOCK))](
        x2, out, x2.stride(0), x2.stride(1), inter, BLOCK=SILU_BLOCK)
    return out
