"""One cold load for bench/models.py, in a Python process of its own.

    .venv/bin/python bench/load_child.py llmos|transformers DTYPE PATH

Imports the engine, loads the checkpoint at PATH in DTYPE and prints, as its last line
of stdout, JSON {"import_s", "load_s", "weight_bytes"}: seconds of the imports, seconds
of the load call alone, and the bytes its weights hold once loaded. llmos's load
includes making a 16 MiB KV pool (it cannot load without one); transformers allocates no
KV up front.
"""
from __future__ import annotations

import json
import sys
import time


def load_llmos(path: str, dtype: str) -> tuple[float, float, int]:
    start = time.perf_counter()
    from llmos.kernel import Engine
    imported = time.perf_counter()
    engine = Engine.from_pretrained(path, dtype=dtype, kv_memory="16M")
    return imported - start, time.perf_counter() - imported, engine.model.weight_bytes


def load_transformers(path: str, dtype: str) -> tuple[float, float, int]:
    start = time.perf_counter()
    import torch
    from transformers import AutoModelForCausalLM
    imported = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype))
    loaded = time.perf_counter()
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return imported - start, loaded - imported, nbytes


def main() -> None:
    engine, dtype, path = sys.argv[1:4]
    loader = {"llmos": load_llmos, "transformers": load_transformers}[engine]
    import_s, load_s, nbytes = loader(path, dtype)
    print(json.dumps({"import_s": import_s, "load_s": load_s, "weight_bytes": nbytes}))


if __name__ == "__main__":
    main()
