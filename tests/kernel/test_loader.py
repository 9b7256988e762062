"""Checkpoint loading: config parsing, rope, weights, errors, tokenizer, streaming detokenization.

Every checkpoint is a real Hugging Face directory written by transformers with random
weights (tests/checkpoints.py); transformers is the reference for every number and id.
"""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from llmos.kernel.config import CheckpointError, ModelConfig, load_config, rope_inv_freq
from llmos.kernel.loader import expected_weight_shapes, load_weights, open_model_dir
from llmos.kernel.tokenizer import ChatTemplateError, DetokenizeStream, Tokenizer
from tests.checkpoints import KINDS

transformers = pytest.importorskip("transformers")

TEXTS = [
    "Hello, world! How are you today?",
    " leading space and   several   spaces\n\nnew lines\ttab",
    "你好，世界！大语言模型的操作系统。",
    "Emoji: 😀 🚀 🎉 👍 ❤️ 🐍 and naïve café résumé e\u0301",
    "def generate(prompt, max_tokens=16):\n    return model(prompt)  # 3.14159 65536",
    "<|im_start|>user\nspecial tokens inside text<|im_end|><|endoftext|>",
]
CHAT = [
    {"role": "system", "content": "You are a helpful agent."},
    {"role": "user", "content": "你好 😀 what is 2+2?"},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "And 3+3?"},
]


def copy_of(path, tmp_path):
    """A private copy of a session checkpoint that a test may break."""
    return shutil.copytree(path, tmp_path / "ckpt")


def edit_json(file, **changes):
    d = json.loads(file.read_text())
    d.update(changes)
    file.write_text(json.dumps(d))


# --- config ----------------------------------------------------------------------------------

def test_config_fields_of_every_kind(checkpoints):
    llama, qwen2, qwen3, mistral = (load_config(checkpoints[k]) for k in ("llama", "qwen2", "qwen3", "mistral"))

    assert (llama.model_type, llama.num_attention_heads, llama.num_key_value_heads, llama.head_dim) == ("llama", 4, 2, 16)
    assert llama.rope_theta == 500000.0 and llama.rope_type == "llama3"
    assert llama.rope_scaling == {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                  "high_freq_factor": 4.0, "original_max_position_embeddings": 128}
    assert not (llama.attention_bias or llama.tie_word_embeddings or llama.qk_norm or llama.mlp_bias)
    assert llama.sliding_window is None and llama.torch_dtype == "float32"
    assert llama.bos_token_id == 0 and llama.eos_token_id == [1]

    assert qwen2.attention_bias and not qwen2.attention_out_bias and qwen2.tie_word_embeddings
    assert qwen2.sliding_window is None  # use_sliding_window is false
    assert qwen2.vocab_size == 512 and qwen2.bos_token_id is None and qwen2.rope_scaling is None

    assert qwen3.qk_norm and qwen3.head_dim == 32 and qwen3.hidden_size // qwen3.num_attention_heads == 16
    assert not qwen3.attention_bias and not qwen3.tie_word_embeddings

    assert mistral.num_key_value_heads == 2 and mistral.sliding_window == 256 and not mistral.attention_bias
    for c in (llama, qwen2, qwen3, mistral):
        assert (c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.rms_norm_eps) == (64, 128, 2, 1e-6)
    hash(llama)  # frozen and hashable despite the dict/list fields


BASE = {"model_type": "llama", "vocab_size": 100, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}


