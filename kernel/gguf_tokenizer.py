"""The tokenizer a GGUF file describes in its metadata, rebuilt as a `tokenizers` pipeline.

A GGUF has no tokenizer.json: llama.cpp stores the vocabulary (`tokenizer.ggml.tokens`),
the kind of model (`tokenizer.ggml.model`: "gpt2" is byte-level BPE with `merges`,
"llama" is sentencepiece BPE with `scores`), each token's type (control tokens become
special added tokens), the special token ids, the pre-tokenizer's name
(`tokenizer.ggml.pre`) and the chat template. We build the same pipeline transformers
builds from the same file (`AutoTokenizer.from_pretrained(dir, gguf_file=...)`, its
integrations/gguf/gguf_tokenizer_mapping.py), so that ids are identical; the runtime never
imports transformers. Where transformers ignores what the file says, we follow the file:
`tokenizer.ggml.add_space_prefix` (sentencepiece) is honoured.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as _HFTokenizer

from .config import CheckpointError
from .tokenizer import Tokenizer

# tokenizer.ggml.token_type values (llama.cpp's llama_token_type)
CONTROL, USER_DEFINED = 3, 4
# Named special tokens and their id keys, as transformers reads them (no sep/cls/mask).
_SPECIAL_IDS = {"bos_token": "bos_token_id", "eos_token": "eos_token_id",
                "unk_token": "unknown_token_id", "pad_token": "padding_token_id"}
# The default special tokens of the class transformers builds for each tokenizer.ggml.model
# (GPT2Tokenizer, LlamaTokenizer): special too, where the vocabulary has them.
_CLASS_DEFAULTS = {"gpt2": ("<|endoftext|>",), "llama": ("<unk>", "<s>", "</s>")}

# How text is split before byte-level BPE, by tokenizer.ggml.pre (transformers' table;
# any other name keeps GPT-2's split).
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN35_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
                 r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_TEKKEN_SPLIT = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
                 r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
                 r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_GPT4O_SPLIT = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
                r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
                r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
                r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
                r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_SPLITS = {
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0",
                     "lfm2", "jina-v5-nano", "dbrx", "smaug-bpe"), _LLAMA3_SPLIT),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez"), _QWEN2_SPLIT),
    "qwen35": _QWEN35_SPLIT,
    "tekken": _TEKKEN_SPLIT,
    **dict.fromkeys(("gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"), _GPT4O_SPLIT),
}


def gguf_tokenizer(get: Callable, source: str) -> Tokenizer:
    """The tokenizer of a GGUF file. get(key, default) reads its metadata (raising
    CheckpointError for a required key that is missing). Raises CheckpointError for a
    tokenizer model we cannot build or ids outside the vocabulary."""
    kind = get("tokenizer.ggml.model")
    if kind not in _CLASS_DEFAULTS:
        raise CheckpointError(f"{source}: tokenizer.ggml.model = {kind!r} is not supported "
                              f"(supported: {', '.join(_CLASS_DEFAULTS)})")
    tokens = get("tokenizer.ggml.tokens")
    types = get("tokenizer.ggml.token_type", None) or [1] * len(tokens)
    special = {}
    for name, key in _SPECIAL_IDS.items():
        token_id = get(f"tokenizer.ggml.{key}", None)
        if token_id is not None:
            if not 0 <= token_id < len(tokens):
                raise CheckpointError(f"{source}: tokenizer.ggml.{key} = {token_id} is outside the "
                                      f"vocabulary of {len(tokens)} tokens")
            special[name] = tokens[token_id]
    try:
        if kind == "gpt2":
            backend, spelled = _byte_level(tokens, get("tokenizer.ggml.merges"), get("tokenizer.ggml.pre", None))
        else:
            backend, spelled = _sentencepiece(tokens, get("tokenizer.ggml.scores"),
                                              get("tokenizer.ggml.add_space_prefix", True))
        _add_tokens(backend, tokens, types, spelled, [*special.values(), *_CLASS_DEFAULTS[kind]])
    except CheckpointError:
        raise
    except Exception as e:  # the Rust side raises bare Exception for a bad vocabulary or merges
        raise CheckpointError(f"{source}: cannot build the {kind} tokenizer: {type(e).__name__}: {e}") from None
    # llama.cpp adds BOS to a sentencepiece vocabulary unless the file says otherwise.
    bos = special.get("bos_token") if get("tokenizer.ggml.add_bos_token", kind == "llama") else None
    eos = special.get("eos_token") if get("tokenizer.ggml.add_eos_token", False) else None
    backend.post_processor = _post_processor(backend, bos, eos)
    return Tokenizer(backend, special, end_ids(get), get("tokenizer.chat_template", None), source)


def end_ids(get: Callable) -> list[int]:
    """The ids that end a generation, as llama.cpp counts them: end of text, of turn, of message."""
    return list(dict.fromkeys(i for k in ("eos", "eot", "eom")
                              if (i := get(f"tokenizer.ggml.{k}_token_id", None)) is not None))


def _byte_level(tokens: list[str], merges: list[str], pre: str | None) -> tuple[_HFTokenizer, Callable]:
    """Byte-level BPE (GPT-2 style). A token spelled outside the byte alphabet is respelled
    from its UTF-8 bytes, as transformers does; `spelled` tells whether a token needs none."""
    to_char = _bytes_to_unicode()
    alphabet = set(to_char.values())

    def spelled(token: str) -> bool:
        return set(token) <= alphabet

    vocab = {t if spelled(t) else "".join(to_char[b] for b in t.encode("utf-8")): i for i, t in enumerate(tokens)}
    pairs = [tuple(m.split(" ")) for m in merges]
    backend = _HFTokenizer(models.BPE(vocab=vocab, merges=pairs, dropout=None, continuing_subword_prefix="",
                                      end_of_word_suffix="", fuse_unk=False))
    split = _SPLITS.get(pre)
    if split is None:
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    backend.decoder = decoders.ByteLevel()
    return backend, spelled


def _sentencepiece(tokens: list[str], scores: list[float], add_space_prefix: bool) -> tuple[_HFTokenizer, Callable]:
    """Sentencepiece BPE with byte fallback; its merges are implied by the scores."""
    vocab = {t: i for i, t in enumerate(tokens)}
    backend = _HFTokenizer(models.BPE(vocab=vocab, merges=_merges_from_scores(vocab, dict(zip(tokens, scores))),
                                      fuse_unk=True, byte_fallback=True, dropout=None))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="\u2581", prepend_scheme="first" if add_space_prefix else "never", split=False)
    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_space_prefix:
        steps.append(decoders.Strip(content=" ", left=1))
    backend.decoder = decoders.Sequence(steps)
    return backend, lambda token: True


def _merges_from_scores(vocab: dict[str, int], scores: dict[str, float]) -> list[tuple[str, str]]:
    """Every split of a token into two tokens, best score first (transformers' generate_merges:
    same order, ties kept by token order, then by the pieces' ids)."""
    merges = []
    for token, score in scores.items():
        local = [(token[:i], token[i:], score) for i in range(1, len(token))
                 if token[:i] in vocab and token[i:] in vocab]
        merges.extend(sorted(local, key=lambda m: (vocab[m[0]], vocab[m[1]])))
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(left, right) for left, right, _ in merges]


