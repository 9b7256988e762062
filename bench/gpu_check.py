"""The cuda driver on a real GPU, in one run: the Triton kernels against torch, the model
ops' speed against torch's, the bandwidth paged decode attention reaches, and the engine
against transformers.

    .venv/bin/python bench/gpu_check.py [--batch 64] [--context 4096] [--new-tokens 128]

1. Kernels: store_kv, paged_attention (decode, prefill, chunked prefill, mixed; GQA 1 to 8;
   float32 and bfloat16; split-K off and forced), copy_blocks, swap out and in, and NaN in
   free blocks, all against the cpu driver's torch ops run on CPU copies of the inputs.
2. Model ops: rms_norm (plain, residual-fused, qk-norm on [T, H, D]), rope and silu_and_mul,
   Triton against the Driver base class's torch defaults on the GPU (float32 and bfloat16,
   Qwen2-0.5B and Llama-3-8B shapes), then us per call of each at a decode and a prefill
   token count (Llama-3-8B shapes, bfloat16).
3. Bandwidth: paged decode at batch x context (default 64 x 4,096) for Qwen2-0.5B and
   Llama-3-8B head shapes: bytes of K+V read / kernel time, as a share of the device's
   datasheet peak and of a large torch copy; dense torch SDPA on the same bytes alongside.
4. Engine: a random-weight model shaped like Qwen2-0.5B (written by transformers to a temp
   dir), decode tokens/s of llmos against transformers `generate` on one static batch.

Without a CUDA GPU it says so and exits with status 2; a failed kernel check exits 1.
Takes about 2-4 minutes on an H100/H200, most of it Triton compiles and the checkpoint.
"""
from __future__ import annotations

import argparse
import math
import random
import sys
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
console = Console()

# Datasheet HBM bandwidth, bytes/s, by a substring of the device name (first match wins).
PEAK_BANDWIDTH = [
    ("GH200", 4.0e12), ("H200", 4.8e12), ("H100 NVL", 3.9e12), ("H100 PCIe", 2.0e12),
    ("H100", 3.35e12), ("H800", 3.35e12), ("B200", 8.0e12), ("A100-SXM4-80GB", 2.04e12),
    ("A100 80GB PCIe", 1.94e12), ("A100", 1.555e12), ("A800", 2.04e12), ("L40S", 0.864e12),
    ("L40", 0.864e12), ("L4", 0.3e12), ("A10G", 0.6e12), ("A10", 0.6e12),
    ("RTX 4090", 1.008e12), ("RTX 3090", 0.936e12), ("V100", 0.9e12), ("T4", 0.32e12),
]
HEADS = {"Qwen2-0.5B": (14, 2, 64), "Llama-3-8B": (32, 8, 128), "GQA 8": (8, 1, 128),
         "MHA": (4, 4, 64)}  # (H, Hkv, D)
SCENARIOS = {  # (tokens already cached, new tokens) per sequence
    "decode": [(0, 1), (15, 1), (16, 1), (31, 1), (300, 1), (1000, 1), (2047, 1), (4100, 1)],
    "prefill": [(0, 1), (0, 100), (0, 513)],
    "chunked": [(1000, 256), (37, 64), (4000, 7)],
    "mixed": [(500, 1), (0, 300), (2000, 1), (64, 64), (10, 0), (3000, 17), (7, 1)],
}
TOL = {torch.float32: dict(atol=1e-4, rtol=0), torch.bfloat16: dict(atol=1e-2, rtol=2e-2)}
QWEN2_05B = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                 num_attention_heads=14, num_key_value_heads=2, vocab_size=151936,
                 tie_word_embeddings=True, max_position_embeddings=32768, rope_theta=1e6)


def make_driver():
    from llmos.drivers import get_driver
    try:
        return get_driver("cuda")
    except ValueError:  # "cuda" not registered yet: the class itself
        from llmos.drivers.cuda import CudaDriver
        return CudaDriver()


# ---- 1. kernels against torch -------------------------------------------------------

