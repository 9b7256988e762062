"""Train the embedded model "tiny" from nothing: tokenizer, Llama weights, evaluation.

    python -m llmos.kernel.tiny.train --out DIR [--steps N] [--seed S]

Steps, in order (see main):
  1. a byte-level BPE tokenizer trained on task text (digits split one by one; <s> is
     prepended by the post-processor; the chat template lives in tokenizer_config.json);
  2. a LlamaForCausalLM with grouped-query attention trained from random weights on packed
     task examples, loss on answer tokens only, AdamW with warmup and cosine decay;
  3. the checkpoint saved in Hugging Face format (safetensors, float32) to DIR;
  4. held-out accuracy per task, greedy decoding through transformers on the saved files,
     printed as a table and written to DIR/eval.json.

Same seed and thread count give the same tokenizer and weights. transformers is needed
here (and in the tests), never at runtime: the kernel loads DIR with its own code.
"""
from __future__ import annotations

import argparse
import codecs
import contextlib
import io
import itertools
import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from torch.nn import functional as F

from . import tasks

MIXTURE = {"add": 0.5, "reverse": 0.2, "chat": 0.3}   # share of training examples per task
MAX_NEW_TOKENS = 16                                       # longest answer is 11 tokens with </s>


@dataclass
class Config:
    out: str
    steps: int = 2400          # optimizer steps
    seed: int = 0
    hidden: int = 256          # hidden size; head_dim is hidden // heads
    intermediate: int = 512    # MLP width; 2x hidden keeps the float32 files under 10 MB
    layers: int = 4
    heads: int = 8
    kv_heads: int = 2          # grouped-query attention: 4 query heads share one KV head
    vocab: int = 512           # BPE vocabulary cap, specials included (task text stops at ~420)
    rows: int = 16             # packed rows per batch
    seq_len: int = 128         # tokens per packed row
    lr: float = 2e-3           # peak learning rate, after `warmup` steps, cosine to lr/10
    warmup: int = 100
    threads: int = 2           # torch threads; part of what makes a run reproducible
    eval_n: int = 500          # held-out problems per task (the add split holds 818)


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_args(argv)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    start = time.time()
    tok = train_tokenizer(cfg)
    save_tokenizer(tok, out)
    model = build_model(cfg, tok)
    train(model, tok, cfg)
    save_model(model, out)
    report = evaluate(out, cfg)
    print(f"done in {time.time() - start:.0f}s: {out}", flush=True)
    return report


