"""Weight-only int8 at load (Engine.from_pretrained(..., quantize="int8")): what it costs in
accuracy and what it saves in memory, on the cpu driver. tiny keeps its held-out answers;
a random Llama's perplexity on a fixed text barely moves; the weights take under 0.35x
their float32 bytes; and CausalLM.estimate_bytes, which the memory budget admits loads
by, is what the loaded model then holds. (The int8 kernels themselves are checked in
tests/drivers/test_quantize.py.)"""
from __future__ import annotations

import math

import pytest
import torch

from llmos.kernel import Engine
from llmos.kernel.load import open_model
from llmos.kernel.models.llama import CausalLM
from tests.kernel.test_bf16 import prefill_logits as bf16_prefill_logits
from tests.kernel.test_bf16 import tiny_answers as bf16_tiny_answers

PER_TASK = 40     # held-out examples of each task: 120 in all, one answer is 0.83 points
TEXT = ("The quick brown fox jumps over the lazy dog. An operating system for language "
        "model agents schedules processes and memory. Hello, world! How are you today? ")


@pytest.fixture(scope="module")
def tiny():
    """tiny(dtype, quantize) -> its engine, loaded once per module."""
    engines = {}

    def load(dtype: str, quantize: str | None = None) -> Engine:
        if (dtype, quantize) not in engines:
            engines[dtype, quantize] = Engine.from_pretrained("tiny", dtype=dtype,
                                                              quantize=quantize)
        return engines[dtype, quantize]

    return load


def tiny_answers(engine: Engine):
    return bf16_tiny_answers(engine, PER_TASK)


def test_int8_keeps_tinys_answers(tiny):
    # Measured (80 a task too): every greedy answer identical to float32, accuracy 100%.
    tokens32, acc32 = tiny_answers(tiny("float32"))
    tokens8, acc8 = tiny_answers(tiny("float32", "int8"))
    assert abs(acc8 - acc32) <= 0.01, (acc8, acc32)
    same = sum(a == b for a, b in zip(tokens8, tokens32)) / len(tokens32)
    assert same >= 0.95, f"only {same:.0%} of greedy answers agree with float32"


def prefill_logits(path, quantize: str | None) -> tuple[torch.Tensor, list[int]]:
    """float32 logits at every position of TEXT, through the engine's model and KV pool."""
    ids = open_model(str(path)).tokenizer.encode(TEXT)
    return bf16_prefill_logits(path, "float32", ids, quantize), ids


def perplexity(logits: torch.Tensor, ids: list[int]) -> float:
    logp = torch.log_softmax(logits[:-1].double(), dim=-1)
    return math.exp(-logp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].mean().item())


@pytest.mark.parametrize("kind", ["llama", "qwen2"])   # untied head (quantized), tied + bias
def test_int8_perplexity_of_a_random_llama(checkpoints, kind):
    # Measured, float32 activations: perplexity (~500: random weights) moves by 7e-5
    # (llama) and 2e-4 (qwen2) of itself; the logits by 0.8% and 0.7% (L2, centered).
    logits32, ids = prefill_logits(checkpoints[kind], None)
    logits8, _ = prefill_logits(checkpoints[kind], "int8")
    ppl32, ppl8 = perplexity(logits32, ids), perplexity(logits8, ids)
    assert abs(ppl8 / ppl32 - 1) <= 1e-3, (ppl8, ppl32)
    centered = logits32 - logits32.mean(dim=-1, keepdim=True)
    assert ((logits8 - logits32).norm() / centered.norm()).item() <= 0.02


def test_int8_weights_take_under_a_third(tiny):
    # tiny's linears hold 95% of its parameters (its embedding stays float32: 0.29x).
    ratio = tiny("float32", "int8").model.weight_bytes / tiny("float32").model.weight_bytes
    assert ratio < 0.35, ratio


@pytest.mark.parametrize("dtype, quantize", [("float32", None), ("bfloat16", None),
                                             ("float32", "int8"), ("bfloat16", "int8")])
def test_estimate_bytes_is_what_tiny_holds(tiny, dtype, quantize):
    model = tiny(dtype, quantize).model
    assert CausalLM.estimate_bytes(model.config, model.dtype, quantize) == model.weight_bytes


@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3", "mistral"])
def test_estimate_bytes_is_what_each_kind_holds_in_int8(checkpoints, kind):
    model = Engine.from_pretrained(str(checkpoints[kind]), dtype="float32", quantize="int8",
                                   num_blocks=16).model
    assert model.layers[0].qkv.weight.dtype == torch.int8
    assert (model.head.weight is model.embed) == model.config.tie_word_embeddings
    if not model.config.tie_word_embeddings:
        assert model.head.weight.dtype == torch.int8
    assert CausalLM.estimate_bytes(model.config, torch.float32, "int8") == model.weight_bytes


def test_unknown_quantize_is_refused(tiny):
    with pytest.raises(ValueError, match="int8"):
        Engine.from_pretrained("tiny", quantize="int4")
    with pytest.raises(ValueError, match="int8"):
        CausalLM.estimate_bytes(tiny("float32").model.config, torch.float32, "int4")
