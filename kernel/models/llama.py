"""The decoder of the Llama family (llama, mistral, qwen2, qwen3) over a paged KV cache.

Weights arrive with Hugging Face names (the loader has checked them) and are handed to the
driver at load: each Linear becomes the driver's prepared form (prepare_linear may
prepack, convert or quantize it), with q/k/v fused into one GEMM and gate/up into
another; a tied lm_head stays the embedding itself. The forward pass takes the whole
batch flattened into T tokens and calls only driver ops: embed, rms_norm (fused with the
residual add), linear, rope, silu_and_mul, store_kv and paged_attention. The default
ops follow transformers' numerics (RMSNorm in float32, rotary angles in float32), so
float32 greedy outputs are token-identical on the same weights.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from llmos.drivers.base import LinearWeight
from llmos.drivers.quant import check_quantize

from ..config import ModelConfig, rope_inv_freq
from ..loader import expected_weight_shapes

ROPE_TABLE_BYTES = 64 << 20   # cos/sin of every position are precomputed up to this size


@dataclass
class AttentionBatch:
    """Where this step's tokens go in the KV pool and what they attend to (DESIGN.md, Drivers)."""
    slot_mapping: Tensor     # [T] int64: block * block_size + offset of each new token
    block_tables: Tensor     # [S, max_blocks] int32
    seq_lens: Tensor         # [S] int32: tokens in the cache per sequence, new ones included
    query_start_loc: Tensor  # [S+1] int32: prefix sums of new tokens per sequence


@dataclass
class Layer:
    """One decoder layer's weights, prepared by the driver."""
    input_norm: Tensor               # [C]
    qkv: LinearWeight                # C -> (H + 2 Hkv) D: q, k, v in one GEMM
    q_norm: Tensor | None            # [D] (qwen3's per-head norm) or None
    k_norm: Tensor | None
    o: LinearWeight                  # H D -> C
    post_norm: Tensor                # [C]
    gate_up: LinearWeight            # C -> 2 I: gate, then up
    down: LinearWeight               # I -> C


