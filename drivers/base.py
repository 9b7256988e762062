"""The Driver interface: the narrow waist between the kernel and one kind of hardware.

The kernel sees a driver through these methods only. Shapes use the names of DESIGN.md:
T new tokens in a batch, S sequences, H query heads, Hkv KV heads (H a multiple of Hkv),
D head size. A KV cache is, per layer, a pair (k_cache, v_cache), each
[num_blocks, block_size, Hkv, D]; a slot is block * block_size + offset. The swap pool
has the same layout in host memory; a block moves between the two whole, every layer.

Beyond attention the driver owns the model's heavy ops (prepare_linear / linear, rms_norm,
rope, silu_and_mul, embed), so it can choose their backend: prepacked or quantized
weights, fused kernels. The defaults here are plain torch with the numerics of
transformers' reference (RMSNorm in float32, rotate-half rope), so a new driver works as
soon as it implements the KV ops, and overrides only what it accelerates.

A driver registers through the entry-point group `llmos.drivers` (see registry.py), and
is checked there: it must subclass Driver, name itself, declare its device, and leave no
abstract method unimplemented.
"""
from __future__ import annotations

import re
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from .pools import zeroed_pool
from .quant import check_quantize, int8_linear, quantize_int8

KVCache = list[tuple[Tensor, Tensor]]  # per layer (k_cache, v_cache)
Blocks = Tensor | Sequence[int]        # block numbers: a 1-D int tensor or a list


class OutOfDeviceMemory(MemoryError, ValueError):
    """An allocation larger than the driver's free memory. Also a ValueError: asking for a
    pool the device cannot hold is the caller's mistake (a kv_memory too large), not a bug."""


@dataclass(frozen=True)
class Capabilities:
    """What a driver's KV ops accept; the default allocate_kv_cache checks it."""
    dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16, torch.float16)
    block_sizes: tuple[int, ...] | None = None  # None: any positive block size

    def check(self, dtype: torch.dtype, block_size: int) -> None:
        """Raise ValueError naming the dtype or block size this driver does not support."""
        if dtype not in self.dtypes:
            names = ", ".join(str(d).removeprefix("torch.") for d in self.dtypes)
            raise ValueError(f"dtype {str(dtype).removeprefix('torch.')} is not supported "
                             f"by this driver (supported: {names})")
        if block_size < 1 or (self.block_sizes is not None and block_size not in self.block_sizes):
            allowed = "any positive" if self.block_sizes is None else \
                ", ".join(map(str, self.block_sizes))
            raise ValueError(f"block size {block_size} is not supported by this driver "
                             f"(supported: {allowed})")


@dataclass(frozen=True)
class LinearWeight:
    """A Linear layer's weight in the form its driver computes with (prepare_linear).

    `weight` is the driver's own: the [out, in] tensor as given, or a prepacked, converted
    or quantized form only that driver's `linear` reads. `bias` is [out] or None. With
    `scales`, weight is int8 [out, in] standing for weight * scales[:, None] (quant.py).
    """
    weight: Tensor
    bias: Tensor | None
    in_features: int
    out_features: int
    dtype: torch.dtype    # the dtype linear() takes and returns
    nbytes: int           # memory the prepared weight, scales and bias hold
    scales: Tensor | None = None   # int8: [out] per-output-channel scales, in dtype

    @classmethod
    def plain(cls, weight: Tensor, bias: Tensor | None = None) -> "LinearWeight":
        """weight [out, in] and bias [out] or None as given, not copied: the form every
        driver's linear takes. Raises ValueError on shapes that do not match."""
        out_features, in_features = _check_linear(weight, bias)
        nbytes = _nbytes(weight) + (_nbytes(bias) if bias is not None else 0)
        return cls(weight, bias, in_features, out_features, weight.dtype, nbytes)


