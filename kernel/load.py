"""Loading an engine: from a checkpoint directory, a .gguf file or "tiny" to an Engine with
its KV pool sized. `plan` sizes a load before any weight is read (the model table admits
loads by it); `build` reads the weights and makes the engine."""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from llmos.drivers.base import parse_size

from . import tunables
from .config import CheckpointError
from .loader import ModelDir, expected_weight_shapes, open_model_dir
from .models.llama import CausalLM

EMBEDDED = {"tiny": Path(__file__).parent / "tiny" / "model"}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_model(path_or_name: str | os.PathLike) -> Path:
    """"tiny" names the embedded model; anything else is a directory."""
    return EMBEDDED.get(str(path_or_name), Path(path_or_name))


def pick_dtype(requested: str | torch.dtype | None, driver) -> tuple[torch.dtype, str]:
    """(dtype, why) for the weights and the KV pool. "auto" (or None) is the driver's
    fastest dtype: bfloat16 where the hardware computes it natively (a CPU with
    AVX512-BF16 or AMX, most GPUs), float32 elsewhere, whatever the checkpoint stores.
    A dtype name or torch.dtype is taken as asked. ValueError for an unknown name."""
    if isinstance(requested, torch.dtype):
        return requested, "asked"
    if requested in (None, "auto"):
        dtype, why = driver.preferred_dtype()
        return dtype, f"auto: {why}"
    if requested not in DTYPES:
        raise ValueError(f"dtype: {requested!r} is not one of auto, {', '.join(DTYPES)}")
    return DTYPES[requested], "asked"


@dataclass(frozen=True)
class Plan:
    """What loading one model takes, known before its weights are read (the model table
    admits a load by it): the opened directory, the dtype, the pools' sizes, the bytes."""
    mdir: ModelDir
    dtype: torch.dtype
    dtype_reason: str
    quantize: str | None
    block_size: int
    num_blocks: int
    num_swap_blocks: int
    kv_disk_blocks: int
    max_model_len: int
    weight_bytes: int          # the prepared weights (an estimate: CausalLM.estimate_bytes)
    kv_bytes: int              # the device KV pool
    swap_bytes: int            # the host swap pool

    @property
    def device_bytes(self) -> int:
        """What the model holds in device memory: its weights and its KV pool."""
        return self.weight_bytes + self.kv_bytes


def open_model(path_or_name: str | os.PathLike) -> ModelDir:
    """Config and tokenizer of "tiny", a model directory or a .gguf file (no weights).
    Raises CheckpointError naming the file and what is wrong."""
    return open_model_dir(resolve_model(path_or_name))


def plan(mdir: ModelDir, drv, *, dtype=None, quantize: str | None = None, kv_memory=None,
         num_blocks: int | None = None, block_size: int = tunables.BLOCK_SIZE,
         max_num_seqs: int = tunables.MAX_NUM_SEQS, num_swap_blocks: int | None = None,
         kv_swap: int | str | None = None, kv_disk: int | str | None = None,
         kv_disk_blocks: int | None = None) -> Plan:
    """Size a load of mdir onto driver drv. Raises ValueError for sizes that cannot work.

    dtype: "auto" (None), "float32", "bfloat16", "float16" or a torch.dtype (pick_dtype).
    quantize: None or "int8" (weight-only, per output channel; the driver's prepare_linear).
    num_blocks defaults to what kv_memory (bytes or "512M") holds; without kv_memory, to a
    share of the device's free memory, but no more than a full batch of full-length
    sequences needs. num_swap_blocks, the host swap pool, defaults to what kv_swap (bytes
    or "1G") holds, else to half of num_blocks. kv_disk (bytes or "4G") or kv_disk_blocks
    sizes the disk tier of KV paging.
    """
    cfg = mdir.config
    torch_dtype, dtype_reason = pick_dtype(dtype, drv)
    if block_size < 1 or (num_blocks is not None and num_blocks < 1):
        raise ValueError(f"KV pool: {num_blocks} blocks of {block_size} tokens is too small")
    max_len = max_model_len(cfg)
    block_bytes = _block_bytes(cfg, block_size, torch_dtype)
    if num_blocks is None:
        num_blocks = _pool_blocks(drv, block_bytes, block_size, kv_memory)
        if kv_memory is None:     # a full batch of full-length sequences: more is never used
            num_blocks = min(num_blocks, max_num_seqs * math.ceil(max_len / block_size))
    if num_swap_blocks is None and kv_swap is not None:
        num_swap_blocks = parse_size(kv_swap, "kv_swap") // block_bytes
    if num_swap_blocks is None:
        num_swap_blocks = int(num_blocks * tunables.SWAP_FRACTION)
    if kv_disk is not None and kv_disk_blocks is None:
        kv_disk_blocks = parse_size(kv_disk, "kv_disk") // block_bytes
    return Plan(mdir, torch_dtype, dtype_reason, quantize, block_size, num_blocks,
                num_swap_blocks, kv_disk_blocks or 0, max_len,
                CausalLM.estimate_bytes(cfg, torch_dtype, quantize),
                num_blocks * block_bytes, num_swap_blocks * block_bytes)


