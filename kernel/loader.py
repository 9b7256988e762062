"""Checkpoint loader: a Hugging Face model directory -> config, tokenizer and weights.

A model directory holds config.json, tokenizer.json (+ tokenizer_config.json,
chat_template.jinja, generation_config.json) and the weights as model.safetensors or
as shards listed in model.safetensors.index.json. Weights keep their Hugging Face
names. Every problem with the files is a CheckpointError naming the file, the tensor
and what was expected; nothing is unpickled (no pytorch_model.bin).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from .config import CheckpointError, ModelConfig, load_config, read_json
from .tokenizer import Tokenizer

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_FLOAT_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
# Buffers some exporters save that carry nothing we need (we compute rope ourselves).
_HARMLESS = re.compile(r"(^|\.)rotary_emb\.inv_freq$")


@dataclass(frozen=True)
class ModelDir:
    """An opened model directory: everything but the weights, which load_weights reads."""
    path: Path
    config: ModelConfig
    tokenizer: Tokenizer
    generation_config: dict = field(default_factory=dict, hash=False)

    def load_weights(self, dtype: torch.dtype, device: str | torch.device = "cpu",
                     progress=None) -> dict[str, torch.Tensor]:
        return load_weights(self.path, self.config, dtype, device, progress)


def open_model_dir(path: str | Path) -> ModelDir:
    """Read config, tokenizer and generation config, and check the weight files exist.
    A path ending in .gguf is a GGUF file (kernel/gguf.py), opened the same way.

    Raises CheckpointError naming the missing or bad file.
    """
    path = Path(path)
    if path.suffix == ".gguf" and not path.is_dir():
        from .gguf import open_gguf   # here: kernel/gguf.py imports this module
        return open_gguf(path)
    config = load_config(path)
    tokenizer = Tokenizer.from_dir(path)
    if tokenizer.vocab_size > config.vocab_size:
        raise CheckpointError(f"{path}: tokenizer.json has {tokenizer.vocab_size} tokens but "
                              f"config.json vocab_size is {config.vocab_size}")
    weight_files(path)
    return ModelDir(path, config, tokenizer, read_json(path / "generation_config.json", missing_ok=True))


def weight_files(path: str | Path) -> dict[str, list[str] | None]:
    """{file name: tensor names it should hold, or None for 'all'} for the model's weights.

    Prefers model.safetensors, as transformers does; else every shard the index names
    must exist. Raises CheckpointError naming what is missing.
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such model directory")
    if (path / SINGLE_FILE).is_file():
        return {SINGLE_FILE: None}
    index = path / INDEX_FILE
    if not index.is_file():
        raise CheckpointError(f"{path}: no weights: neither {SINGLE_FILE} nor {INDEX_FILE} is present")
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        assert isinstance(weight_map, dict) and all(isinstance(v, str) for v in weight_map.values())
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AssertionError):
        raise CheckpointError(f"{index}: not a safetensors index (a JSON object with a 'weight_map')") from None
    shards: dict[str, list[str] | None] = {}
    for name, shard in weight_map.items():
        if Path(shard).name != shard or shard in ("", ".", ".."):
            raise CheckpointError(f"{index}: shard name {shard!r} for {name!r} is not a plain file name")
        shards.setdefault(shard, []).append(name)
    for shard in shards:
        if not (path / shard).is_file():
            raise CheckpointError(f"{path / shard}: shard named in {INDEX_FILE} is missing")
    return shards