def parse_args(argv: list[str] | None) -> Config:
    p = argparse.ArgumentParser(prog="python -m llmos.kernel.tiny.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, default in asdict(Config(out="")).items():
        flag = "--" + name.replace("_", "-")
        if name == "out":
            p.add_argument(flag, required=True, help="output directory")
        else:
            p.add_argument(flag, type=type(default), default=default, help=f"default {default}")
    return Config(**vars(p.parse_args(argv)))


# -- 1. tokenizer ------------------------------------------------------------------------

def train_tokenizer(cfg: Config) -> Tokenizer:
    """Byte-level BPE over task text plus the Zen of Python (a little English)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab, min_frequency=2, special_tokens=tasks.SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_tokenizer_corpus(cfg.seed), trainer)
    bos = tok.token_to_id(tasks.BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{tasks.BOS} $A", pair=f"{tasks.BOS} $A {tasks.BOS} $B",
        special_tokens=[(tasks.BOS, bos)])
    return tok


def _tokenizer_corpus(seed: int) -> list[str]:
    with contextlib.redirect_stdout(io.StringIO()):
        import this  # prints the Zen of Python on first import
    lines = codecs.decode(this.s, "rot13").splitlines()
    for task in tasks.TASKS:
        for prompt, expected in tasks.examples(task, 2000, "train", seed):
            lines.append(_prompt_text(prompt) + tasks.completion(task, expected) + tasks.EOS)
    return lines


def save_tokenizer(tok: Tokenizer, out: Path) -> None:
    tok.save(str(out / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": tasks.BOS, "eos_token": tasks.EOS, "pad_token": tasks.PAD,
        "add_bos_token": True, "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 512,
        "chat_template": tasks.CHAT_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    special = {"bos_token": tasks.BOS, "eos_token": tasks.EOS, "pad_token": tasks.PAD}
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")


def _prompt_text(prompt) -> str:
    """A prompt as the text the model sees (chat: the template with <s>; plain: without)."""
    return prompt if isinstance(prompt, str) else tasks.render_chat(prompt)


def encode(tok: Tokenizer, task: str, prompt, expected: str | None = None) -> tuple[list, int]:
    """Token ids of the prompt (<s> first), then of the answer and </s> if `expected` is
    given; returns (ids, number of prompt tokens)."""
    ids = tok.encode(_prompt_text(prompt), add_special_tokens=isinstance(prompt, str)).ids
    n_prompt = len(ids)
    if expected is not None:
        ids += tok.encode(tasks.completion(task, expected), add_special_tokens=False).ids
        ids.append(tok.token_to_id(tasks.EOS))
    return ids, n_prompt


# -- 2. model and training ---------------------------------------------------------------

def build_model(cfg: Config, tok: Tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM
    config = LlamaConfig(
        vocab_size=tok.get_vocab_size(), hidden_size=cfg.hidden,
        intermediate_size=cfg.intermediate,
        num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads,
        num_key_value_heads=cfg.kv_heads, max_position_embeddings=512,
        rms_norm_eps=1e-5, tie_word_embeddings=True,
        bos_token_id=tok.token_to_id(tasks.BOS), eos_token_id=tok.token_to_id(tasks.EOS),
        pad_token_id=tok.token_to_id(tasks.PAD), attn_implementation="sdpa")
    return LlamaForCausalLM(config)


def train(model, tok: Tokenizer, cfg: Config) -> None:
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                             {"params": rest, "weight_decay": 0.0}],
                            lr=cfg.lr, betas=(0.9, 0.95))
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f}M parameters, {cfg.layers} layers, hidden {cfg.hidden}, "
          f"heads {cfg.heads}/{cfg.kv_heads} kv, vocab {tok.get_vocab_size()}", flush=True)
    model.train()
    batches = packed_batches(tok, cfg)
    start, tokens, losses = time.time(), 0, []
    for step in range(1, cfg.steps + 1):
        input_ids, labels, positions, mask = next(batches)
        for group in opt.param_groups:
            group["lr"] = _lr(step, cfg)
        logits = model(input_ids=input_ids, position_ids=positions, attention_mask=mask,
                       use_cache=False).logits                     # [rows, seq_len, vocab]
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(),
                               ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        tokens += input_ids.numel()
        losses.append(loss.item())
        if step % 50 == 0 or step == cfg.steps:
            elapsed = time.time() - start
            eta = elapsed / step * (cfg.steps - step)
            print(f"step {step:5d}/{cfg.steps}  loss {sum(losses) / len(losses):.4f}  "
                  f"lr {_lr(step, cfg):.2e}  {tokens / elapsed:,.0f} tok/s  "
                  f"elapsed {elapsed:4.0f}s  eta {eta:4.0f}s", flush=True)
            losses.clear()
    model.eval()


def _lr(step: int, cfg: Config) -> float:
    if step <= cfg.warmup:
        return cfg.lr * step / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def packed_batches(tok: Tokenizer, cfg: Config):
    """Yield batches forever: input_ids, labels (-100 except answer tokens), position_ids,
    all [rows, seq_len], and a bool mask [rows, 1, seq_len, seq_len] that lets a token see
    only the earlier tokens of its own example. Rows are filled with whole examples."""
    rng = random.Random(cfg.seed)
    pad = tok.token_to_id(tasks.PAD)
    pool: list[tuple[list, int]] = []
    for chunk in itertools.count():
        for task, share in MIXTURE.items():
            drawn = tasks.examples(task, int(4096 * share), "train", cfg.seed * 1_000_003 + chunk)
            pool += [encode(tok, task, p, e) for p, e in drawn]
        rng.shuffle(pool)
        while len(pool) > 2 * cfg.rows * cfg.seq_len // 8:
            rows = [_fill_row(pool, cfg.seq_len, pad) for _ in range(cfg.rows)]
            ids, labels, positions, segments = (torch.tensor(x) for x in zip(*rows))
            causal = torch.ones(cfg.seq_len, cfg.seq_len, dtype=torch.bool).tril()
            mask = (segments[:, :, None] == segments[:, None, :]) & causal  # [rows, T, T]
            yield ids, labels, positions, mask[:, None]


def _fill_row(pool: list, seq_len: int, pad: int) -> tuple[list, list, list, list]:
    ids, labels, positions, segments = [], [], [], []
    assert not pool or len(pool[-1][0]) <= seq_len, "an example is longer than a packed row"
    while pool and len(ids) + len(pool[-1][0]) <= seq_len:
        example, n_prompt = pool.pop()
        segment = len(ids)   # unique per example within the row
        ids += example
        labels += [-100] * n_prompt + example[n_prompt:]
        positions += range(len(example))
        segments += [segment] * len(example)
    n_pad = seq_len - len(ids)
    return (ids + [pad] * n_pad, labels + [-100] * n_pad,
            positions + list(range(n_pad)), segments + [-1] * n_pad)


# -- 3. save -----------------------------------------------------------------------------

def save_model(model, out: Path) -> None:
    from transformers import GenerationConfig
    c = model.config
    model.generation_config = GenerationConfig(
        bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id, pad_token_id=c.pad_token_id,
        do_sample=False, max_new_tokens=MAX_NEW_TOKENS)
    model.save_pretrained(out)   # safetensors (model.safetensors), float32
    os.chmod(out / "model.safetensors", 0o644)   # transformers writes it 0600


# -- 4. evaluation -----------------------------------------------------------------------

def evaluate(out: Path, cfg: Config) -> dict:
    """Held-out accuracy per task with greedy decoding through transformers on the saved
    files; prints a table and writes out/eval.json."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    hf_tok = AutoTokenizer.from_pretrained(out)
    results = {}
    for task in tasks.TASKS:
        problems = tasks.examples(task, cfg.eval_n, "test", seed=cfg.seed)
        completions = generate(model, hf_tok, [p for p, _ in problems])
        correct = sum(tasks.score(task, c, e) for c, (_, e) in zip(completions, problems))
        results[task] = {"correct": correct, "total": len(problems),
                         "accuracy": round(correct / len(problems), 4)}
    report = {"split": "test", "decoding": "greedy", "results": results,
              "config": {k: v for k, v in asdict(cfg).items() if k != "out"}}
    (out / "eval.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"\n{'task':<10}{'correct':>9}{'total':>7}{'accuracy':>10}")
    for task, r in results.items():
        print(f"{task:<10}{r['correct']:>9}{r['total']:>7}{r['accuracy']:>10.1%}")
    return report


@torch.no_grad()
def generate(model, hf_tok, prompts: list, batch: int = 64) -> list[str]:
    """Greedy completions (special tokens dropped) of str or chat prompts, via HF generate."""
    texts = [p if isinstance(p, str) else
             hf_tok.apply_chat_template(p, tokenize=False, add_generation_prompt=True)
             for p in prompts]
    plain = [isinstance(p, str) for p in prompts]
    completions = []
    for i in range(0, len(texts), batch):
        chunk, special = texts[i:i + batch], plain[i:i + batch]
        assert len(set(special)) == 1, "a batch mixes plain and chat prompts"
        enc = hf_tok(chunk, return_tensors="pt", padding=True, padding_side="left",
                     add_special_tokens=special[0])
        out = model.generate(**enc, do_sample=False, max_new_tokens=MAX_NEW_TOKENS,
                             pad_token_id=hf_tok.pad_token_id, eos_token_id=hf_tok.eos_token_id)
        new = out[:, enc["input_ids"].shape[1]:]
        completions += hf_tok.batch_decode(new, skip_special_tokens=True)
    return completions


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
