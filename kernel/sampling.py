"""Sampling parameters of one request, and the sampler that turns a step's logits into tokens.

Greedy rows are decided with one argmax over the batch. Sampled rows apply, in this
order, temperature, top-k, top-p and min-p, then draw from the request's own generator
when it has a seed, so a seeded request gives the same tokens whatever it is batched with.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .errors import EngineError


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 0.0          # 0 means greedy
    top_k: int = 0                    # 0 means off
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False

    def check(self, vocab_size: int) -> "SamplingParams":
        """Raise EngineError (EINVAL) naming the first bad field; return self when all are valid."""
        def need(ok: bool, name: str, what: str):
            if not ok:
                raise EngineError(f"{name}: {what}, got {getattr(self, name)!r}")
        need(_is_int(self.max_tokens) and self.max_tokens >= 0, "max_tokens", "an integer >= 0")
        need(_is_num(self.temperature) and 0 <= self.temperature <= 100, "temperature",
             "a number in [0, 100]")
        need(_is_int(self.top_k) and self.top_k >= 0, "top_k", "an integer >= 0")
        need(_is_num(self.top_p) and 0 < self.top_p <= 1, "top_p", "a number in (0, 1]")
        need(_is_num(self.min_p) and 0 <= self.min_p <= 1, "min_p", "a number in [0, 1]")
        need(self.seed is None or _is_int(self.seed), "seed", "an integer or None")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        need(isinstance(self.stop, (list, tuple)) and all(isinstance(s, str) and s for s in self.stop),
             "stop", "a list of non-empty strings")
        need(isinstance(self.stop_token_ids, (list, tuple)) and all(
            _is_int(t) and 0 <= t < vocab_size for t in self.stop_token_ids),
            "stop_token_ids", f"a list of token ids in [0, {vocab_size})")
        need(isinstance(self.ignore_eos, bool), "ignore_eos", "a boolean")
        return self

    @classmethod
    def from_options(cls, options: dict) -> "SamplingParams":
        unknown = sorted(set(options) - set(cls.__dataclass_fields__))
        if unknown:
            raise EngineError(f"{unknown[0]}: not a sampling option")
        return cls(**options)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_num(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and x == x


def sample(logits: torch.Tensor, params: list[SamplingParams],
           generators: list[torch.Generator | None]) -> list[int]:
    """logits: [S, V] float32, one row per request; returns one token id per row."""
    tokens = logits.max(dim=-1).indices.tolist()   # first maximum, as argmax; ~3x faster on CPU
    for i, p in enumerate(params):
        if not p.greedy:
            tokens[i] = _sample_row(logits[i], p, generators[i])
    return tokens


def _sample_row(logits: torch.Tensor, p: SamplingParams, gen: torch.Generator | None) -> int:
    logits = logits / p.temperature
    if p.top_k and p.top_k < logits.numel():
        kth = torch.topk(logits, p.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if p.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        # keep the smallest prefix whose mass reaches top_p (the first token always stays)
        drop = (sorted_probs.cumsum(0) - sorted_probs) >= p.top_p
        probs = probs.scatter(0, order, sorted_probs.masked_fill(drop, 0.0))
    if p.min_p > 0:
        probs = probs.masked_fill(probs < p.min_p * probs.max(), 0.0)
    return int(torch.multinomial(probs, 1, generator=gen))
