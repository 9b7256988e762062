"""Random-weight Hugging Face checkpoints for tests, made with transformers.

make_checkpoint(kind, path, **overrides) writes a complete model directory the way
`save_pretrained` does (config.json, generation_config.json, model.safetensors or
shards + index) plus a tiny byte-level BPE tokenizer trained here on fixed text
(tokenizer.json, tokenizer_config.json with a chat template). Everything is seeded,
so the same call always writes the same files.

Norm weights and biases are randomized too (transformers initializes them to ones and
zeros), so a forward pass that ignores one of them is caught by a comparison test.
"""
from __future__ import annotations

import functools
import json
from pathlib import Path

KINDS = ("llama", "qwen2", "qwen3", "mistral")

BOS, EOS, IM_START, IM_END = "<|begin_of_text|>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = [BOS, EOS, IM_START, IM_END]
TOKENIZER_VOCAB = 512  # merges + byte alphabet + specials
# Qwen2's pre-tokenizer regex (also close to Llama 3's); transformers' Qwen2Tokenizer
# rebuilds the pipeline with it, so the tokenizer.json must use the same.
PRETOKENIZE_REGEX = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"""
                     r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")

CHAT_TEMPLATE = (
    "{% if bos_token is defined %}{{ bos_token }}{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role: ' + message['role']) }}"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Training text: English, code, digits, Chinese and emoji, so that multi-byte characters
# are split across tokens in some places and merged in others.
_CORPUS = [
    "The quick brown fox jumps over the lazy dog. ",
    "An operating system for language model agents schedules processes and memory. ",
    "def generate(prompt, max_tokens=16):\n    return model(prompt)\n",
    "Hello, world! How are you today? I am fine, thank you. ",
    "0123456789 3.14159 2.71828 42 1024 65536 ",
    "你好，世界！今天天气很好。我们一起学习语言模型。",
    "大语言模型的操作系统调度进程和内存。",
    "Emoji: 😀 🚀 🎉 👍 ❤️ 🐍 — naïve café résumé ",
]

_ARCH = {
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "mistral": ("MistralConfig", "MistralForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
}

_SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-6)

_KIND_CONFIG = {
    # GQA 4/2 with Llama 3.1 rope scaling.
    "llama": dict(rope_theta=500000.0, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 128}),
    # GQA 4/2, the sliding window key present (longer than any test sequence).
    "mistral": dict(sliding_window=256, rope_theta=1000000.0),
    # q/k/v bias (always on in qwen2), tied embeddings, vocab padded past the tokenizer's.
    "qwen2": dict(tie_word_embeddings=True, rope_theta=1000000.0, vocab_pad=64),
    # q/k norm, head_dim 32 != hidden/heads = 16.
    "qwen3": dict(head_dim=32, rope_theta=1000000.0),
}


def make_checkpoint(kind: str, path: str | Path, *, dtype: str = "float32",
                    max_shard_size: str | int | None = None, seed: int = 0,
                    chat_template: bool | str = True, **overrides) -> Path:
    """Write a random-weight checkpoint of `kind` into `path` (created); return the path.

    dtype: "float32" | "bfloat16" | "float16", the storage dtype.
    max_shard_size: e.g. "100KB" to get model-0000x-of-0000n.safetensors + index.json.
    chat_template: False leaves the tokenizer without one; a str is the template to write
    (else CHAT_TEMPLATE).
    overrides: config keys (num_hidden_layers=3, rope_scaling=..., ...).
    """
    import torch
    import transformers

    if kind not in _ARCH:
        raise ValueError(f"unknown checkpoint kind {kind!r}; one of {KINDS}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok = _tokenizer_json()
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}

    kw = {**_SMALL, **_KIND_CONFIG[kind]}
    pad = kw.pop("vocab_pad", 1)
    kw["vocab_size"] = -(-tok.get_vocab_size() // pad) * pad
    kw.update(bos_token_id=ids[BOS] if kind in ("llama", "mistral") else None, eos_token_id=ids[EOS])
    kw.update(overrides)
    config_cls, model_cls = (getattr(transformers, n) for n in _ARCH[kind])
    torch.manual_seed(seed)
    model = model_cls(config_cls(**kw)).eval()
    _randomize_norms_and_biases(model)
    eos = [ids[EOS], ids[IM_END]] if kind == "llama" else ids[IM_END]
    model.generation_config.bos_token_id = kw["bos_token_id"]
    model.generation_config.eos_token_id = eos
    model.to(getattr(torch, dtype))
    save_kw = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(path, **save_kw)
    _save_tokenizer(kind, path, chat_template)
    return path


def _randomize_norms_and_biases(model) -> None:
    import torch

    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn_like(p))


@functools.lru_cache(maxsize=None)
def _tokenizer_json_str() -> str:
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=TOKENIZER_VOCAB, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_CORPUS * 20, trainer)
    return tok.to_str()


def _tokenizer_json():
    from tokenizers import Tokenizer

    return Tokenizer.from_str(_tokenizer_json_str())


def _save_tokenizer(kind: str, path: Path, chat_template: bool | str) -> None:
    from tokenizers import processors

    tok = _tokenizer_json()
    config = {"eos_token": IM_END, "pad_token": EOS, "unk_token": None,
              "clean_up_tokenization_spaces": False, "model_max_length": 512}
    if kind in ("llama", "mistral"):
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
        # Llama style: the post-processor puts BOS in front of every encoded text.
        tok.post_processor = processors.TemplateProcessing(
            single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, tok.token_to_id(BOS))])
        config["bos_token"] = BOS
    else:
        # Qwen style: no BOS at all.
        config["tokenizer_class"] = "Qwen2Tokenizer"
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
        config["bos_token"] = None
    template = chat_template if isinstance(chat_template, str) else CHAT_TEMPLATE
    if chat_template and kind == "qwen3":
        # transformers v5 writes the template as its own file.
        (path / "chat_template.jinja").write_text(template, encoding="utf-8")
    elif chat_template:
        config["chat_template"] = template
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