def paged_batch(scenario, bs, H, Hkv, D, dtype, device, seed=0):
    """Sequences on shuffled blocks (never block 0), garbage past each table, NaN in every
    free block and past each sequence's end: none of it may be read."""
    gen = torch.Generator().manual_seed(seed)
    seq_lens = [c + n for c, n in scenario]
    need = [math.ceil(n / bs) for n in seq_lens]
    num_blocks = sum(need) + 5
    k_cache = torch.full((num_blocks, bs, Hkv, D), float("nan"))
    v_cache = torch.full_like(k_cache, float("nan"))
    perm = (torch.randperm(num_blocks - 1, generator=gen) + 1).tolist()
    tables = torch.randint(-1000, 1000, (len(scenario), max(need) + 2), generator=gen,
                           dtype=torch.int32)
    for s, n in enumerate(seq_lens):
        blocks, perm = perm[:need[s]], perm[need[s]:]
        tables[s, :need[s]] = torch.tensor(blocks, dtype=torch.int32)
        for i, b in enumerate(blocks):
            live = min(bs, n - i * bs)
            k_cache[b, :live] = torch.randn(live, Hkv, D, generator=gen)
            v_cache[b, :live] = torch.randn(live, Hkv, D, generator=gen)
    q_lens = [n for _, n in scenario]
    q = torch.randn(sum(q_lens), H, D, generator=gen)
    qsl = torch.tensor([0] + q_lens).cumsum(0).to(torch.int32)
    args = [q, k_cache, v_cache, tables, torch.tensor(seq_lens, dtype=torch.int32), qsl]
    cpu = [a.to(dtype) if a.is_floating_point() else a for a in args]
    return cpu, [a.to(device) for a in cpu]


def check_attention(drv) -> list[tuple]:
    from llmos.drivers.cpu import CpuDriver
    ref_drv, rows = CpuDriver(), []
    ref_drv.poison_blocks([], [])  # debug mode: the reference zeroes NaN past each sequence
    for i, (head_name, (H, Hkv, D)) in enumerate(HEADS.items()):
        bs = (16, 32)[i % 2]
        for scen in SCENARIOS:
            for dtype in (torch.float32, torch.bfloat16):
                cpu, dev = paged_batch(SCENARIOS[scen], bs, H, Hkv, D, dtype, drv.device, seed=i)
                ref = ref_drv.paged_attention(*cpu, D ** -0.5).float()
                for split in (False, True):
                    o = drv.kernels.paged_attention(*dev, D ** -0.5, split_k=split).cpu().float()
                    err = (o - ref).abs().max().item()
                    ok = not o.isnan().any() and torch.allclose(o, ref, **TOL[dtype])
                    rows.append((f"paged_attention {scen}", f"{head_name} bs{bs}",
                                 str(dtype).replace("torch.", ""), "on" if split else "off", err, ok))
    return rows


def check_kv_ops(drv) -> list[tuple]:
    from llmos.drivers.cpu import CpuDriver
    ref_drv, dev, rows = CpuDriver(), drv.device, []
    # store_kv: float32 into bfloat16, slots -1 skipped
    k, v = torch.randn(40, 2, 64), torch.randn(40, 2, 64)
    slots = torch.randperm(64 * 16)[:40]
    slots[::7] = -1
    ours = [torch.zeros(64, 16, 2, 64, dtype=torch.bfloat16, device=dev) for _ in range(2)]
    theirs = [torch.zeros(64, 16, 2, 64, dtype=torch.bfloat16) for _ in range(2)]
    drv.store_kv(k.to(dev), v.to(dev), *ours, slots.to(dev))
    ref_drv.store_kv(k, v, *theirs, slots)
    rows.append(("store_kv", "-1 slots, cast", "bfloat16", "", 0.0,
                 all(torch.equal(a.cpu(), b) for a, b in zip(ours, theirs))))
    # copy_blocks: one launch (disjoint) and the overlapping fallback
    for src, dst, what in [([0, 2, 7], [5, 3, 9], "disjoint"), ([0, 1], [1, 2], "overlap")]:
        caches = [(torch.randn(10, 16, 2, 64), torch.randn(10, 16, 2, 64)) for _ in range(3)]
        ours = [(a.to(dev), b.to(dev)) for a, b in caches]
        drv.copy_blocks(ours, src, dst)
        ref_drv.copy_blocks(caches, src, dst)
        rows.append(("copy_blocks", what, "float32", "", 0.0,
                     all(torch.equal(a.cpu(), b) for p, q in zip(ours, caches) for a, b in zip(p, q))))
    # swap out to pinned host blocks and back into other device blocks
    pool = [(torch.randn(12, 16, 2, 64, device=dev), torch.randn(12, 16, 2, 64, device=dev))
            for _ in range(2)]
    host = drv.allocate_swap(2, 8, 16, 2, 64, torch.float32)
    out_dev, out_host, in_dev = [3, 4, 9, 0, 7], [2, 3, 4, 7, 6], [1, 2, 5, 8, 11]
    drv.swap_out(pool, host, out_dev, out_host)
    drv.swap_in(pool, host, out_host, in_dev)
    drv.synchronize()
    ok = all(torch.equal(layer[c][d2], layer[c][d]) for layer in pool for c in (0, 1)
             for d, d2 in zip(out_dev, in_dev))
    rows.append(("swap_out + swap_in", "5 blocks, 2 layers", "float32", "", 0.0, ok))
    return rows


