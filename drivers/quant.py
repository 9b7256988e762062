"""Weight-only quantization of Linear layers, behind Driver.prepare_linear and linear.

int8: symmetric, one scale per output channel. For each row of the weight [out, in],
scale = absmax(row) / 127, held in the weight's dtype, and q = round(w / scale) in
[-127, 127], so w ~ q * scale[:, None] with an error of at most scale / 2 per weight.
Activations stay in the model's dtype; only the weight is stored in one byte.

linear computes x @ (q * scale[:, None]).T. On the CPU in bfloat16, torch's
_weight_int8pack_mm does it without materializing the weight (its AVX2 kernel beat the
dense bfloat16 GEMM at 1 to 128 rows on an AVX2 CPU, 1.2-6x). Elsewhere q is converted
to x's dtype per call, the dense GEMM runs and its output is scaled: correct on any
device, the memory saved at rest, a transient of one layer's weight in x's dtype. Not
used: _weight_int8pack_mm in float32 or float16 on x86 (a scalar loop: 10-20x slower than
the dequantized GEMM at 16 rows) nor on CUDA (one thread per output, uncoalesced loads).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

QUANTIZE = ("int8",)   # the schemes prepare_linear takes; None keeps the weights as loaded
INT8_MAX = 127         # symmetric: -128 is never used, so -q is always representable
# torch's bfloat16 CPU kernel reads x and q in steps of 16 columns (8 on AVX2) with
# aligned vector loads: a row length that is not a multiple, or an x not 32-byte
# aligned, reads past the row or faults (seen: garbage for in=65, SIGSEGV for in=100).
INT8PACK_COLUMNS = 16
INT8PACK_ALIGN = 32


def check_quantize(quantize: str | None) -> None:
    """Raise ValueError unless quantize is None or one of QUANTIZE."""
    if quantize is not None and quantize not in QUANTIZE:
        raise ValueError(f"quantize: {quantize!r} is not one of {', '.join(QUANTIZE)} (or None)")


def quantize_int8(weight: Tensor) -> tuple[Tensor, Tensor]:
    """weight [out, in] -> (q [out, in] int8, scales [out] in weight's dtype).

    The scale is rounded to the weight's dtype before q is computed, so q * scales is
    within scales / 2 of weight. A row of zeros gets scale 1 (and q 0)."""
    w = weight.float()
    scales = (w.abs().amax(dim=1) / INT8_MAX).to(weight.dtype)
    scales = torch.where(scales == 0, torch.ones_like(scales), scales)
    q = (w / scales.float()[:, None]).round_().clamp_(-INT8_MAX, INT8_MAX)
    return q.to(torch.int8), scales


def int8_linear(x: Tensor, q: Tensor, scales: Tensor, bias: Tensor | None) -> Tensor:
    """x [..., in] @ (q * scales[:, None]).T + bias: [..., out] in x's dtype."""
    if _int8pack_fits(x, q):
        x2 = x.reshape(-1, q.shape[1]).contiguous()
        if x2.data_ptr() % INT8PACK_ALIGN:
            x2 = x2.clone()                   # a fresh tensor is 64-byte aligned
        y = torch._weight_int8pack_mm(x2, q, scales.to(x.dtype))       # y: [T, out]
        y = y if bias is None else y.add_(bias)
        return y.view(*x.shape[:-1], q.shape[0])
    w = q.to(x.dtype)                                                  # w: [out, in]
    if x.dtype == torch.float16:
        # x @ q.T (|q| up to 127) could pass float16's 65504: scale the weight first.
        return F.linear(x, w.mul_(scales[:, None]), bias)
    # Scaling the output instead of the weight saves a pass over the weight (2x faster
    # at decode sizes in float32).
    y = F.linear(x, w).mul_(scales.to(x.dtype))
    return y if bias is None else y.add_(bias)


def _int8pack_fits(x: Tensor, q: Tensor) -> bool:
    return (x.device.type == "cpu" and x.dtype == torch.bfloat16
            and q.shape[1] % INT8PACK_COLUMNS == 0)