def expected_weight_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor the model needs, by Hugging Face name, with its shape."""
    c = config
    hidden, inter, d = c.hidden_size, c.intermediate_size, c.head_dim
    q_out, kv_out = c.num_attention_heads * d, c.num_key_value_heads * d
    shapes = {"model.embed_tokens.weight": (c.vocab_size, hidden)}
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": (hidden,),
            p + "self_attn.q_proj.weight": (q_out, hidden),
            p + "self_attn.k_proj.weight": (kv_out, hidden),
            p + "self_attn.v_proj.weight": (kv_out, hidden),
            p + "self_attn.o_proj.weight": (hidden, q_out),
            p + "post_attention_layernorm.weight": (hidden,),
            p + "mlp.gate_proj.weight": (inter, hidden),
            p + "mlp.up_proj.weight": (inter, hidden),
            p + "mlp.down_proj.weight": (hidden, inter),
        }
        if c.attention_bias:
            shapes |= {p + "self_attn.q_proj.bias": (q_out,), p + "self_attn.k_proj.bias": (kv_out,),
                       p + "self_attn.v_proj.bias": (kv_out,)}
        if c.attention_out_bias:
            shapes[p + "self_attn.o_proj.bias"] = (hidden,)
        if c.qk_norm:
            shapes |= {p + "self_attn.q_norm.weight": (d,), p + "self_attn.k_norm.weight": (d,)}
        if c.mlp_bias:
            shapes |= {p + "mlp.gate_proj.bias": (inter,), p + "mlp.up_proj.bias": (inter,),
                       p + "mlp.down_proj.bias": (hidden,)}
    shapes["model.norm.weight"] = (hidden,)
    if not c.tie_word_embeddings:
        shapes["lm_head.weight"] = (c.vocab_size, hidden)
    return shapes


def load_weights(path: str | Path, config: ModelConfig, dtype: torch.dtype,
                 device: str | torch.device = "cpu", progress=None) -> dict[str, torch.Tensor]:
    """Read and check every expected tensor; return {Hugging Face name: tensor in dtype on device}.
    progress(fraction) is called after each tensor, with the share of them read so far.

    With tied embeddings there is no "lm_head.weight" in the result (use the embedding).
    Raises CheckpointError for a missing file or tensor, a shape or dtype that does not
    fit, an unexpected tensor, or an unreadable file, naming the file and tensor.
    """
    path = Path(path)
    expected = expected_weight_shapes(config)
    weights: dict[str, torch.Tensor] = {}
    for name, names_in_index in weight_files(path).items():
        file = path / name
        try:
            with safe_open(str(file), framework="pt", device=str(device)) as f:
                _check_index(file, set(f.keys()), names_in_index)
                for tensor_name in f.keys():
                    if tensor_name in weights:
                        raise CheckpointError(f"{file}: tensor {tensor_name!r} appears in more than one file")
                    if _skip(tensor_name, expected, config, file):
                        continue
                    _check_slice(file, tensor_name, f.get_slice(tensor_name), expected[tensor_name])
                    weights[tensor_name] = f.get_tensor(tensor_name).to(dtype)
                    if progress is not None:
                        progress(len(weights) / len(expected))
        except CheckpointError:
            raise
        except Exception as e:  # safetensors raises its own errors, OSError, or bare Exception
            raise CheckpointError(f"{file}: not a readable safetensors file: {type(e).__name__}: {e}") from None
    missing = [n for n in expected if n not in weights]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"{path}: tensor {missing[0]!r} with shape {expected[missing[0]]} is missing "
                              f"from the weights{more}")
    return weights


def _skip(name: str, expected: dict, config: ModelConfig, file: Path) -> bool:
    """True for a tensor we drop; CheckpointError for one we do not know."""
    if name in expected:
        return False
    if _HARMLESS.search(name) or (name == "lm_head.weight" and config.tie_word_embeddings):
        return True
    raise CheckpointError(f"{file}: unexpected tensor {name!r} (not part of a {config.model_type} model "
                          f"with {config.num_hidden_layers} layers as config.json describes)")


def _check_slice(file: Path, name: str, tensor_slice, shape: tuple[int, ...]) -> None:
    actual = tuple(tensor_slice.get_shape())
    if actual != shape:
        raise CheckpointError(f"{file}: tensor {name!r} has shape {actual}, expected {shape}")
    stored = tensor_slice.get_dtype()
    if stored not in _FLOAT_DTYPES:
        raise CheckpointError(f"{file}: tensor {name!r} is stored as {stored}; only F32, F16 and BF16 are supported")


def _check_index(file: Path, present: set[str], names_in_index: list[str] | None) -> None:
    if names_in_index is None:
        return
    absent = [n for n in names_in_index if n not in present]
    if absent:
        raise CheckpointError(f"{file}: tensor {absent[0]!r} is listed for this shard in {INDEX_FILE} "
                              "but the shard does not contain it")
