"""Engine throughput against Hugging Face transformers, and KV memory waste, in one run.

    .venv/bin/python bench/engine_throughput.py [--requests 32] [--new-tokens 64]

For each model (the embedded "tiny" and a random 4-layer d=256 Llama written to a temp
dir), the same prompts run three ways: transformers `generate` one request at a time
(what AIOS does), transformers `generate` on one static left-padded batch, and the llmos
engine with continuous batching. Every run decodes exactly --new-tokens per request.
Then 200 requests of random lengths run through the engine while each step records
allocated versus used KV token slots.
"""
from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from llmos.kernel import Engine  # noqa: E402
from llmos.kernel.load import resolve_model  # noqa: E402

console = Console(width=110)


def random_llama(path: Path, layers: int = 4, hidden: int = 256, vocab: int = 32000) -> Path:
    """A Llama with random weights and the tests' small tokenizer (vocab padded to `vocab`)."""
    from tests.checkpoints import make_checkpoint
    return make_checkpoint("llama", path, vocab_size=vocab, hidden_size=hidden,
                           intermediate_size=4 * hidden, num_hidden_layers=layers,
                           num_attention_heads=8, num_key_value_heads=8,
                           max_position_embeddings=2048, rope_scaling=None)


def make_prompts(vocab: int, n: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(10, vocab) for _ in range(rng.randrange(8, 33))] for _ in range(n)]


def timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def hf_sequential(model, prompts, new_tokens) -> None:
    for p in prompts:
        ids = torch.tensor([p])
        model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                       max_new_tokens=new_tokens, pad_token_id=0)


def hf_static_batch(model, prompts, new_tokens) -> None:
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])          # left padding
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=new_tokens,
                   pad_token_id=0)


def throughput(name: str, path: Path, n: int, new_tokens: int) -> dict:
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None     # every run decodes exactly new_tokens
    engine = Engine.from_pretrained(str(path))
    prompts = make_prompts(engine.config.vocab_size, n)
    total = n * new_tokens
    engine.generate(prompts[:2], max_tokens=4, ignore_eos=True)               # warm-up
    with torch.no_grad():
        hf_static_batch(hf, prompts[:2], 4)
        console.print(f"[{name}] transformers sequential generate ...")
        t_seq, _ = timed(lambda: hf_sequential(hf, prompts, new_tokens))
        console.print(f"[{name}] transformers static batch ...")
        t_batch, _ = timed(lambda: hf_static_batch(hf, prompts, new_tokens))
    console.print(f"[{name}] llmos engine ...")
    t_llmos, outs = timed(lambda: engine.generate(prompts, max_tokens=new_tokens, ignore_eos=True))
    assert all(len(c.token_ids) == new_tokens for c in outs)
    return {"model": name, "hf_seq": total / t_seq, "hf_batch": total / t_batch,
            "llmos": total / t_llmos}


def kv_waste(path: Path, n: int = 200, seed: int = 1) -> dict:
    """Run n requests (prompts of 32-512 tokens, outputs of 32-256, uniform) through the
    engine; every step, count allocated and used token slots of the running requests.
    Waste does not depend on the model, so a one-layer model keeps this quick."""
    engine = Engine.from_pretrained(str(path), max_num_seqs=64)
    rng = random.Random(seed)
    vocab = engine.config.vocab_size
    for _ in range(n):
        prompt = [rng.randrange(10, vocab) for _ in range(rng.randrange(32, 513))]
        engine.add_request(prompt, max_tokens=rng.randrange(32, 257), ignore_eos=True)
    allocated = used = reserved = 0
    bs = engine.block_size
    while engine.has_work():
        engine.step()
        running = engine.scheduler.running
        allocated += sum(len(r.seq.table.blocks) * bs for r in running)
        used += sum(r.seq.table.num_tokens for r in running)
        # a contiguous allocator reserves each request's prompt + max_tokens up front
        reserved += sum(r.output_start + r.params.max_tokens for r in running)
    return {"waste": (allocated - used) / allocated, "steps": engine.stats["steps"],
            "contiguous_waste": (reserved - used) / reserved}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    args = ap.parse_args()
    torch.manual_seed(0)
    console.print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    with tempfile.TemporaryDirectory() as tmp:
        models = {"llama 4L d256 (random)": random_llama(Path(tmp) / "llama")}
        if (resolve_model("tiny") / "config.json").exists():
            models = {"tiny (embedded)": resolve_model("tiny"), **models}
        rows = [throughput(name, path, args.requests, args.new_tokens)
                for name, path in models.items()]
        console.print("[waste] 200 requests of random lengths ...")
        waste = kv_waste(random_llama(Path(tmp) / "small", layers=1, hidden=64, vocab=512))
    table = Table(title=f"{args.requests} requests x {args.new_tokens} new tokens, tokens/s")
    for col in ("model", "HF sequential", "HF static batch", "llmos",
                "llmos / sequential", "llmos / static batch"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(r["model"], f"{r['hf_seq']:.0f}", f"{r['hf_batch']:.0f}",
                      f"{r['llmos']:.0f}", f"{r['llmos'] / r['hf_seq']:.1f}x",
                      f"{r['llmos'] / r['hf_batch']:.2f}x")
    console.print(table)
    console.print(f"KV waste over {waste['steps']} steps of 200 requests (prompts 32-512, "
                  f"outputs 32-256 tokens): "
                  f"{100 * waste['waste']:.2f}% of allocated token slots (target < 4%); a contiguous "
                  f"allocator reserving prompt + max_tokens: {100 * waste['contiguous_waste']:.1f}%")


if __name__ == "__main__":
    main()