def kernel_checks(drv) -> bool:
    rows = check_kv_ops(drv) + check_attention(drv)
    table = Table(title="1. Triton kernels against the cpu driver's torch ops")
    for col in ("op", "case", "dtype", "split-K", "max |err|", "ok"):
        table.add_column(col)
    for op, case, dtype, split, err, ok in rows:
        table.add_row(op, case, dtype, split, f"{err:.1e}", "[green]ok" if ok else "[red]FAIL")
    console.print(table)
    return all(r[-1] for r in rows)


# ---- 2. model ops against the torch defaults ---------------------------------------------

MODEL_OPS = ("rms_norm", "rope", "silu_and_mul")
OP_MODELS = {"Qwen2-0.5B": (896, 4864), "Llama-3-8B": (4096, 14336)}  # (hidden C, inter I)
OP_TOKENS = {"decode, batch 64": 64, "prefill, 4,096 tokens": 4096}
# On the GPU casts round to nearest, as torch's do, so bfloat16 results differ only where
# float32 sums, rsqrt or exp differ in the last bit and tip a rounding: up to 2 ulps, and
# rarely. rope rounds once where torch rounds thrice: 2 ulps of |q| (randn, so < 8) apart.
OP_TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=1e-2, rtol=2e-2)}
ROPE_BF16_TOL = dict(atol=6.25e-2, rtol=0)


def torch_defaults(drv):
    """A driver of drv's class whose model ops are the Driver base class's torch ones."""
    from llmos.drivers import Driver
    return type("TorchDefaults", (type(drv),), {op: getattr(Driver, op) for op in MODEL_OPS})(
        drv.device)


