"""Model configuration: one frozen dataclass read from a Hugging Face config.json.

Supported architectures are the Llama family as Hugging Face writes them: llama,
mistral, qwen2 and qwen3. Both the old rope form (`rope_theta` + `rope_scaling`) and
the transformers-v5 form (`rope_parameters`) are accepted. Anything we cannot run
exactly as transformers would is refused with a CheckpointError, never guessed.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
SUPPORTED_DTYPES = ("float32", "bfloat16", "float16")

# transformers' per-architecture defaults for keys a config.json may leave out.
_MAX_POSITIONS_DEFAULT = {"llama": 2048, "mistral": 4096 * 32, "qwen2": 32768, "qwen3": 32768}
_MISTRAL_SLIDING_WINDOW_DEFAULT = 4096
_ROPE_THETA_DEFAULT = 10_000.0
_RMS_NORM_EPS_DEFAULT = 1e-6


class CheckpointError(ValueError):
    """A checkpoint directory or file we cannot load; the message names the file and the key."""


@dataclass(frozen=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    # None for plain rope; else {"rope_type": "linear"|"llama3", "factor", ...} (see _rope_scaling)
    rope_scaling: dict | None = field(default=None, hash=False)
    max_position_embeddings: int = 2048
    sliding_window: int | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # q/k/v projections carry a bias
    attention_out_bias: bool = False  # o_proj carries one too (llama/qwen3 attention_bias; never qwen2)
    mlp_bias: bool = False
    qk_norm: bool = False  # RMSNorm over each head of q and k (qwen3)
    torch_dtype: str = "float32"  # dtype the weights were saved in
    bos_token_id: int | None = None
    eos_token_id: list[int] = field(default_factory=list, hash=False)

    @property
    def rope_type(self) -> str:
        return self.rope_scaling["rope_type"] if self.rope_scaling else "default"

    @property
    def dtype(self) -> torch.dtype:
        return getattr(torch, self.torch_dtype)

    @classmethod
    def from_dict(cls, d: dict, source: str = "config.json") -> "ModelConfig":
        """Build from a parsed config.json; raises CheckpointError naming `source` and the key."""
        return _parse(_Reader(d, source))


def load_config(path: str | Path) -> ModelConfig:
    """Read config.json from a model directory (or the file itself)."""
    path = Path(path)
    file = path / "config.json" if path.is_dir() else path
    if not path.exists():
        raise CheckpointError(f"{path}: no such model directory")
    if not file.is_file():
        raise CheckpointError(f"{file}: config.json is missing")
    return ModelConfig.from_dict(read_json(file), source=str(file))


def read_json(file: Path, missing_ok: bool = False) -> dict:
    """The JSON object in file ({} if absent and missing_ok); CheckpointError if unreadable."""
    if missing_ok and not file.is_file():
        return {}
    try:
        d = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{file}: not valid JSON: {e}") from None
    if not isinstance(d, dict):
        raise CheckpointError(f"{file}: expected a JSON object, got {type(d).__name__}")
    return d


def rope_inv_freq(config: ModelConfig) -> torch.Tensor:
    """Rotary inverse frequencies, float32 [head_dim // 2], computed as transformers does."""
    dim = config.head_dim
    # inv_freq: [dim // 2]
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaling = config.rope_scaling
    if scaling is None:
        return inv_freq
    if scaling["rope_type"] == "linear":
        return inv_freq / scaling["factor"]
    return _llama3_inv_freq(inv_freq, scaling)


def rope_attention_scaling(config: ModelConfig) -> float:
    """Factor transformers applies to cos/sin; 1.0 for every rope type we support."""
    return 1.0


def _llama3_inv_freq(inv_freq: torch.Tensor, s: dict) -> torch.Tensor:
    # Llama 3.1: long wavelengths divided by factor, short ones kept, a smooth ramp between.
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_context_len = s["original_max_position_embeddings"]
    low_freq_wavelen = old_context_len / low
    high_freq_wavelen = old_context_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class _Reader:
    """Typed access to one config dict; every failure names the source file and key."""

    def __init__(self, d: dict, source: str):
        self.d, self.source = d, source

    def fail(self, msg: str) -> CheckpointError:
        return CheckpointError(f"{self.source}: {msg}")

    def has(self, key: str) -> bool:
        return self.d.get(key) is not None

    def get_int(self, key: str, default: Any = ..., positive: bool = True) -> Any:
        if not self.has(key):
            return self._default(key, default)
        v = self.d[key]
        if isinstance(v, bool) or not isinstance(v, int) or (positive and v <= 0):
            raise self.fail(f"{key!r} must be a {'positive ' if positive else ''}integer, got {v!r}")
        return v

    def get_float(self, key: str, default: Any = ...) -> Any:
        if not self.has(key):
            return self._default(key, default)
        v = self.d[key]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            raise self.fail(f"{key!r} must be a positive number, got {v!r}")
        return float(v)

    def get_bool(self, key: str, default: bool) -> bool:
        v = self.d[key] if self.has(key) else default
        if not isinstance(v, bool):
            raise self.fail(f"{key!r} must be true or false, got {v!r}")
        return v

    def _default(self, key: str, default: Any) -> Any:
        if default is ...:
            raise self.fail(f"required key {key!r} is missing")
        return default


def _parse(r: _Reader) -> ModelConfig:
    model_type = r.d.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        if model_type is None:
            raise r.fail("required key 'model_type' is missing")
        raise r.fail(f"unsupported model_type {model_type!r} (supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
    hidden = r.get_int("hidden_size")
    heads = r.get_int("num_attention_heads")
    kv_heads = r.get_int("num_key_value_heads", heads)
    if heads % kv_heads:
        raise r.fail(f"num_attention_heads={heads} is not a multiple of num_key_value_heads={kv_heads}")
    if r.has("head_dim"):
        head_dim = r.get_int("head_dim")
    elif hidden % heads:
        raise r.fail(f"hidden_size={hidden} is not divisible by num_attention_heads={heads}")
    else:
        head_dim = hidden // heads
    if head_dim % 2:
        raise r.fail(f"head_dim={head_dim} must be even for rotary embeddings")
    act = r.d.get("hidden_act", "silu")
    if act != "silu":
        raise r.fail(f"unsupported hidden_act {act!r} (only 'silu')")
    if r.d.get("partial_rotary_factor", 1.0) != 1.0:
        raise r.fail(f"unsupported partial_rotary_factor {r.d['partial_rotary_factor']!r}")
    max_pos = r.get_int("max_position_embeddings", _MAX_POSITIONS_DEFAULT[model_type])
    rope_theta, rope_scaling = _rope(r, max_pos)
    attention_bias = model_type in ("llama", "qwen3") and r.get_bool("attention_bias", False)
    return ModelConfig(
        model_type=model_type,
        vocab_size=r.get_int("vocab_size"),
        hidden_size=hidden,
        intermediate_size=r.get_int("intermediate_size"),
        num_hidden_layers=r.get_int("num_hidden_layers"),
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        rms_norm_eps=r.get_float("rms_norm_eps", _RMS_NORM_EPS_DEFAULT),
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
        max_position_embeddings=max_pos,
        sliding_window=_sliding_window(r, model_type),
        tie_word_embeddings=r.get_bool("tie_word_embeddings", False),
        attention_bias=model_type == "qwen2" or attention_bias,
        attention_out_bias=attention_bias,
        mlp_bias=r.get_bool("mlp_bias", False) if model_type == "llama" else False,
        qk_norm=model_type == "qwen3",
        torch_dtype=_dtype(r),
        bos_token_id=r.get_int("bos_token_id", None, positive=False),
        eos_token_id=_token_ids(r, "eos_token_id"),
    )


def _rope(r: _Reader, max_pos: int) -> tuple[float, dict | None]:
    """(rope_theta, normalized scaling or None) from either the v5 or the old form."""
    key = "rope_parameters" if r.has("rope_parameters") else "rope_scaling"
    params = r.d.get(key) or {}
    if not isinstance(params, dict):
        raise r.fail(f"{key!r} must be an object, got {params!r}")
    if any(isinstance(v, dict) for v in params.values()):
        raise r.fail(f"per-layer {key!r} is not supported")
    p = _Reader(params, f"{r.source}: {key!r}")
    theta = p.get_float("rope_theta", r.get_float("rope_theta", _ROPE_THETA_DEFAULT))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise p.fail(f"unsupported rope type {rope_type!r} (supported: {', '.join(SUPPORTED_ROPE_TYPES)})")
    if rope_type == "default":
        return theta, None
    scaling = {"rope_type": rope_type, "factor": p.get_float("factor")}
    if rope_type == "llama3":
        scaling["low_freq_factor"] = p.get_float("low_freq_factor")
        scaling["high_freq_factor"] = p.get_float("high_freq_factor")
        scaling["original_max_position_embeddings"] = p.get_int("original_max_position_embeddings", max_pos)
        if scaling["high_freq_factor"] <= scaling["low_freq_factor"]:
            raise p.fail("high_freq_factor must be greater than low_freq_factor")
    return theta, scaling


def _sliding_window(r: _Reader, model_type: str) -> int | None:
    if model_type == "llama":
        return None
    if model_type == "mistral":
        # transformers' MistralConfig defaults the window to 4096 when the key is absent; null disables it.
        if "sliding_window" not in r.d:
            return _MISTRAL_SLIDING_WINDOW_DEFAULT
        return r.get_int("sliding_window", None)
    # qwen2/qwen3: the window only counts with use_sliding_window, and only for layers >= max_window_layers.
    if not r.get_bool("use_sliding_window", False):
        return None
    window = r.get_int("sliding_window", 4096)
    layers = r.get_int("num_hidden_layers")
    layer_types = r.d.get("layer_types") or [
        "sliding_attention" if i >= r.get_int("max_window_layers", 28, positive=False) else "full_attention"
        for i in range(layers)
    ]
    if all(t == "full_attention" for t in layer_types):
        return None
    if all(t == "sliding_attention" for t in layer_types):
        return window
    raise r.fail(f"a sliding window on only some layers is not supported (layer_types={layer_types})")


def _dtype(r: _Reader) -> str:
    key = "dtype" if r.has("dtype") else "torch_dtype"
    v = r.d.get(key) or "float32"
    if v not in SUPPORTED_DTYPES:
        raise r.fail(f"unsupported {key} {v!r} (supported: {', '.join(SUPPORTED_DTYPES)})")
    return v


def _token_ids(r: _Reader, key: str) -> list[int]:
    v = r.d.get(key)
    ids = [] if v is None else [v] if isinstance(v, int) else v
    if not isinstance(ids, list) or any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in ids):
        raise r.fail(f"{key!r} must be a token id or a list of token ids, got {v!r}")
    return ids
