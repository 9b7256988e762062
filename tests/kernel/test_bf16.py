"""bfloat16, the dtype "auto" picks on CPUs with AVX512-BF16 or AMX (and most GPUs), checked
on any machine: it keeps tiny's answers (held-out accuracy within 0.5 points of float32),
and its logits stay within twice transformers' own bfloat16 error of the float32 model.
(float32 is held to token identity with transformers in test_engine.py.)"""
from __future__ import annotations

import torch

from llmos.kernel import Engine
from llmos.kernel.models.llama import AttentionBatch
from llmos.kernel.tiny import tasks

PER_TASK = 80     # held-out examples of each task: 240 in all, one answer is 0.42 points


def tiny_answers(dtype: str | Engine, per_task: int = PER_TASK):
    """(greedy token ids, accuracy) of tiny (loaded in dtype, or this engine) on
    per_task held-out examples of each task."""
    engine = dtype if isinstance(dtype, Engine) else Engine.from_pretrained("tiny", dtype=dtype)
    cases = [ex + (task,) for task in tasks.TASKS for ex in tasks.examples(task, per_task, "test")]
    prompts = [engine.tokenizer.encode_chat(p) if isinstance(p, list) else engine.tokenizer.encode(p)
               for p, _, _ in cases]
    got = engine.generate(prompts, max_tokens=12)
    right = [tasks.score(task, c.text, expected) for c, (_, expected, task) in zip(got, cases)]
    return [c.token_ids for c in got], sum(right) / len(right)


def test_bf16_keeps_tinys_accuracy():
    tokens32, acc32 = tiny_answers("float32")
    tokens16, acc16 = tiny_answers("bfloat16")
    assert abs(acc16 - acc32) <= 0.005, (acc16, acc32)
    same = sum(a == b for a, b in zip(tokens16, tokens32)) / len(tokens32)
    assert same >= 0.9, f"only {same:.0%} of greedy answers agree with float32"


def prefill_logits(path, dtype: str, ids: list[int], quantize: str | None = None) -> torch.Tensor:
    """Logits at every position of one prompt, through the engine's model and KV pool."""
    engine = Engine.from_pretrained(str(path), dtype=dtype, quantize=quantize, num_blocks=16)
    n, bs = len(ids), engine.block_size
    batch = AttentionBatch(slot_mapping=torch.arange(n),
                           block_tables=torch.arange(-(-n // bs), dtype=torch.int32)[None],
                           seq_lens=torch.tensor([n], dtype=torch.int32),
                           query_start_loc=torch.tensor([0, n], dtype=torch.int32))
    with torch.inference_mode():
        hidden = engine.model(torch.tensor(ids), torch.arange(n), engine.kv_caches, batch)
        return engine.model.logits(hidden)


def test_bf16_logits_stay_within_transformers_own_bf16_error(checkpoints):
    from transformers import AutoModelForCausalLM
    ids = list(range(5, 45))
    ref = {}
    for dtype in (torch.float32, torch.bfloat16):
        hf = AutoModelForCausalLM.from_pretrained(checkpoints["llama"], dtype=dtype).eval()
        with torch.no_grad():
            ref[dtype] = hf(torch.tensor([ids])).logits[0].float()
    ours32 = prefill_logits(checkpoints["llama"], "float32", ids)
    ours16 = prefill_logits(checkpoints["llama"], "bfloat16", ids)
    torch.testing.assert_close(ours32, ref[torch.float32], atol=1e-4, rtol=0)
    hf_error = (ref[torch.bfloat16] - ref[torch.float32]).abs().max().item()
    assert hf_error > 0, "the bf16 reference ran in float32"
    assert (ours16 - ref[torch.bfloat16]).abs().max().item() <= 2 * hf_error
    assert (ours16 - ref[torch.float32]).abs().max().item() <= 2 * hf_error