def build(cls, p: Plan, drv, *, progress=None, max_num_seqs: int = tunables.MAX_NUM_SEQS,
          max_num_batched_tokens: int = tunables.MAX_NUM_BATCHED_TOKENS,
          enable_prefix_caching: bool = True, poison: bool | None = None,
          policy: str | None = None, kv_ttl: float | None = None, kv_disk_dir=None,
          kv_paging: bool = True):
    """Read the weights of plan p (progress(fraction) as they come, from this thread),
    prepare them on the driver and make the engine with its pools. Raises
    CheckpointError naming the file and tensor that is wrong."""
    if p.kv_disk_blocks and kv_disk_dir is None:
        raise ValueError("kv_disk: give the directory for its files (kv_disk_dir)")
    if poison is None:
        poison = os.environ.get(tunables.POISON_ENV) == "1"
    model = CausalLM.from_weights(p.mdir.config, p.mdir.load_weights(p.dtype, progress=progress),
                                  drv, quantize=p.quantize)
    return cls(model, p.mdir.tokenizer, drv, num_blocks=p.num_blocks, block_size=p.block_size,
               max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
               max_model_len=p.max_model_len, num_swap_blocks=p.num_swap_blocks,
               enable_prefix_caching=enable_prefix_caching, poison=poison,
               policy=policy or tunables.DEFAULT_POLICY,
               kv_ttl=tunables.KV_TTL if kv_ttl is None else kv_ttl,
               kv_disk_blocks=p.kv_disk_blocks, kv_disk_dir=kv_disk_dir, kv_paging=kv_paging,
               dtype_reason=p.dtype_reason)


PLAN_OPTIONS = ("dtype", "quantize", "kv_memory", "num_blocks", "block_size", "max_num_seqs",
                "num_swap_blocks", "kv_swap", "kv_disk", "kv_disk_blocks")


def load_engine(cls, path_or_name, *, driver="cpu", progress=None, **options):
    """Load "tiny", a model directory or a .gguf file (or an opened ModelDir) onto a
    driver: plan, then build (their options). Raises CheckpointError naming what is
    wrong, ValueError for bad sizes."""
    from llmos.drivers import get_driver
    drv = get_driver(driver) if isinstance(driver, str) else driver
    mdir = path_or_name if isinstance(path_or_name, ModelDir) else open_model(path_or_name)
    planned = {k: options.pop(k) for k in PLAN_OPTIONS if k in options}
    if "max_num_seqs" in planned:
        options["max_num_seqs"] = planned["max_num_seqs"]
    return build(cls, plan(mdir, drv, **planned), drv, progress=progress, **options)


def max_model_len(cfg) -> int:
    """The context length the kernel serves a model of config cfg at."""
    return min(cfg.max_position_embeddings, cfg.sliding_window or cfg.max_position_embeddings)


def count_params(cfg) -> int:
    """Parameters of a model of config cfg (a tied head counted once)."""
    return sum(math.prod(shape) for shape in expected_weight_shapes(cfg).values())


def _block_bytes(cfg, block_size, dtype) -> int:
    """Bytes of one KV block: K and V of block_size tokens in every layer."""
    elem = torch.tensor([], dtype=dtype).element_size()
    return 2 * cfg.num_hidden_layers * block_size * cfg.num_key_value_heads * cfg.head_dim * elem


def _pool_blocks(drv, per_block: int, block_size: int, kv_memory) -> int:
    if kv_memory is None:
        free, _ = drv.memory_info()
        budget = min(int(free * tunables.KV_MEMORY_FRACTION), tunables.KV_MEMORY_CAP)
    else:
        budget = parse_size(kv_memory, "kv_memory")
    if budget < per_block:
        raise ValueError(f"KV pool: {budget} bytes hold no block of {block_size} tokens "
                         f"({per_block} bytes for this model); give a larger kv_memory")
    return budget // per_block


__all__ = ["load_engine", "open_model", "plan", "build", "Plan", "resolve_model",
           "CheckpointError"]
