"""The C paged attention (drivers/cpu_attention.py) against the cpu driver's torch path.

Decode at batch 1, 16, 32 over contexts of 128, 512, 2048 tokens, for two head layouts
(12 query heads on 12 KV heads with D=64; 32 on 8 with D=128), block size 16, then one
prefill (512 new tokens, no cached prefix) per layout. The two run interleaved, round by
round, so machine noise hits both; each cell is the median over rounds of the mean time
of a call. Sequences sit on shuffled blocks, as in a pool that has been in use.

    python bench/cpu_attention.py [--threads 2] [--dtype float32] [--rounds 5]
"""
from __future__ import annotations

import argparse
import math
import statistics
import time

import torch
from rich.console import Console
from rich.table import Table

from llmos.drivers import CpuDriver, cpu_attention

BLOCK = 16
LAYOUTS = [(12, 12, 64), (32, 8, 128)]     # (H, Hkv, D)
BATCHES = [1, 16, 32]
CONTEXTS = [128, 512, 2048]
PREFILL = 512                              # new tokens of the prefill shape
ROUND_S = 0.15                             # s of calls per method per round


def make_step(batch: int, context: int, new: int, H: int, Hkv: int, D: int,
              dtype: torch.dtype) -> dict:
    """One layer's paged_attention arguments: `batch` sequences of `context` tokens, the
    last `new` of them new."""
    per_seq = math.ceil(context / BLOCK)
    num_blocks = batch * per_seq + 1
    k_cache = torch.randn(num_blocks, BLOCK, Hkv, D).to(dtype)
    v_cache = torch.randn(num_blocks, BLOCK, Hkv, D).to(dtype)
    blocks = torch.randperm(num_blocks)[:batch * per_seq].to(torch.int32)
    return dict(q=torch.randn(batch * new, H, D).to(dtype), k_cache=k_cache, v_cache=v_cache,
                block_tables=blocks.view(batch, per_seq),
                seq_lens=torch.full((batch,), context, dtype=torch.int32),
                query_start_loc=torch.arange(0, batch * new + 1, new, dtype=torch.int32),
                scale=D ** -0.5)


def time_calls(fn, args: dict, seconds: float) -> float:
    """Mean seconds per call over about `seconds` of calls (at least 3)."""
    fn(**args)
    n, start = 0, time.perf_counter()
    while n < 3 or time.perf_counter() - start < seconds:
        fn(**args)
        n += 1
    return (time.perf_counter() - start) / n


def measure(args: dict, threads: int, rounds: int) -> tuple[float, float]:
    """(torch µs, C µs) per call, medians over interleaved rounds."""
    drv = CpuDriver()

    def c_kernel(**kw):
        return cpu_attention.paged_attention(**kw, num_threads=threads)

    out_t, out_c = drv.paged_attention(**args), c_kernel(**args)
    torch.testing.assert_close(out_c.float(), out_t.float(), atol=2e-2, rtol=0)
    ts, cs = [], []
    for _ in range(rounds):
        ts.append(time_calls(drv.paged_attention, args, ROUND_S))
        cs.append(time_calls(c_kernel, args, ROUND_S))
    return statistics.median(ts) * 1e6, statistics.median(cs) * 1e6


def shapes():
    for H, Hkv, D in LAYOUTS:
        for batch in BATCHES:
            for context in CONTEXTS:
                yield "decode", batch, context, 1, H, Hkv, D
    for H, Hkv, D in LAYOUTS:
        yield "prefill", 1, PREFILL, PREFILL, H, Hkv, D


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--rounds", type=int, default=5)
    a = ap.parse_args()
    console = Console()
    if not cpu_attention.available():
        console.print(f"C paged attention unavailable: {cpu_attention.unavailable_reason()}")
        return
    torch.set_num_threads(a.threads)
    dtype = getattr(torch, a.dtype)
    table = Table(title=f"paged attention, {a.dtype}, block {BLOCK}, {a.threads} threads: "
                        f"µs per call (one layer)")
    for col in ("kind", "batch", "context", "H/Hkv", "D", "torch µs", "C µs", "torch / C"):
        table.add_column(col, justify="right")
    for kind, batch, context, new, H, Hkv, D in shapes():
        args = make_step(batch, context, new, H, Hkv, D, dtype)
        t_us, c_us = measure(args, a.threads, a.rounds)
        table.add_row(kind, str(batch), str(context), f"{H}/{Hkv}", str(D), f"{t_us:,.0f}",
                      f"{c_us:,.0f}", f"{t_us / c_us:.2f}x")
        del args
    console.print(table)


if __name__ == "__main__":
    main()