class CausalLM:
    """`forward` runs the decoder over a flattened batch; `logits` projects chosen rows."""

    def __init__(self, cfg: ModelConfig, driver, embed: Tensor, layers: list[Layer],
                 norm: Tensor, head: LinearWeight):
        self.config, self.driver = cfg, driver
        self.embed, self.layers, self.norm, self.head = embed, layers, norm, head
        self.dtype = embed.dtype
        self.inv_freq = rope_inv_freq(cfg).to(driver.device)                 # [D/2] float32
        self.rope_table = None                  # (cos, sin) [max_pos, D/2] in dtype, or None
        max_pos = cfg.max_position_embeddings
        if 2 * max_pos * self.inv_freq.numel() * self.dtype.itemsize <= ROPE_TABLE_BYTES:
            self.rope_table = self.rope_angles(torch.arange(max_pos, device=driver.device))
        H, Hkv, D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.heads, self.split, self.scale = (H, Hkv, D), [H * D, Hkv * D, Hkv * D], D ** -0.5

    @classmethod
    def from_weights(cls, cfg: ModelConfig, weights: dict[str, Tensor], driver,
                     quantize: str | None = None) -> "CausalLM":
        """Adopt `weights` (HF names, checked by the loader; consumed) onto the driver.
        quantize (None or "int8") goes to prepare_linear for every layer's Linear and an
        untied lm_head; the embedding and the norms stay in their dtype. Raises ValueError
        naming a weight the checkpoint lacks, or for an unknown quantize."""
        check_quantize(quantize)
        device = driver.device

        def take(name: str, optional: bool = False) -> Tensor | None:
            t = weights.pop(name, None)
            if t is None and not optional:
                raise ValueError(f"checkpoint lacks weights: {name}")
            return None if t is None else t.to(device)

        def linear(prefix: str, names: list[str], bias: bool) -> LinearWeight:
            ws = [take(f"{prefix}{n}.weight") for n in names]
            bs = [take(f"{prefix}{n}.bias") for n in names] if bias else None
            w = ws[0] if len(ws) == 1 else torch.cat(ws)
            b = None if bs is None else bs[0] if len(bs) == 1 else torch.cat(bs)
            del ws, bs
            return driver.prepare_linear(w, b, quantize=quantize)

        embed = take("model.embed_tokens.weight")
        layers = []
        for i in range(cfg.num_hidden_layers):
            p = f"model.layers.{i}."
            layers.append(Layer(
                input_norm=take(p + "input_layernorm.weight"),
                qkv=linear(p + "self_attn.", ["q_proj", "k_proj", "v_proj"], cfg.attention_bias),
                q_norm=take(p + "self_attn.q_norm.weight") if cfg.qk_norm else None,
                k_norm=take(p + "self_attn.k_norm.weight") if cfg.qk_norm else None,
                o=linear(p + "self_attn.", ["o_proj"], cfg.attention_out_bias),
                post_norm=take(p + "post_attention_layernorm.weight"),
                gate_up=linear(p + "mlp.", ["gate_proj", "up_proj"], cfg.mlp_bias),
                down=linear(p + "mlp.", ["down_proj"], cfg.mlp_bias)))
        norm = take("model.norm.weight")
        if cfg.tie_word_embeddings:
            weights.pop("lm_head.weight", None)
            # The embedding itself: prepared apart (prepacked, quantized) it is held twice.
            head = LinearWeight.plain(embed)
        else:
            head = driver.prepare_linear(take("lm_head.weight"), quantize=quantize)
        return cls(cfg, driver, embed, layers, norm, head)

    @staticmethod
    def estimate_bytes(cfg: ModelConfig, dtype: torch.dtype, quantize: str | None = None) -> int:
        """Bytes from_weights will hold for a model of config cfg in dtype, known before
        loading (the model table admits loads by it): weight_bytes after the load, on a
        driver that keeps a prepared weight's size (cpu and cuda do). Every tensor in
        dtype; with int8, each Linear that from_weights quantizes one byte a weight plus
        a scale a row in dtype. Raises ValueError for an unknown quantize."""
        check_quantize(quantize)
        total = 0
        for name, shape in expected_weight_shapes(cfg).items():
            n = math.prod(shape)
            quantized = quantize == "int8" and (name.endswith("_proj.weight")
                                                or name == "lm_head.weight")
            total += n + shape[0] * dtype.itemsize if quantized else n * dtype.itemsize
        return total

    @property
    def weight_bytes(self) -> int:
        """Bytes the prepared weights hold, each counted once (a tied head is the embedding)."""
        def size(t):
            return 0 if t is None else t.numel() * t.element_size()
        shared = self.head.weight is self.embed
        total = size(self.embed) + size(self.norm) + (0 if shared else self.head.nbytes)
        for layer in self.layers:
            total += sum(size(t) for t in (layer.input_norm, layer.post_norm, layer.q_norm,
                                           layer.k_norm))
            total += layer.qkv.nbytes + layer.o.nbytes + layer.gate_up.nbytes + layer.down.nbytes
        return total

    def forward(self, input_ids: Tensor, positions: Tensor, kv_caches: list,
                batch: AttentionBatch) -> Tensor:
        """input_ids, positions: [T]; returns the final hidden states [T, hidden]."""
        d, eps = self.driver, self.config.rms_norm_eps
        x = d.embed(input_ids, self.embed)                                   # x: [T, C]
        if self.rope_table is None:
            cos, sin = self.rope_angles(positions)
        else:
            cos, sin = (t.index_select(0, positions) for t in self.rope_table)
        residual = None
        for layer, kv_cache in zip(self.layers, kv_caches):
            if residual is None:
                h, residual = d.rms_norm(x, layer.input_norm, eps), x
            else:
                h, residual = d.rms_norm(x, layer.input_norm, eps, residual)
            x = self.attention(layer, h, cos, sin, kv_cache, batch)
            h, residual = d.rms_norm(x, layer.post_norm, eps, residual)
            x = d.linear(d.silu_and_mul(d.linear(h, layer.gate_up)), layer.down)
        if residual is None:
            return d.rms_norm(x, self.norm, eps)
        return d.rms_norm(x, self.norm, eps, residual)[0]

    def __call__(self, *args) -> Tensor:
        return self.forward(*args)

    def rope_angles(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """cos, sin [T, D/2] in the model's dtype, from float32 angles as transformers."""
        angles = positions.float()[:, None] * self.inv_freq[None, :]
        return angles.cos().to(self.dtype), angles.sin().to(self.dtype)

    def attention(self, layer: Layer, x: Tensor, cos: Tensor, sin: Tensor, kv_cache,
                  batch: AttentionBatch) -> Tensor:
        d, eps = self.driver, self.config.rms_norm_eps
        (H, Hkv, D), T = self.heads, x.shape[0]
        q, k, v = d.linear(x, layer.qkv).split(self.split, dim=-1)
        q, k, v = q.view(T, H, D), k.view(T, Hkv, D), v.view(T, Hkv, D)   # views of one GEMM
        if layer.q_norm is not None:
            q, k = d.rms_norm(q, layer.q_norm, eps), d.rms_norm(k, layer.k_norm, eps)
        d.rope(q, k, cos, sin)
        k_cache, v_cache = kv_cache
        d.store_kv(k, v, k_cache, v_cache, batch.slot_mapping)
        o = d.paged_attention(q, k_cache, v_cache, batch.block_tables, batch.seq_lens,
                              batch.query_start_loc, self.scale)            # o: [T, H, D]
        return d.linear(o.reshape(T, H * D), layer.o)

    def logits(self, hidden: Tensor) -> Tensor:
        """hidden: [S, hidden] -> float32 logits [S, vocab]."""
        return self.driver.linear(hidden, self.head).float()
