"""The model table's costs: load time against transformers, switching to a cold model,
two models served at once, and int8 against bf16 and fp32 decode, in one run.

    .venv/bin/python bench/models.py [--sections load,switch,two,dtypes] [--rounds 3]
        [--threads 1] [--clients 8] [--window 10] [--quick] [--cache DIR] [--json FILE]

Models: bench/peers.py's random Llamas (same configs and seed), stored in bf16
safetensors: "llama100m" (12 layers, d768, vocab 32k: 113M parameters in its layers, 162M
with its untied embedding and head) and "llama4" (4 layers, d256). Made once under
--cache (default $TMPDIR/llmos-bench-models) and reused by later runs.

load    The 100M model loaded in a fresh Python process per load (bench/load_child.py):
        llmos `Engine.from_pretrained` in bfloat16 (the stored dtype) and float32
        (converted at load: what dtype "auto" picks on a CPU without native bf16),
        transformers `AutoModelForCausalLM.from_pretrained` in the same two dtypes. The
        checkpoint is read once first, so every load finds it in the page cache. The load
        call is timed alone; the imports before it apart.
switch  A kernel booted on tiny (--memory 6G) with the 100M model registered twice
        (`model_add`, keep-alive for ever): dtype auto and bfloat16. Per round and name: a
        1-token greedy generate (16-token prompt) while it is not loaded (cold: the kernel
        loads it off the engine thread first), the median of 3 of the same call warm, then
        `model_unload`, an explicit `model_load` and an unload again, each timed. Every
        call gets a fresh prompt, so no cached prefix helps.
two     A kernel serving tiny and llama4. --clients streaming clients per model (threads,
        each its own connection), each generating 32 new tokens per request back to back;
        tokens are counted as they arrive in a --window of seconds after a warm-up. Per
        round, in rotated order: tiny alone, llama4 alone, both together. Per model:
        together / alone. Sum of shares: the two ratios added; 1.0 when the models only
        share the engine at no cost, below it when switching between them loses throughput.
dtypes  In-process engines on the 100M model: float32, bfloat16 and int8 (weight-only,
        float32 activations). Decode tok/s of --requests requests of a 16-token prompt and
        N+1 new tokens each: the engine's steps after every request has its first token
        (its prefill done) are timed and their tokens counted. N = --new-tokens, half of it
        for bf16 on a CPU without native bf16 (emulated: its prefill alone takes seconds).
        Weight bytes: engine.model.weight_bytes. Agreement: requests whose first new
        token, and whose new tokens over the shorter length, equal fp32's. int8 whose
        weights are not under 90% of fp32's, or that fails to load, is reported
        unavailable, with the reason.

Every kernel, child process and in-process engine runs with --threads OpenMP threads
(default 1: on a shared 2-core box two threads wait on each other at every op). Rounds
run every variant once in a rotated order; tables give the MEDIAN of the rounds and their
spread, (slowest - fastest) / median. Progress goes to stderr, the tables (markdown) to
stdout. A default run takes about 10 minutes on 2 busy cores, --quick about 3.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench.benchkit import close_all, kernel, load_line  # noqa: E402
from bench.peers import MODELS  # noqa: E402
from llmos.drivers.cpu import bf16_support  # noqa: E402
from llmos.kernel import Engine  # noqa: E402
from llmos.userland import SyscallError, connect  # noqa: E402

log = Console(stderr=True, width=130)         # progress
out = Console(width=200, highlight=False)     # the tables: wide, so markdown rows never wrap
SHORT = {"float32": "fp32", "bfloat16": "bf16", "auto": "auto"}
SECTIONS = ("load", "switch", "two", "dtypes")
BIG, SMALL = "llama100m", "llama4"            # keys of bench/peers.py's MODELS
VOCAB = (10, 400)                 # prompt token ids every model here has (tiny: 512)
PROMPT_LEN = 16
LOADS = [("llmos", "bfloat16"), ("llmos", "float32"),
         ("transformers", "bfloat16"), ("transformers", "float32")]
SWITCH_DTYPES = ("auto", "bfloat16")
TWO_NEW_TOKENS = 32               # per request of a "two" client
DTYPE_ROWS = [("fp32", "float32", None), ("bf16", "bfloat16", None), ("int8", "float32", "int8")]
INT8_MAX_SHARE = 0.9              # int8 weights past this share of fp32's: not quantized
UNLOAD_WAIT = 10.0                # s to retry an unload that finds the model still busy


def median(xs) -> float | None:
    return statistics.median(xs) if xs else None


def spread(xs) -> str:
    return f"{100 * (max(xs) - min(xs)) / statistics.median(xs):.0f}%" if len(xs) > 1 else "-"


def rotated(items: list, rnd: int) -> list:
    k = rnd % len(items)
    return items[k:] + items[:k]


def one_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}".splitlines()[0][:200]


def warn(text: str) -> None:
    log.print(f"  [yellow]{escape(text)}[/yellow]")


@dataclass
class Report:
    """One section's markdown table under its title (rich would wrap a long title to the
    table's width)."""
    title: str
    table: Table

    def print(self) -> None:
        out.print(f"**{self.title}**\n")
        out.print(self.table)
        out.print()