def op_inputs(T, model, dtype, device, seed=0) -> dict:
    """Random inputs for op_calls, made on the CPU: the same seed gives the same tensors."""
    gen = torch.Generator().manual_seed(seed)
    C, inter = OP_MODELS[model]
    H, Hkv, D = HEADS[model]
    randn = lambda *shape: torch.randn(shape, generator=gen).to(dtype).to(device)  # noqa: E731
    angles = torch.rand(T, D // 2, generator=gen) * 6
    return dict(x=randn(T, C), residual=randn(T, C), weight=1 + 0.1 * randn(C),
                qkv=randn(T, H + 2 * Hkv, D), qk_weight=1 + 0.1 * randn(D),
                gate_up=randn(T, 2 * inter), cos=angles.cos().to(dtype).to(device),
                sin=angles.sin().to(dtype).to(device), H=H, Hkv=Hkv)


def op_calls(drv, a: dict) -> dict:
    """{op case: a call of drv's op on the inputs a, returning its result}. rope rotates q
    and k, views of a["qkv"], in place and returns the qkv."""
    H, Hkv = a["H"], a["Hkv"]

    def rope():
        drv.rope(a["qkv"][:, :H], a["qkv"][:, H:H + Hkv], a["cos"], a["sin"])
        return a["qkv"]
    return {
        "rms_norm": lambda: drv.rms_norm(a["x"], a["weight"], 1e-6),
        "rms_norm + residual": lambda: drv.rms_norm(a["x"], a["weight"], 1e-6, a["residual"]),
        "qk-norm [T, H, D]": lambda: drv.rms_norm(a["qkv"][:, :H], a["qk_weight"], 1e-6),
        "rope, q and k of a qkv": rope,
        "silu_and_mul": lambda: drv.silu_and_mul(a["gate_up"]),
    }


def check_model_ops(drv, ref) -> list[tuple]:
    rows = []
    for model in OP_MODELS:
        for T in (1, 37, 513):
            for dtype in (torch.float32, torch.bfloat16):
                ours = op_calls(drv, op_inputs(T, model, dtype, drv.device))
                theirs = op_calls(ref, op_inputs(T, model, dtype, drv.device))
                for case in ours:
                    got, want = ours[case](), theirs[case]()
                    got, want = (got, want) if isinstance(got, tuple) else ((got,), (want,))
                    tol = ROPE_BF16_TOL if case.startswith("rope") and dtype == torch.bfloat16 \
                        else OP_TOL[dtype]
                    err = max((g.float() - w.float()).abs().max().item() for g, w in zip(got, want))
                    ok = all(g.dtype == w.dtype and g.shape == w.shape and
                             torch.allclose(g.float(), w.float(), **tol) for g, w in zip(got, want))
                    rows.append((case, f"{model}, T={T}", str(dtype).replace("torch.", ""), err, ok))
    return rows


def time_model_ops(drv, ref, model="Llama-3-8B", dtype=torch.bfloat16) -> Table:
    table = Table(title=f"2. Model ops, {model} shapes, {str(dtype).replace('torch.', '')}: "
                        "us per call")
    for col in ("op", "tokens", "torch default", "triton", "speedup"):
        table.add_column(col, justify="right")
    for label, T in OP_TOKENS.items():
        a = op_inputs(T, model, dtype, drv.device)
        ours, theirs = op_calls(drv, a), op_calls(ref, a)
        for case in ours:
            ms_ref, ms = bench_ms(theirs[case]), bench_ms(ours[case])
            table.add_row(case, label, f"{ms_ref * 1e3:.1f}", f"{ms * 1e3:.1f}", f"{ms_ref / ms:.2f}x")
    return table


def model_ops(drv) -> bool:
    ref = torch_defaults(drv)
    rows = check_model_ops(drv, ref)
    table = Table(title="2. Model ops: Triton against the Driver defaults' torch, on the GPU")
    for col in ("op", "case", "dtype", "max |err|", "ok"):
        table.add_column(col)
    for op, case, dtype, err, ok in rows:
        table.add_row(op, case, dtype, f"{err:.1e}", "[green]ok" if ok else "[red]FAIL")
    console.print(table)
    console.print(time_model_ops(drv, ref))
    return all(r[-1] for r in rows)


# ---- 3. decode bandwidth --------------------------------------------------------------

def bench_ms(fn) -> float:
    import triton.testing
    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")


def peak_bandwidth(name: str) -> float | None:
    return next((bw for key, bw in PEAK_BANDWIDTH if key in name), None)


def copy_bandwidth(device) -> float:
    src = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return 2 * src.numel() / (bench_ms(lambda: dst.copy_(src)) * 1e-3)  # read + write


def decode_bandwidth(drv, batch: int, context: int) -> None:
    import torch.nn.functional as F
    from llmos.drivers.triton import paged_attention
    dev, bs, dtype = drv.device, 16, torch.bfloat16
    name = torch.cuda.get_device_name(dev)
    peak, copy_bw = peak_bandwidth(name), copy_bandwidth(dev)
    table = Table(title=f"3. Paged decode attention, batch {batch} x {context} tokens, "
                        f"bfloat16, block {bs} ({name})")
    for col in ("heads (H/Hkv/D)", "kernel", "time", "K+V read", "GB/s", "of peak", "of copy"):
        table.add_column(col, justify="right")
    for head_name in ("Qwen2-0.5B", "Llama-3-8B"):
        H, Hkv, D = HEADS[head_name]
        nb = batch * context // bs
        k_cache = torch.randn(nb, bs, Hkv, D, dtype=dtype, device=dev)
        v_cache = torch.randn_like(k_cache)
        tables = torch.randperm(nb, device=dev).view(batch, -1).to(torch.int32)  # scattered
        seq_lens = torch.full((batch,), context, dtype=torch.int32, device=dev)
        qsl = torch.arange(batch + 1, dtype=torch.int32, device=dev)
        q = torch.randn(batch, H, D, dtype=dtype, device=dev)
        nbytes = 2 * batch * context * Hkv * D * k_cache.element_size()
        runs = {f"paged, split-K {mode}": (lambda s=split, n=nseg: paged_attention(
                    q, k_cache, v_cache, tables, seq_lens, qsl, D ** -0.5, split_k=s, num_segments=n))
                for mode, split, nseg in [("auto", None, None), ("off", False, None),
                                          ("8", True, 8)]}
        kd = k_cache.view(batch, context, Hkv, D).transpose(1, 2)  # dense [B, Hkv, L, D]
        vd = v_cache.view(batch, context, Hkv, D).transpose(1, 2).contiguous()
        kd = kd.contiguous()
        runs["torch SDPA, dense"] = lambda: F.scaled_dot_product_attention(
            q[:, :, None], kd, vd, enable_gqa=True)
        for kernel, fn in runs.items():
            try:
                ms = bench_ms(fn)
            except Exception as e:  # noqa: BLE001 (a dense baseline may lack a GQA kernel)
                table.add_row(f"{head_name} {H}/{Hkv}/{D}", kernel, f"[red]{type(e).__name__}",
                              "", "", "", "")
                continue
            bw = nbytes / (ms * 1e-3)
            table.add_row(f"{head_name} {H}/{Hkv}/{D}", kernel, f"{ms * 1e3:.0f} us",
                          f"{nbytes / 1e9:.2f} GB", f"{bw / 1e9:.0f}",
                          f"{bw / peak:.0%}" if peak else "?", f"{bw / copy_bw:.0%}")
        del k_cache, v_cache, kd, vd
    console.print(table)
    console.print(f"peak: {f'{peak / 1e12:.2f} TB/s (datasheet)' if peak else 'not in the table'}; "
                  f"torch copy of 1 GiB: {copy_bw / 1e12:.2f} TB/s (read + write)")


# ---- 4. engine against transformers -------------------------------------------------------

def timed(fn) -> tuple[float, object]:
    torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start, out


def hf_batch(model, prompts, new_tokens):
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts], device="cuda")  # left pad
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device="cuda")
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, do_sample=False,
                             max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0)
    return out[:, width:].tolist()