def _add_tokens(backend: _HFTokenizer, tokens: list[str], types: list[int], spelled: Callable,
                named: Iterable[str]) -> None:
    """Control tokens become special added tokens (matched whole, skipped in decoding),
    user-defined ones plain added tokens, then the named special tokens not yet added
    (those the vocabulary lacks are not added: they would get ids the model does not have)."""
    # A control token spelled outside a byte-level alphabet is a llama.cpp mislabel;
    # transformers skips it (adding it would grow the vocabulary past the model's).
    control = [t for t, k in zip(tokens, types) if k == CONTROL and spelled(t)]
    backend.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in control])
    vocab = backend.get_vocab()
    backend.add_tokens([AddedToken(t, normalized=False, special=False)
                        for t, k in zip(tokens, types) if k == USER_DEFINED and t in vocab])
    added = {t.content for t in backend.get_added_tokens_decoder().values()}
    backend.add_special_tokens([AddedToken(t, special=True) for t in dict.fromkeys(named)
                                if t not in added and t in vocab])


def _post_processor(backend: _HFTokenizer, bos: str | None, eos: str | None) -> processors.TemplateProcessing:
    """BOS (and EOS) around each text as the file's add_bos_token / add_eos_token ask."""
    single = " ".join([f"{bos}:0"] * (bos is not None) + ["$A:0"] + [f"{eos}:0"] * (eos is not None))
    pair = " ".join([single] + [f"{bos}:1"] * (bos is not None) + ["$B:1"] + [f"{eos}:1"] * (eos is not None))
    special = [(t, backend.token_to_id(t)) for t in dict.fromkeys(x for x in (bos, eos) if x is not None)]
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=special)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map: printable bytes stand for themselves, the
    rest are shifted above U+0100."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, n = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + n)
            n += 1
    return chars