def md_table(title: str, columns: list[str]) -> Report:
    table = Table(box=box.MARKDOWN)
    for i, col in enumerate(columns):
        table.add_column(col, justify="left" if i == 0 else "right", no_wrap=True)
    return Report(title, table)


def checkpoint(key: str, cache: Path) -> Path:
    """bench/peers.py's random Llama `key` in bf16 safetensors under cache: made once
    (into a temp dir, then renamed into place), reused after."""
    final = cache / f"{key}-bf16"
    if (final / "config.json").exists():
        return final
    from tests.checkpoints import make_checkpoint
    layers, hidden, heads = MODELS[key]
    log.print(f"making the random {key} checkpoint (bf16) in {final}")
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=cache))
    # The config of bench/peers.py's checkpoint(), stored in bf16 rather than fp32.
    make_checkpoint("llama", tmp, dtype="bfloat16", vocab_size=32000, hidden_size=hidden,
                    intermediate_size=4 * hidden, num_hidden_layers=layers,
                    num_attention_heads=heads, num_key_value_heads=heads,
                    max_position_embeddings=2048, rope_scaling=None)
    tmp.rename(final)
    return final


def prompt(rng: random.Random) -> list[int]:
    return [rng.randrange(*VOCAB) for _ in range(PROMPT_LEN)]


# ---- load: llmos and transformers, each in a cold process ----------------------------------

@dataclass
class LoadRow:
    engine: str
    dtype: str
    load_s: list[float] = field(default_factory=list)
    import_s: list[float] = field(default_factory=list)
    weight_bytes: int = 0
    error: str | None = None