class Driver(ABC):
    # Declared by every driver class; the registry refuses a class without them.
    name: str              # the name get_driver() knows it by (its entry-point name)
    device: torch.device   # where the KV pool and the weights live
    priority: int = 0      # "auto" prefers higher among plugins; negative: never picked by auto
    capabilities: Capabilities = Capabilities()

    @classmethod
    @abstractmethod
    def is_available(cls) -> bool:
        """True when this machine has the hardware and libraries the driver needs."""

    @classmethod
    def unavailable_reason(cls) -> str | None:
        """Why is_available() is False, in words for `llmos drivers`; None when available."""
        return None if cls.is_available() else "the hardware or libraries it needs are missing"

    @abstractmethod
    def memory_info(self) -> tuple[int, int]:
        """(free, total) bytes of the memory the KV pool and weights live in."""

    def synchronize(self) -> None:
        """Wait until every queued op on the device has finished (no-op where ops are eager)."""

    def preferred_dtype(self) -> tuple[torch.dtype, str]:
        """The dtype dtype="auto" loads weights and KV in, and why, in words for sysinfo."""
        return torch.float32, "the driver knows no faster dtype"

    # ---- memory: the KV pool on the device, the swap pool on the host ------------------
    def allocate_kv_cache(self, num_layers: int, num_blocks: int, block_size: int,
                          num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> KVCache:
        """Per layer a zero-filled (k_cache, v_cache), each [num_blocks, block_size, Hkv, D],
        on self.device. Raises ValueError for an unsupported dtype or block size, and
        OutOfDeviceMemory where the driver can tell the pool does not fit."""
        self.capabilities.check(dtype, block_size)
        return zeroed_pool(num_layers, (num_blocks, block_size, num_kv_heads, head_dim), dtype,
                      self.device)

    def allocate_swap(self, num_layers: int, num_blocks: int, block_size: int,
                      num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> KVCache:
        """The host swap pool: per layer a zero-filled (k_host, v_host), each
        [num_blocks, block_size, Hkv, D] in CPU memory (a driver may pin it for fast copies).
        num_blocks here counts host blocks, independent of the device pool's."""
        self.capabilities.check(dtype, block_size)
        return zeroed_pool(num_layers, (num_blocks, block_size, num_kv_heads, head_dim), dtype,
                      torch.device("cpu"))

    def swap_out(self, caches: KVCache, host_caches: KVCache, device_blocks: Blocks,
                 host_blocks: Blocks) -> None:
        """Copy device block device_blocks[i] to host block host_blocks[i], every layer, K and V.

        caches from allocate_kv_cache, host_caches from allocate_swap, same layout. On
        return the device blocks may be reused (call synchronize first on an async driver
        if the copy is queued). Raises ValueError when the two block lists differ in length.
        """
        src, dst = _pair(device_blocks, self.device, host_blocks, torch.device("cpu"))
        if src.numel() == 0:
            return
        for (k, v), (k_host, v_host) in zip(caches, host_caches, strict=True):
            k_host.index_copy_(0, dst, k.index_select(0, src).to(k_host.device))
            v_host.index_copy_(0, dst, v.index_select(0, src).to(v_host.device))

    def swap_in(self, caches: KVCache, host_caches: KVCache, host_blocks: Blocks,
                device_blocks: Blocks) -> None:
        """Copy host block host_blocks[i] to device block device_blocks[i], every layer, K and V.

        The inverse of swap_out; the host blocks are left as they were (free them after).
        Raises ValueError when the two block lists differ in length.
        """
        src, dst = _pair(host_blocks, torch.device("cpu"), device_blocks, self.device)
        if src.numel() == 0:
            return
        for (k, v), (k_host, v_host) in zip(caches, host_caches, strict=True):
            k.index_copy_(0, dst, k_host.index_select(0, src).to(k.device))
            v.index_copy_(0, dst, v_host.index_select(0, src).to(v.device))

    # ---- KV ops ---------------------------------------------------------------------
    @abstractmethod
    def store_kv(self, k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor,
                 slot_mapping: Tensor) -> None:
        """Write k, v [T, Hkv, D] into the caches at slot_mapping [T] int64; slot -1 is skipped."""

    @abstractmethod
    def paged_attention(self, q: Tensor, k_cache: Tensor, v_cache: Tensor,
                        block_tables: Tensor, seq_lens: Tensor, query_start_loc: Tensor,
                        scale: float) -> Tensor:
        """Attention of the new tokens over their sequences' cached KV; returns o [T, H, D].

        q: [T, H, D]; block_tables: [S, max_blocks] int32, entries past a sequence's
        blocks are ignored (any value); seq_lens: [S] int32, cached tokens including the
        new ones; query_start_loc: [S+1] int32, prefix sums of new tokens per sequence.
        New token j of sequence s (q_len new tokens) sits at position seq_len - q_len + j
        and attends to positions 0..that position. Its KV is already stored. Query head h
        uses KV head h // (H // Hkv).
        """

    def copy_blocks(self, caches: KVCache, src: Blocks, dst: Blocks) -> None:
        """Copy block src[i] to block dst[i] in every layer, K and V (all reads before writes)."""
        src = torch.as_tensor(src, dtype=torch.int64, device=self.device)
        dst = torch.as_tensor(dst, dtype=torch.int64, device=self.device)
        if src.numel() == 0:
            return
        for k_cache, v_cache in caches:
            k_cache.index_copy_(0, dst, k_cache.index_select(0, src))
            v_cache.index_copy_(0, dst, v_cache.index_select(0, src))

    def poison_blocks(self, caches: KVCache, blocks: Blocks) -> None:
        """Fill the given blocks with NaN in every layer (debug mode: freed blocks must not be read)."""
        blocks = torch.as_tensor(blocks, dtype=torch.int64, device=self.device)
        if blocks.numel() == 0:
            return
        for k_cache, v_cache in caches:
            k_cache.index_fill_(0, blocks, float("nan"))
            v_cache.index_fill_(0, blocks, float("nan"))


    # ---- model ops: what a forward pass needs besides attention -------------------------
    # x: [T, C] (T tokens of the flattened batch); every op returns in x's dtype.

    def prepare_linear(self, weight: Tensor, bias: Tensor | None = None,
                       quantize: str | None = None) -> LinearWeight:
        """Prepare a Linear layer at load: weight [out, in], bias [out] or None, both on
        self.device in the model's dtype. The driver may keep, prepack or convert them;
        the caller drops its own references after. quantize "int8" stores the weight in
        one byte with a scale per output channel (quant.py; the bias stays as given), and
        linear computes with it in the model's dtype. Raises ValueError on shapes that do
        not match, or a quantize that is not None or one of quant.QUANTIZE."""
        check_quantize(quantize)
        plain = LinearWeight.plain(weight.contiguous(), bias)
        if quantize is None:
            return plain
        q, scales = quantize_int8(plain.weight)
        nbytes = _nbytes(q) + _nbytes(scales) + (_nbytes(bias) if bias is not None else 0)
        return LinearWeight(q, bias, plain.in_features, plain.out_features, plain.dtype,
                            nbytes, scales)

    def linear(self, x: Tensor, w: LinearWeight) -> Tensor:
        """x [T, in] -> x @ weight.T + bias: [T, out], in x's dtype. w is what this
        driver's prepare_linear made, or a LinearWeight.plain (a tied lm_head: the
        embedding itself), which every driver takes."""
        if w.scales is not None:
            return int8_linear(x, w.weight, w.scales, w.bias)
        return torch.nn.functional.linear(x, w.weight, w.bias)

    def rms_norm(self, x: Tensor, weight: Tensor, eps: float,
                 residual: Tensor | None = None) -> Tensor | tuple[Tensor, Tensor]:
        """RMSNorm over the last dim: x [..., C], weight [C].

        Without residual, returns weight * normalize(x). With residual [..., C], the add
        is fused: h = x + residual, returns (weight * normalize(h), h), h being the next
        residual. normalize runs in float32 and rounds to x's dtype before the weight
        multiplies (transformers' order, so float32 outputs are bit-identical to it).
        """
        if residual is not None:
            x = x + residual
            return self.rms_norm(x, weight, eps), x
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
        return weight * h.to(x.dtype)

    def rope(self, q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> None:
        """Rotary embedding, in place, rotate-half (GPT-NeoX) layout: q [T, H, D],
        k [T, Hkv, D]; cos, sin [T, D/2] in q's dtype (the model computes the angles, so
        rope scaling stays the model's). For each head: with x1, x2 the two halves,
        x1 <- x1*cos - x2*sin, x2 <- x2*cos + x1*sin."""
        cos, sin = cos[:, None, :], sin[:, None, :]
        for x in (q, k):
            half = x.shape[-1] // 2
            x1, x2 = x[..., :half], x[..., half:]
            r1 = x1 * cos - x2 * sin
            r2 = x2 * cos + x1 * sin
            x1.copy_(r1)
            x2.copy_(r2)

    def silu_and_mul(self, x: Tensor) -> Tensor:
        """x [T, 2I] (gate, then up) -> silu(gate) * up: [T, I]."""
        half = x.shape[-1] // 2
        return torch.nn.functional.silu(x[..., :half]) * x[..., half:]

    def embed(self, ids: Tensor, table: Tensor) -> Tensor:
        """Rows of table [V, C] for ids [T] int64: [T, C]."""
        return torch.nn.functional.embedding(ids, table)


def parse_size(value: int | str, what: str = "size") -> int:
    """512M, 1.5G, 4096 -> bytes; ValueError naming `what` and the value otherwise."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)i?B?\s*", str(value), re.I)
    if not m:
        raise ValueError(f"{what}: not a size: {value!r} (use e.g. 512M or 2G)")
    scale = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}[m[2].upper()]
    return int(float(m[1]) * scale)


def _check_linear(weight: Tensor, bias: Tensor | None) -> tuple[int, int]:
    if weight.dim() != 2:
        raise ValueError(f"linear weight must be [out, in], got shape {tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"linear bias must be [{weight.shape[0]}], got {tuple(bias.shape)}")
    return weight.shape[0], weight.shape[1]


def _nbytes(t: Tensor) -> int:
    return t.numel() * t.element_size()


def _pair(src: Blocks, src_device: torch.device, dst: Blocks,
          dst_device: torch.device) -> tuple[Tensor, Tensor]:
    """Block lists as int64 index tensors on the devices they index; equal lengths."""
    src = torch.as_tensor(src, dtype=torch.int64).to(src_device).flatten()
    dst = torch.as_tensor(dst, dtype=torch.int64).to(dst_device).flatten()
    if src.numel() != dst.numel():
        raise ValueError(f"swap: {src.numel()} source blocks but {dst.numel()} destination blocks")
    return src, dst
