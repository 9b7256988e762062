"""The decoder of the Llama family (llama, mistral, qwen2, qwen3) over a paged KV cache.

One module tree with Hugging Face parameter names, so a checkpoint's state dict loads
as it is. The forward pass takes the whole batch flattened into T tokens; attention
reads and writes the KV pool only through the driver's `store_kv` / `paged_attention`.
The numerics follow transformers' reference (RMSNorm in float32, rotary embedding from
float32 angles) so that greedy outputs are token-identical on the same weights.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from ..config import ModelConfig, rope_inv_freq


@dataclass
class AttentionBatch:
    """Where this step's tokens go in the KV pool and what they attend to (DESIGN.md, Drivers)."""
    slot_mapping: torch.Tensor     # [T] int64: block * block_size + offset of each new token
    block_tables: torch.Tensor     # [S, max_blocks] int32
    seq_lens: torch.Tensor         # [S] int32: tokens in the cache per sequence, new ones included
    query_start_loc: torch.Tensor  # [S+1] int32: prefix sums of new tokens per sequence


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: [T, H, D]; cos, sin: [T, 1, D]
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = (
            cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim)
        bias = cfg.attention_bias
        self.q_proj = nn.Linear(cfg.hidden_size, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, cfg.hidden_size,
                                bias=cfg.attention_out_bias)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        self.scale = self.head_dim ** -0.5

    def forward(self, x, cos, sin, kv_cache, batch: AttentionBatch, driver) -> torch.Tensor:
        T = x.shape[0]
        q = self.q_proj(x).view(T, self.num_heads, self.head_dim)      # q: [T, H, D]
        k = self.k_proj(x).view(T, self.num_kv_heads, self.head_dim)   # k: [T, Hkv, D]
        v = self.v_proj(x).view(T, self.num_kv_heads, self.head_dim)   # v: [T, Hkv, D]
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        k_cache, v_cache = kv_cache
        driver.store_kv(k, v, k_cache, v_cache, batch.slot_mapping)
        o = driver.paged_attention(q, k_cache, v_cache, batch.block_tables, batch.seq_lens,
                                   batch.query_start_loc, self.scale)   # o: [T, H, D]
        return self.o_proj(o.reshape(T, self.num_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        bias = cfg.mlp_bias
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=bias)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, kv_cache, batch, driver):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, kv_cache, batch, driver)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        # Built only to adopt checkpoint weights: an explicit (meta) weight skips the random
        # init, whose normal_ on meta tensors imports torch._dynamo (~2.7 s of every boot).
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size,
                                         _weight=torch.empty(cfg.vocab_size, cfg.hidden_size))
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class CausalLM(nn.Module):
    """`forward` runs the decoder over a flattened batch; `logits` projects chosen rows."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = Backbone(cfg)
        if not cfg.tie_word_embeddings:
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    @classmethod
    def from_weights(cls, cfg: ModelConfig, weights: dict[str, torch.Tensor],
                     device: torch.device) -> "CausalLM":
        """Build on the meta device and adopt `weights` (HF names, already checked by the loader)."""
        with torch.device("meta"):
            model = cls(cfg)
        if cfg.tie_word_embeddings:
            weights = {n: t for n, t in weights.items() if n != "lm_head.weight"}
        weights = {n: t.to(device) for n, t in weights.items()}
        model.load_state_dict(weights, strict=False, assign=True)
        model.register_buffer("inv_freq", rope_inv_freq(cfg).to(device), persistent=False)
        missing = [n for n, p in model.named_parameters() if p.is_meta]
        if missing:
            raise ValueError(f"checkpoint lacks weights: {', '.join(missing[:5])}")
        return model.eval().requires_grad_(False)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list, batch: AttentionBatch, driver) -> torch.Tensor:
        """input_ids, positions: [T]; returns the final hidden states [T, hidden]."""
        x = self.model.embed_tokens(input_ids)                          # x: [T, hidden]
        angles = positions.float()[:, None] * self.inv_freq[None, :]    # [T, D/2]
        emb = torch.cat((angles, angles), dim=-1)[:, None, :]           # [T, 1, D]
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        for layer, kv_cache in zip(self.model.layers, kv_caches):
            x = layer(x, cos, sin, kv_cache, batch, driver)
        return self.model.norm(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [S, hidden] -> float32 logits [S, vocab]."""
        head = self.model.embed_tokens.weight if self.config.tie_word_embeddings \
            else self.lm_head.weight
        return F.linear(hidden, head).float()