def engine_vs_transformers(drv, batch: int, new_tokens: int) -> None:
    from transformers import AutoModelForCausalLM
    from llmos.kernel import Engine
    from tests.checkpoints import make_checkpoint
    with tempfile.TemporaryDirectory() as tmp:
        console.print("4. writing a random Qwen2-0.5B-shaped checkpoint ...")
        path = make_checkpoint("qwen2", Path(tmp) / "qwen2-0.5b", dtype="bfloat16", **QWEN2_05B)
        rng = random.Random(0)  # ids inside the small tokenizer's vocab, so text decodes
        prompts = [[rng.randrange(10, 500) for _ in range(rng.randrange(64, 129))]
                   for _ in range(batch)]
        hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).cuda().eval()
        hf.generation_config.eos_token_id = None
        engine = Engine.from_pretrained(str(path), driver=drv, dtype="bfloat16")
        llmos = lambda n: [c.token_ids for c in engine.generate(  # noqa: E731
            prompts, max_tokens=n, ignore_eos=True)]
        hf_run = lambda n: hf_batch(hf, prompts, n)  # noqa: E731
        results = {}
        for name, run in (("transformers generate, static batch", hf_run), ("llmos", llmos)):
            console.print(f"   {name} ...")
            run(8)  # warm-up: Triton compiles, cuBLAS heuristics
            t1, _ = timed(lambda: run(1))
            tn, out = timed(lambda: run(new_tokens))
            results[name] = (t1, tn, out)
        del hf, engine
    table = Table(title=f"4. Qwen2-0.5B-shaped (random weights), bfloat16, batch {batch}, "
                        f"{new_tokens} new tokens each")
    for col in ("system", "prefill + 1 token", "total", "tokens/s (all)", "decode tokens/s"):
        table.add_column(col, justify="right")
    for name, (t1, tn, _) in results.items():
        table.add_row(name, f"{t1:.2f} s", f"{tn:.2f} s", f"{batch * new_tokens / tn:.0f}",
                      f"{batch * (new_tokens - 1) / (tn - t1):.0f}")
    console.print(table)
    (hf_t1, hf_tn, hf_out), (t1, tn, out) = results.values()
    console.print(f"llmos / transformers decode tokens/s: "
                  f"{(hf_tn - hf_t1) / (tn - t1):.2f}x; greedy first tokens equal in "
                  f"{sum(a[0] == b[0] for a, b in zip(out, hf_out))}/{batch} sequences "
                  "(bfloat16 numerics differ, so later tokens may drift)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=64, help="sequences in the bandwidth and engine runs")
    ap.add_argument("--context", type=int, default=4096, help="tokens per sequence in the bandwidth run")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--skip-engine", action="store_true")
    args = ap.parse_args()
    from llmos.drivers.cuda import CudaDriver
    reason = CudaDriver.unavailable_reason()
    if reason is not None:
        console.print(f"[yellow]gpu_check: no GPU to check: {reason}. Nothing was run.")
        return 2
    drv = make_driver()
    console.print(f"{torch.cuda.get_device_name(drv.device)}, torch {torch.__version__}")
    start = time.perf_counter()
    ok = kernel_checks(drv)
    ok = model_ops(drv) and ok
    decode_bandwidth(drv, args.batch, args.context)
    if not args.skip_engine:
        engine_vs_transformers(drv, args.batch, args.new_tokens)
    console.print(f"{'[green]kernels ok' if ok else '[red]KERNEL CHECKS FAILED'}; "
                  f"{time.perf_counter() - start:.0f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
