"""Loading an engine: from a checkpoint directory (or "tiny") to an Engine with its KV pool sized."""
from __future__ import annotations

import math
import os
from pathlib import Path

import torch

from llmos.drivers.base import parse_size

from . import tunables
from .config import CheckpointError
from .loader import load_weights, open_model_dir
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


def load_engine(cls, path_or_name, *, driver="cpu", dtype=None, kv_memory=None,
                num_blocks: int | None = None, block_size: int = tunables.BLOCK_SIZE,
                max_num_seqs: int = tunables.MAX_NUM_SEQS,
                max_num_batched_tokens: int = tunables.MAX_NUM_BATCHED_TOKENS,
                num_swap_blocks: int | None = None,
                enable_prefix_caching: bool = True, poison: bool | None = None,
                policy: str | None = None, kv_ttl: float | None = None,
                kv_disk: int | str | None = None, kv_disk_dir=None, kv_paging: bool = True,
                kv_disk_blocks: int | None = None, kv_swap: int | str | None = None):
    """Load a model directory onto a driver; raise CheckpointError naming what is wrong.

    dtype: "auto" (None), "float32", "bfloat16", "float16" or a torch.dtype (pick_dtype).

    num_blocks defaults to what kv_memory (bytes or "512M") holds; without kv_memory, to a
    share of the device's free memory, but no more than a full batch of full-length
    sequences needs. num_swap_blocks, the host swap pool, defaults to what kv_swap (bytes
    or "1G") holds, else to half of num_blocks.
    policy (kernel/policy.py) and kv_ttl default to the tunables; kv_disk (bytes or "4G")
    or kv_disk_blocks sizes the disk tier of KV paging, in files under kv_disk_dir.
    """
    from llmos.drivers import get_driver
    drv = get_driver(driver) if isinstance(driver, str) else driver
    mdir = open_model_dir(resolve_model(path_or_name))
    cfg = mdir.config
    torch_dtype, dtype_reason = pick_dtype(dtype, drv)
    model = CausalLM.from_weights(cfg, load_weights(mdir.path, cfg, torch_dtype), drv)
    if block_size < 1 or (num_blocks is not None and num_blocks < 1):
        raise ValueError(f"KV pool: {num_blocks} blocks of {block_size} tokens is too small")
    max_len = min(cfg.max_position_embeddings, cfg.sliding_window or cfg.max_position_embeddings)
    if num_blocks is None:
        num_blocks = _pool_blocks(drv, cfg, block_size, torch_dtype, kv_memory)
        if kv_memory is None:     # a full batch of full-length sequences: more is never used
            num_blocks = min(num_blocks, max_num_seqs * math.ceil(max_len / block_size))
    if num_swap_blocks is None and kv_swap is not None:
        num_swap_blocks = parse_size(kv_swap, "kv_swap") // _block_bytes(cfg, block_size, torch_dtype)
    if num_swap_blocks is None:
        num_swap_blocks = int(num_blocks * tunables.SWAP_FRACTION)
    if poison is None:
        poison = os.environ.get(tunables.POISON_ENV) == "1"
    if kv_disk is not None and kv_disk_blocks is None:
        kv_disk_blocks = parse_size(kv_disk, "kv_disk") // _block_bytes(cfg, block_size, torch_dtype)
    if kv_disk_blocks and kv_disk_dir is None:
        raise ValueError("kv_disk: give the directory for its files (kv_disk_dir)")
    return cls(model, mdir.tokenizer, drv, num_blocks=num_blocks, block_size=block_size,
               max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
               max_model_len=max_len, num_swap_blocks=num_swap_blocks,
               enable_prefix_caching=enable_prefix_caching, poison=poison,
               policy=policy or tunables.DEFAULT_POLICY,
               kv_ttl=tunables.KV_TTL if kv_ttl is None else kv_ttl,
               kv_disk_blocks=kv_disk_blocks or 0, kv_disk_dir=kv_disk_dir, kv_paging=kv_paging,
               dtype_reason=dtype_reason)


def _block_bytes(cfg, block_size, dtype) -> int:
    """Bytes of one KV block: K and V of block_size tokens in every layer."""
    elem = torch.tensor([], dtype=dtype).element_size()
    return 2 * cfg.num_hidden_layers * block_size * cfg.num_key_value_heads * cfg.head_dim * elem


def _pool_blocks(drv, cfg, block_size, dtype, kv_memory) -> int:
    per_block = _block_bytes(cfg, block_size, dtype)
    if kv_memory is None:
        free, _ = drv.memory_info()
        budget = min(int(free * tunables.KV_MEMORY_FRACTION), tunables.KV_MEMORY_CAP)
    else:
        budget = parse_size(kv_memory, "kv_memory")
    if budget < per_block:
        raise ValueError(f"KV pool: {budget} bytes hold no block of {block_size} tokens "
                         f"({per_block} bytes for this model); give a larger kv_memory")
    return budget // per_block


__all__ = ["load_engine", "resolve_model", "CheckpointError"]