@pytest.mark.parametrize("old, new", [
    ({"rope_theta": 5e5}, {"rope_parameters": {"rope_type": "default", "rope_theta": 5e5}}),
    ({"rope_theta": 5e5, "rope_scaling": {"type": "linear", "factor": 2.0}},
     {"rope_parameters": {"rope_type": "linear", "rope_theta": 5e5, "factor": 2.0}}),
    ({"rope_theta": 5e5, "max_position_embeddings": 4096,
      "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}},
     {"max_position_embeddings": 4096, "rope_parameters": {
         "rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0,
         "high_freq_factor": 4.0, "original_max_position_embeddings": 4096}}),
    ({"torch_dtype": "bfloat16", "eos_token_id": 7}, {"dtype": "bfloat16", "eos_token_id": [7]}),
])
def test_old_and_v5_forms_parse_alike(old, new):
    a, b = ModelConfig.from_dict({**BASE, **old}), ModelConfig.from_dict({**BASE, **new})
    assert a == b
    assert torch.equal(rope_inv_freq(a), rope_inv_freq(b))


@pytest.mark.parametrize("rope", [
    None,
    {"rope_type": "linear", "factor": 4.0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 64},
    {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 8192},
])
@pytest.mark.parametrize("head_dim", [16, 128])
def test_rope_inv_freq_equals_transformers(rope, head_dim):
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    hf = transformers.LlamaConfig(hidden_size=4 * head_dim, num_attention_heads=4, head_dim=head_dim,
                                  rope_theta=500000.0, rope_scaling=rope, max_position_embeddings=131072)
    ours = ModelConfig.from_dict({**BASE, **hf.to_dict(), "vocab_size": 100})
    expected = LlamaRotaryEmbedding(hf).inv_freq
    got = rope_inv_freq(ours)
    assert got.dtype == torch.float32 and got.shape == (head_dim // 2,)
    assert torch.equal(got, expected)


def test_rope_inv_freq_of_saved_checkpoints(checkpoints):
    for kind, path in checkpoints.items():
        model = transformers.AutoModelForCausalLM.from_pretrained(path)
        assert torch.equal(rope_inv_freq(load_config(path)), model.model.rotary_emb.inv_freq), kind


# config.json files as transformers 4.x wrote them for released models (old rope form).
LLAMA_3_1_8B = {
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "bos_token_id": 128000,
    "eos_token_id": [128001, 128008, 128009], "hidden_act": "silu", "hidden_size": 4096,
    "intermediate_size": 14336, "max_position_embeddings": 131072, "mlp_bias": False, "model_type": "llama",
    "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8, "pretraining_tp": 1,
    "rms_norm_eps": 1e-05, "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                            "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "rope_theta": 500000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "vocab_size": 128256}
QWEN_2_5_7B = {
    "architectures": ["Qwen2ForCausalLM"], "bos_token_id": 151643, "eos_token_id": 151645, "hidden_act": "silu",
    "hidden_size": 3584, "intermediate_size": 18944, "max_position_embeddings": 32768, "max_window_layers": 28,
    "model_type": "qwen2", "num_attention_heads": 28, "num_hidden_layers": 28, "num_key_value_heads": 4,
    "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 1000000.0, "sliding_window": 131072,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_sliding_window": False, "vocab_size": 152064}
MISTRAL_7B_V0_1 = {
    "architectures": ["MistralForCausalLM"], "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
    "hidden_size": 4096, "intermediate_size": 14336, "max_position_embeddings": 32768, "model_type": "mistral",
    "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8, "rms_norm_eps": 1e-05,
    "rope_theta": 10000.0, "sliding_window": 4096, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "vocab_size": 32000}
QWEN_3_8B = {
    "architectures": ["Qwen3ForCausalLM"], "attention_bias": False, "bos_token_id": 151643, "eos_token_id": 151645,
    "head_dim": 128, "hidden_act": "silu", "hidden_size": 4096, "intermediate_size": 12288,
    "max_position_embeddings": 40960, "max_window_layers": 36, "model_type": "qwen3", "num_attention_heads": 32,
    "num_hidden_layers": 36, "num_key_value_heads": 8, "rms_norm_eps": 1e-06, "rope_scaling": None,
    "rope_theta": 1000000, "sliding_window": None, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "use_sliding_window": False, "vocab_size": 151936}


@pytest.mark.parametrize("d", [LLAMA_3_1_8B, QWEN_2_5_7B, MISTRAL_7B_V0_1, QWEN_3_8B],
                         ids=["llama-3.1", "qwen2.5", "mistral-v0.1", "qwen3"])
def test_released_configs_agree_with_transformers(d):
    ours = ModelConfig.from_dict(d)
    hf = transformers.AutoConfig.for_model(**d)
    rotary = {"llama": "LlamaRotaryEmbedding", "qwen2": "Qwen2RotaryEmbedding",
              "mistral": "MistralRotaryEmbedding", "qwen3": "Qwen3RotaryEmbedding"}[d["model_type"]]
    module = __import__(f"transformers.models.{d['model_type']}.modeling_{d['model_type']}", fromlist=[rotary])
    assert torch.equal(rope_inv_freq(ours), getattr(module, rotary)(hf).inv_freq)
    assert ours.head_dim == (getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads)
    assert ours.sliding_window == getattr(hf, "sliding_window", None)
    assert ours.torch_dtype == "bfloat16" and ours.eos_token_id == (
        d["eos_token_id"] if isinstance(d["eos_token_id"], list) else [d["eos_token_id"]])
    shapes = expected_weight_shapes(ours)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(hf)
    assert shapes == {name: tuple(p.shape) for name, p in model.state_dict().items()}


@pytest.mark.parametrize("change, words", [
    ({"model_type": "gpt2"}, ["model_type", "'gpt2'"]),
    ({"num_key_value_heads": 3}, ["num_attention_heads=4", "num_key_value_heads=3"]),
    ({"hidden_size": 66}, ["hidden_size=66", "num_attention_heads=4"]),
    ({"vocab_size": None}, ["'vocab_size'", "missing"]),
    ({"intermediate_size": -1}, ["'intermediate_size'", "-1"]),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, ["rope type", "'yarn'"]),
    ({"rope_parameters": {"rope_type": "linear", "rope_theta": 1e4}}, ["'factor'", "missing"]),
    ({"dtype": "int8"}, ["dtype", "'int8'"]),
    ({"hidden_act": "gelu"}, ["hidden_act", "'gelu'"]),
])
def test_bad_config_is_refused_with_the_key_named(change, words):
    with pytest.raises(CheckpointError) as e:
        ModelConfig.from_dict({**BASE, **change}, source="/m/config.json")
    assert "/m/config.json" in str(e.value)
    for w in words:
        assert w in str(e.value)


# --- weights ---------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_load_weights_returns_every_tensor(checkpoints, kind):
    path = checkpoints[kind]
    config = load_config(path)
    weights = load_weights(path, config, torch.float32)
    expected = expected_weight_shapes(config)
    assert set(weights) == set(expected)
    for name, shape in expected.items():
        assert tuple(weights[name].shape) == shape, name
        assert weights[name].dtype == torch.float32
    # The names and values are exactly what transformers saved and would load.
    state = transformers.AutoModelForCausalLM.from_pretrained(path).state_dict()
    for name, tensor in weights.items():
        assert torch.equal(tensor, state[name]), name
    assert ("lm_head.weight" in weights) == (not config.tie_word_embeddings)
    assert any(n.endswith("q_proj.bias") for n in weights) == (kind == "qwen2")
    assert any(n.endswith("q_norm.weight") for n in weights) == (kind == "qwen3")


def test_sharded_checkpoint_loads_the_same_weights(checkpoints, checkpoint_factory):
    sharded = checkpoint_factory("llama", max_shard_size="100KB")
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1 and not (sharded / "model.safetensors").exists()
    config = load_config(sharded)
    single = load_weights(checkpoints["llama"], config, torch.float32)
    weights = load_weights(sharded, config, torch.float32)
    assert set(weights) == set(single)
    assert all(torch.equal(weights[n], single[n]) for n in single)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_storage(checkpoint_factory, dtype):
    path = checkpoint_factory("qwen3", dtype=dtype)
    config = load_config(path)
    assert config.torch_dtype == dtype and config.dtype == getattr(torch, dtype)
    stored = load_file(path / "model.safetensors")
    as_stored = load_weights(path, config, config.dtype)
    as_float = load_weights(path, config, torch.float32)
    for name, tensor in stored.items():
        assert as_stored[name].dtype == getattr(torch, dtype) and torch.equal(as_stored[name], tensor)
        assert as_float[name].dtype == torch.float32 and torch.equal(as_float[name], tensor.float())


def test_open_model_dir(checkpoints):
    md = open_model_dir(checkpoints["llama"])
    assert md.config == load_config(checkpoints["llama"])
    assert md.generation_config["eos_token_id"] == [1, 3]
    assert md.tokenizer.eos_token_ids == [1, 3]
    assert set(md.load_weights(torch.bfloat16)) == set(expected_weight_shapes(md.config))


# --- weight errors ---------------------------------------------------------------------------

def test_missing_directory_config_and_weights(checkpoints, tmp_path):
    with pytest.raises(CheckpointError, match="no such model directory"):
        open_model_dir(tmp_path / "nowhere")
    path = copy_of(checkpoints["llama"], tmp_path)
    config = load_config(path)
    (path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model.safetensors") as e:
        load_weights(path, config, torch.float32)
    assert str(path) in str(e.value)
    with pytest.raises(CheckpointError, match="model.safetensors"):
        open_model_dir(path)
    (path / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json is missing"):
        open_model_dir(path)
    (path / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match="tokenizer.json is missing"):
        Tokenizer.from_dir(path)


def test_missing_shard(checkpoint_factory, tmp_path):
    path = copy_of(checkpoint_factory("llama", max_shard_size="100KB"), tmp_path)
    shard = sorted(path.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(CheckpointError, match="shard named in model.safetensors.index.json is missing") as e:
        load_weights(path, load_config(path), torch.float32)
    assert shard.name in str(e.value)


def rewrite_weights(path, edit):
    file = path / "model.safetensors"
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


def test_tensor_with_wrong_shape(checkpoints, tmp_path):
    path = copy_of(checkpoints["qwen2"], tmp_path)
    name = "model.layers.1.self_attn.k_proj.weight"
    rewrite_weights(path, lambda t: t.update({name: torch.zeros(48, 64)}))
    with pytest.raises(CheckpointError) as e:
        load_weights(path, load_config(path), torch.float32)
    msg = str(e.value)
    assert name in msg and "(48, 64)" in msg and "(32, 64)" in msg and "model.safetensors" in msg


def test_missing_tensor(checkpoints, tmp_path):
    path = copy_of(checkpoints["mistral"], tmp_path)
    rewrite_weights(path, lambda t: t.pop("lm_head.weight"))
    with pytest.raises(CheckpointError, match=r"'lm_head.weight' with shape \(512, 64\) is missing"):
        load_weights(path, load_config(path), torch.float32)


def test_harmless_extra_tensor_is_ignored_and_unknown_one_refused(checkpoints, tmp_path):
    path = copy_of(checkpoints["llama"], tmp_path)
    rewrite_weights(path, lambda t: t.update({"model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(8)}))
    config = load_config(path)
    assert set(load_weights(path, config, torch.float32)) == set(expected_weight_shapes(config))
    rewrite_weights(path, lambda t: t.update({"model.layers.2.mlp.up_proj.weight": torch.ones(128, 64)}))
    with pytest.raises(CheckpointError, match="unexpected tensor 'model.layers.2.mlp.up_proj.weight'"):
        load_weights(path, config, torch.float32)


@pytest.mark.parametrize("garbage", [b"", b"\x00" * 7, b"not a safetensors file at all" * 10,
                                     b"\x10\x00\x00\x00\x00\x00\x00\x00{bad json}      "])
def test_garbage_weights_file(checkpoints, tmp_path, garbage):
    path = copy_of(checkpoints["qwen3"], tmp_path)
    (path / "model.safetensors").write_bytes(garbage)
    with pytest.raises(CheckpointError, match="model.safetensors: not a readable safetensors file"):
        load_weights(path, load_config(path), torch.float32)


def test_truncated_weights_file(checkpoints, tmp_path):
    path = copy_of(checkpoints["qwen3"], tmp_path)
    file = path / "model.safetensors"
    file.write_bytes(file.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_weights(path, load_config(path), torch.float32)


def test_unsupported_model_type_on_disk(checkpoints, tmp_path):
    path = copy_of(checkpoints["llama"], tmp_path)
    edit_json(path / "config.json", model_type="mixtral")
    with pytest.raises(CheckpointError, match="unsupported model_type 'mixtral'") as e:
        open_model_dir(path)
    assert str(path / "config.json") in str(e.value)


# --- tokenizer -------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_tokenizer_matches_transformers(checkpoints, kind):
    path = checkpoints[kind]
    ours, hf = Tokenizer.from_dir(path), transformers.AutoTokenizer.from_pretrained(path)
    for text in TEXTS:
        for special in (True, False):
            ids = ours.encode(text, add_special_tokens=special)
            assert ids == hf(text, add_special_tokens=special).input_ids, (text, special)
            for skip in (True, False):
                assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)
    rendered = ours.apply_chat_template(CHAT)
    assert rendered == hf.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
    assert rendered.endswith("<|im_start|>assistant\n")
    assert ours.apply_chat_template(CHAT, add_generation_prompt=False) == \
        hf.apply_chat_template(CHAT, add_generation_prompt=False, tokenize=False)
    hf_ids = hf.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True)
    hf_ids = hf_ids["input_ids"] if not isinstance(hf_ids, list) else hf_ids
    assert ours.encode_chat(CHAT) == hf_ids
    assert ours.vocab_size == len(hf)
    assert (ours.bos_token, ours.eos_token) == (hf.bos_token, hf.eos_token)
    assert ours.eos_token_ids == ([1, 3] if kind == "llama" else [3])


def test_chat_template_errors(checkpoints, checkpoint_factory):
    ours = Tokenizer.from_dir(checkpoints["qwen2"])
    with pytest.raises(ChatTemplateError, match="unknown role: robot"):
        ours.apply_chat_template([{"role": "robot", "content": "beep"}])
    bare = Tokenizer.from_dir(checkpoint_factory("qwen2", chat_template=False))
    assert bare.encode("hi") == ours.encode("hi")
    with pytest.raises(ChatTemplateError, match="no chat template"):
        bare.encode_chat(CHAT)


def test_detokenize_stream_never_splits_a_character(checkpoints):
    tok = Tokenizer.from_dir(checkpoints["llama"])
    text = "".join(TEXTS[:5]) + " 中文字符和表情符号 🤖🦾🧠 mixed 😀x"
    ids = tok.encode(text, add_special_tokens=False)
    # The check means something only if some character spans several tokens.
    assert any("\ufffd" in tok.decode([i]) for i in ids)
    for prompt in (None, tok.encode("Prompt: 你好", add_special_tokens=True)):
        stream = DetokenizeStream(tok, prompt_ids=prompt)
        deltas = [stream.push(i) for i in ids] + [stream.flush()]
        assert not any("\ufffd" in d for d in deltas)
        assert "".join(deltas) == tok.decode(ids)  # (== text up to NFC normalization)
    # Special tokens are skipped, as decode skips them.
    stream = DetokenizeStream(tok)
    with_eos = ids[:10] + [tok.token_to_id("<|im_end|>")] + ids[10:20]
    assert "".join([stream.push(i) for i in with_eos] + [stream.flush()]) == tok.decode(with_eos)


def test_detokenize_stream_flushes_an_incomplete_tail(checkpoints):
    tok = Tokenizer.from_dir(checkpoints["qwen2"])
    ids = tok.encode("ok 🦾", add_special_tokens=False)
    partial = ids[:-1]  # the emoji's last byte never arrives
    assert tok.decode(partial).endswith("\ufffd")
    stream = DetokenizeStream(tok)
    deltas = [stream.push(i) for i in partial]
    assert "\ufffd" not in "".join(deltas)
    assert "".join(deltas) + stream.flush() == tok.decode(partial)