def cold_load(engine: str, dtype: str, path: Path, threads: int) -> dict:
    """{"import_s", "load_s", "weight_bytes"} of one load in a fresh process. Raises
    RuntimeError with the child's last words if it fails."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLMOS_")}
    env.update(OMP_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "load_child.py"), engine, dtype,
                          str(path)], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=600)
    if run.returncode != 0:
        raise RuntimeError((run.stderr.strip().splitlines() or ["exited %d" % run.returncode])[-1])
    return json.loads(run.stdout.strip().splitlines()[-1])


def read_through(path: Path) -> None:
    """Read every file of path once, so that the timed loads find it in the page cache."""
    for f in path.iterdir():
        with open(f, "rb") as fh:
            while fh.read(1 << 24):
                pass


def bench_load(path: Path, rounds: int, threads: int) -> list[LoadRow]:
    read_through(path)
    rows = [LoadRow(engine, dtype) for engine, dtype in LOADS]
    for rnd in range(rounds):
        for row in rotated(rows, rnd):
            if row.error:
                continue
            try:
                got = cold_load(row.engine, row.dtype, path, threads)
            except (RuntimeError, subprocess.TimeoutExpired) as exc:
                row.error = one_line(exc)
                warn(f"{row.engine} {SHORT[row.dtype]}: {row.error}")
                continue
            row.load_s.append(got["load_s"])
            row.import_s.append(got["import_s"])
            row.weight_bytes = got["weight_bytes"]
            log.print(f"  load round {rnd + 1}/{rounds}  {row.engine:<12} {SHORT[row.dtype]}  "
                      f"{got['load_s']:6.2f} s  (imports {got['import_s']:.2f} s)")
    return rows


def load_table(rows: list[LoadRow], rounds: int) -> Report:
    report = md_table(f"Load: the {BIG} checkpoint (bf16 safetensors, page cache warm), "
                      f"a fresh process per load; median of {rounds}",
                      ["engine", "dtype", "load s", "spread", "transformers (same dtype) / this",
                       "imports s", "weights MiB"])
    hf = {r.dtype: median(r.load_s) for r in rows if r.engine == "transformers"}
    for r in rows:
        if r.error or not r.load_s:
            report.table.add_row(r.engine, SHORT[r.dtype], f"failed: {r.error}")
            continue
        m = median(r.load_s)
        ratio = ("(reference)" if r.engine == "transformers" else
                 f"{hf[r.dtype] / m:.2f}x" if hf.get(r.dtype) else "-")
        report.table.add_row(r.engine, SHORT[r.dtype], f"{m:.2f}", spread(r.load_s), ratio,
                      f"{median(r.import_s):.2f}", f"{r.weight_bytes / 2**20:.0f}")
    return report


# ---- switch: first token on a cold model against a warm one, through a kernel --------------

@dataclass
class SwitchRow:
    name: str                     # registered in the kernel for this dtype
    dtype: str                    # as registered ("auto": the kernel's pick)
    loaded_dtype: str = ""        # what the kernel loaded it in
    cold: list[float] = field(default_factory=list)       # s: 1-token generate, not loaded
    warm: list[float] = field(default_factory=list)       # s: the same, loaded (median of calls)
    kernel_load: list[float] = field(default_factory=list)  # s: the kernel's load_seconds
    unload: list[float] = field(default_factory=list)     # s: model_unload
    load: list[float] = field(default_factory=list)       # s: an explicit model_load
    error: str | None = None


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def first_token(k, model: str, rng: random.Random) -> float:
    """Seconds of a 1-token greedy generate on model (its only token is the first)."""
    return timed(lambda: k.generate(token_ids=prompt(rng), max_tokens=1, ignore_eos=True,
                                    model=model))


def unload(k, name: str) -> None:
    """model_unload, retried while the model is still busy with the request just answered."""
    deadline = time.monotonic() + UNLOAD_WAIT
    while True:
        try:
            return k.model_unload(name)
        except SyscallError as exc:
            if "in use" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def switch_round(k, row: SwitchRow, warm_calls: int, rng: random.Random) -> None:
    row.cold.append(first_token(k, row.name, rng))
    row.warm.append(statistics.median(first_token(k, row.name, rng) for _ in range(warm_calls)))
    info = next(m for m in k.models() if m.name == row.name)
    row.loaded_dtype = info.dtype
    row.kernel_load.append(info.load_seconds)
    row.unload.append(timed(lambda: unload(k, row.name)))
    row.load.append(timed(lambda: k.model_load(row.name)))
    unload(k, row.name)


def bench_switch(path: Path, rounds: int, warm_calls: int, threads: int) -> list[SwitchRow]:
    rows = [SwitchRow(f"{BIG}-{SHORT[d]}", d) for d in SWITCH_DTYPES]
    rng = random.Random(1)
    with kernel("--model", "tiny", "--memory", "6G", "--kv-memory", "128M", threads=threads,
                label="switch kernel") as (home, _):
        k = connect(home)
        try:
            for row in rows:
                # keep_alive -1 here, not the kernel's --keep-alive -1: the table takes that
                # default as -1 s and unloads a model the moment it is idle.
                k.model_add(row.name, str(path), dtype=None if row.dtype == "auto" else row.dtype,
                            keep_alive=-1)
            for rnd in range(rounds):
                for row in rotated(rows, rnd):
                    if row.error:
                        continue
                    try:
                        switch_round(k, row, warm_calls, rng)
                    except SyscallError as exc:
                        row.error = one_line(exc)
                        warn(f"switch {row.name}: {row.error}")
                        continue
                    log.print(f"  switch round {rnd + 1}/{rounds}  {row.name:<15} cold "
                              f"{row.cold[-1]:6.2f} s  warm {row.warm[-1]:6.3f} s  "
                              f"model_load {row.load[-1]:6.2f} s  unload {row.unload[-1]:.3f} s")
        finally:
            k.close()
    return rows


def switch_table(rows: list[SwitchRow], rounds: int) -> Report:
    report = md_table(f"Switching: a 1-token generate (16-token prompt) on the {BIG} model "
                      f"through a kernel booted on tiny; median of {rounds}",
                      ["model (as loaded)", "cold first token s", "spread", "warm first token s",
                       "cold / warm", "kernel's load s", "model_load s", "model_unload s"])
    for r in rows:
        name = f"{r.name} ({r.loaded_dtype})" if r.loaded_dtype else r.name
        if r.error or not r.cold:
            report.table.add_row(name, f"failed: {r.error}")
            continue
        cold, warm = median(r.cold), median(r.warm)
        report.table.add_row(name, f"{cold:.2f}", spread(r.cold), f"{warm:.3f}",
                             f"{cold / warm:.1f}x", f"{median(r.kernel_load):.2f}",
                             f"{median(r.load):.2f}", f"{median(r.unload):.3f}")
    return report


# ---- two: two models served at once against each alone ------------------------------------

@dataclass
class TwoResult:
    clients: int
    window: float
    rates: dict[str, dict[str, list[float]]]     # config -> model -> tok/s per round
    errors: list[str] = field(default_factory=list)


def serve(conns: dict[str, list], models: dict[str, str], window: float, warmup: float,
          seed: int) -> tuple[dict[str, float], list[str]]:
    """Every connection of conns (model -> connections) streams generates of its model
    back to back; ({model: tok/s received in the window}, errors)."""
    begin = time.monotonic() + warmup
    end = begin + window
    counts = {m: [0] * len(cs) for m, cs in conns.items()}
    errors: list[str] = []

    def client(m: str, i: int, k) -> None:
        rng = random.Random(seed * 1000 + 100 * list(models).index(m) + i)
        try:
            while time.monotonic() < end:
                with k.generate(token_ids=prompt(rng), max_tokens=TWO_NEW_TOKENS,
                                ignore_eos=True, model=models[m], stream=True) as stream:
                    for delta in stream:
                        now = time.monotonic()
                        if now >= end:
                            break
                        if now >= begin:
                            counts[m][i] += len(delta.token_ids)
        except Exception as exc:     # noqa: BLE001 — a failed client is counted, not a crash
            errors.append(f"{m} client {i}: {one_line(exc)}")

    threads = [threading.Thread(target=client, args=(m, i, k), daemon=True)
               for m, cs in conns.items() for i, k in enumerate(cs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=max(1.0, end - time.monotonic()) + 60)
    return {m: sum(c) / window for m, c in counts.items()}, errors


def bench_two(small: Path, rounds: int, clients: int, window: float, warmup: float,
              threads: int) -> TwoResult:
    models = {"tiny": "tiny", SMALL: str(small)}
    configs = [(f"{m} alone", [m]) for m in models] + [("together", list(models))]
    res = TwoResult(clients, window, {c: {m: [] for m in active} for c, active in configs})
    with kernel("--model", "tiny", "--model", str(small), "--memory", "4G", "--kv-memory",
                "64M", threads=threads, label="two-model kernel") as (home, _):
        conns = {m: [connect(home) for _ in range(clients)] for m in models}
        try:
            for rnd in range(rounds):
                for config, active in rotated(configs, rnd):
                    rates, errors = serve({m: conns[m] for m in active}, models, window,
                                          warmup, rnd)
                    for e in errors:
                        warn(e)
                    res.errors += errors
                    for m, rate in rates.items():
                        res.rates[config][m].append(rate)
                    log.print(f"  two round {rnd + 1}/{rounds}  {config:<13} " + "  ".join(
                        f"{m} {rate:7.0f} tok/s" for m, rate in rates.items()))
        finally:
            close_all(c for cs in conns.values() for c in cs)
    return res


def two_table(res: TwoResult, rounds: int) -> Report:
    report = md_table(f"Two models in one kernel: {res.clients} streaming clients per model, "
                      f"{TWO_NEW_TOKENS} new tokens per request, tokens received in "
                      f"{res.window:g} s; median of {rounds}",
                      ["model", "alone tok/s", "spread", "together tok/s", "spread",
                       "together / alone"])
    together = res.rates["together"]
    shares, total = [], 0.0
    for m in together:
        alone, both = res.rates[f"{m} alone"][m], together[m]
        if not alone or not both or not median(alone):
            report.table.add_row(m, "no result")
            continue
        share = median(both) / median(alone)
        shares.append(share)
        total += median(both)
        report.table.add_row(m, f"{median(alone):.0f}", spread(alone), f"{median(both):.0f}",
                             spread(both), f"{share:.2f}")
    if len(shares) == len(together):
        report.table.add_row("both (aggregate)", "", "", f"{total:.0f}", "",
                             f"sum of shares {sum(shares):.2f}")
    return report


# ---- dtypes: int8 against bf16 and fp32, in-process ---------------------------------------

@dataclass
class DtypeRow:
    label: str
    dtype: str
    quantize: str | None
    new_tokens: int
    tok_s: list[float] = field(default_factory=list)
    weight_bytes: int = 0
    load_s: float = 0.0
    outputs: list[list[int]] | None = None     # the first round's new tokens
    error: str | None = None


def open_dtype(path: Path, row: DtypeRow, fp32_bytes: int | None):
    """The engine of row, or None with row.error saying why."""
    options = {"quantize": row.quantize} if row.quantize else {}
    try:
        start = time.perf_counter()
        engine = Engine.from_pretrained(str(path), dtype=row.dtype, kv_memory="64M",
                                        enable_prefix_caching=False, **options)
        row.load_s = time.perf_counter() - start
    except Exception as exc:       # noqa: BLE001 — one dtype's failure is a table row
        row.error = one_line(exc)
        warn(f"{row.label}: {row.error}")
        return None
    row.weight_bytes = engine.model.weight_bytes
    if row.quantize and fp32_bytes and row.weight_bytes > INT8_MAX_SHARE * fp32_bytes:
        row.error = (f"unavailable: quantize={row.quantize!r} loads, but the weights are not "
                     f"quantized ({row.weight_bytes / 2**20:.0f} MiB, fp32's "
                     f"{fp32_bytes / 2**20:.0f} MiB)")
        warn(f"{row.label}: {row.error}")
        return None
    log.print(f"  dtypes: loaded {row.label} in {row.load_s:.2f} s, "
              f"{row.weight_bytes / 2**20:.0f} MiB of weights")
    return engine


def decode_rate(engine, prompts, new_tokens: int) -> tuple[float, list[list[int]]]:
    """(decode tok/s, new tokens of each prompt) of one batched run: the steps after every
    prompt has its first new token (so its prefill is done) are timed, and the tokens
    they make counted."""
    reqs = [engine.add_request(p, max_tokens=new_tokens + 1, ignore_eos=True) for p in prompts]
    firsts, done = set(), {}
    start, counted = None, 0
    while len(done) < len(reqs) and engine.has_work():
        deltas = engine.step()
        if start is not None:
            counted += sum(len(d.token_ids) for d in deltas)
        firsts.update(d.request_id for d in deltas if d.token_ids)
        done.update((d.request_id, d.completion) for d in deltas if d.finished)
        if start is None and len(firsts) == len(reqs):
            start = time.perf_counter()
    seconds = time.perf_counter() - start
    return counted / seconds, [list(done[r.id].token_ids) for r in reqs]


def bench_dtypes(path: Path, rounds: int, requests: int, new_tokens: int) -> list[DtypeRow]:
    native, why = bf16_support()
    emulated = max(2, new_tokens // 2)
    if not native:
        log.print(f"  dtypes: bf16 decodes {emulated} tokens, not {new_tokens}: {why}")
    rows = [DtypeRow(label, dtype, quant, emulated if dtype == "bfloat16" and not native
                     else new_tokens) for label, dtype, quant in DTYPE_ROWS]
    rng = random.Random(2)
    prompts = [prompt(rng) for _ in range(requests)]
    engines = []
    for row in rows:                  # rows[0], fp32, first: int8 is checked against it
        engine = open_dtype(path, row, rows[0].weight_bytes or None)
        if engine is not None:
            engine.generate(prompts, max_tokens=2, ignore_eos=True)      # warm-up
            engines.append((row, engine))
    for rnd in range(rounds):
        for row, engine in rotated(engines, rnd) if engines else []:
            if row.error:
                continue
            try:
                rate, outs = decode_rate(engine, prompts, row.new_tokens)
            except Exception as exc:   # noqa: BLE001 — one dtype's failure is a table row
                row.error = one_line(exc)
                warn(f"{row.label}: {row.error}")
                continue
            row.tok_s.append(rate)
            row.outputs = row.outputs or outs
            log.print(f"  dtypes round {rnd + 1}/{rounds}  {row.label:<5} {rate:7.1f} tok/s")
    return rows


def agreement(row: DtypeRow, ref: DtypeRow) -> tuple[str, str]:
    """(share of requests whose first new token equals ref's, share whose new tokens
    equal ref's over the shorter length)."""
    if row.outputs is None or ref.outputs is None:
        return "-", "-"
    pairs = list(zip(row.outputs, ref.outputs))
    first = sum(a[:1] == b[:1] for a, b in pairs)
    whole = sum(a[:len(b)] == b[:len(a)] for a, b in pairs)
    return f"{100 * first / len(pairs):.0f}%", f"{100 * whole / len(pairs):.0f}%"


def dtypes_table(rows: list[DtypeRow], rounds: int, requests: int) -> Report:
    report = md_table(f"Dtypes: in-process decode of the {BIG} model, {requests} requests x "
                      f"{PROMPT_LEN}-token prompts; median of {rounds}",
                      ["weights", "decoded / request", "decode tok/s", "spread",
                       "tok/s vs fp32", "weights MiB", "bytes vs fp32", "load s",
                       "first token = fp32", "all tokens = fp32"])
    ref = rows[0]
    base_rate, base_bytes = median(ref.tok_s), ref.weight_bytes
    for r in rows:
        if r.error or not r.tok_s:
            report.table.add_row(r.label, "", r.error or "no result")
            continue
        rate = median(r.tok_s)
        report.table.add_row(r.label, str(r.new_tokens), f"{rate:.1f}", spread(r.tok_s),
                             f"{rate / base_rate:.2f}x" if base_rate else "-",
                             f"{r.weight_bytes / 2**20:.0f}",
                             f"{r.weight_bytes / base_bytes:.2f}x" if base_bytes else "-",
                             f"{r.load_s:.2f}", *agreement(r, ref))
    return report


# ---- main ---------------------------------------------------------------------------------

def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sections", default=",".join(SECTIONS))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="OpenMP threads of every engine")
    ap.add_argument("--clients", type=int, default=8, help="two: streaming clients per model")
    ap.add_argument("--window", type=float, default=10.0, help="two: seconds counted per run")
    ap.add_argument("--warmup", type=float, default=2.0, help="two: seconds before the window")
    ap.add_argument("--warm-calls", type=int, default=3, help="switch: warm calls per round")
    ap.add_argument("--requests", type=int, default=8, help="dtypes: requests per batch")
    ap.add_argument("--new-tokens", type=int, default=32, help="dtypes: decode tokens each")
    ap.add_argument("--quick", action="store_true",
                    help="a smoke run: 1 round, 4 clients, 3 s windows, 16 new tokens")
    ap.add_argument("--cache", type=Path,
                    default=Path(tempfile.gettempdir()) / "llmos-bench-models",
                    help="where the checkpoints are made once and kept")
    ap.add_argument("--json", type=Path, help="write every round's figures here")
    args = ap.parse_args()
    args.sections = args.sections.split(",")
    if unknown := set(args.sections) - set(SECTIONS):
        ap.error(f"unknown sections {sorted(unknown)}; known: {', '.join(SECTIONS)}")
    if args.quick:
        args.rounds, args.clients, args.window, args.warmup = 1, 4, 3.0, 1.0
        args.warm_calls, args.new_tokens = 2, 16
    return args


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    started = time.monotonic()
    log.print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
              f"{args.threads} thread(s) per engine, torch {torch.__version__}; {load_line()}")
    big = checkpoint(BIG, args.cache)
    small = checkpoint(SMALL, args.cache) if "two" in args.sections else None
    reports, results = [], {"threads": args.threads, "rounds": args.rounds, "checkpoint": str(big)}
    if "load" in args.sections:
        log.print("[bold]load[/bold]")
        rows = bench_load(big, args.rounds, args.threads)
        results["load"] = [asdict(r) for r in rows]
        reports.append(load_table(rows, args.rounds))
    if "switch" in args.sections:
        log.print("[bold]switch[/bold]")
        rows = bench_switch(big, args.rounds, args.warm_calls, args.threads)
        results["switch"] = [asdict(r) for r in rows]
        reports.append(switch_table(rows, args.rounds))
    if "two" in args.sections:
        log.print("[bold]two[/bold]")
        two = bench_two(small, args.rounds, args.clients, args.window, args.warmup, args.threads)
        results["two"] = asdict(two)
        reports.append(two_table(two, args.rounds))
    if "dtypes" in args.sections:
        log.print("[bold]dtypes[/bold]")
        rows = bench_dtypes(big, args.rounds, args.requests, args.new_tokens)
        results["dtypes"] = [asdict(r) for r in rows]
        reports.append(dtypes_table(rows, args.rounds, args.requests))
    log.print(f"done in {time.monotonic() - started:.0f} s; after the run: {load_line()}")
    for report in reports:
        report.print()
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
