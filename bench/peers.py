"""llmos against other inference engines on this machine's CPU, interleaved in one run.

    .venv/bin/python bench/peers.py [--workloads tiny,llama4,llama100m,single,prefill]
        [--rounds 3] [--peers transformers,ct2,llamacpp,vllm] [--bf16 auto|force|skip]
        [--threads N] [--json FILE]

Engines: llmos and Hugging Face transformers in this process (static left-padded batch
`generate`), and CTranslate2, llama.cpp (llama-cpp-python) and vLLM's CPU build each in
its own virtual environment under bench/.peers/ (`make peers`), driven line by line
through bench/peer_runners/ (protocol.py). A peer that is not installed, or cannot take a
model or dtype, gets a note under the table with its reason instead of a number.

Every engine gets the same prompts as token ids, decodes greedily and exactly the asked
new tokens (EOS ignored); prefix caching is off where an engine has it, since every round
repeats the prompts. Per workload: a warm-up run per engine (all prompts, 2 new tokens),
then `rounds` rounds, each running every engine once in a rotated order, so that a slow
spell of the machine falls on all engines alike. The table gives the MEDIAN of the rounds,
and their spread: (slowest - fastest) / median.
Agreement is the share of requests whose new tokens equal llmos float32's (and
transformers float32's), from the first timed round.

The roofline columns set each run against peaks measured in the same run (at its start
and end, the better of the two): the GEMM rate (the better of oneDNN's packed linear and
F.linear on a 2048^3 matmul, smaller where a dtype is emulated) and the memory bandwidth
(the better of a 1 GiB copy and sum). FLOPs count the linear layers only (attention is a
few percent here): 2 x layer params per token processed, plus the LM head once per new
token. Bytes count the weights once per decode step. Single: the time per output token
is (time of 65 new tokens - time of 1) / 64, so the prompt's prefill is not in it; its
floor is the weight bytes over the measured bandwidth.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.markup import escape
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench" / "peer_runners"))
from bench.benchkit import goal, load_line  # noqa: E402
from llmos.kernel import Engine  # noqa: E402
from llmos.kernel.load import resolve_model  # noqa: E402
from protocol import LoadRequest, Peer, PeerError  # noqa: E402

console = Console(width=130)
PEERS_DIR = ROOT / "bench" / ".peers"          # one venv per peer, made by `make peers`
RUNNERS = ROOT / "bench" / "peer_runners"
PEERS = {"ct2": ("ctranslate2", "ct2_runner.py"), "llamacpp": ("llama.cpp", "llamacpp_runner.py"),
         "vllm": ("vllm", "vllm_runner.py")}
SHORT = {"float32": "fp32", "bfloat16": "bf16"}
GOAL_TPOT_OVER_FLOOR = 1.2      # llmos's time per token within this of the bandwidth floor
GOAL_PREFILL_SHARE = 0.70       # llmos's prefill at this share of the GEMM peak or more


@dataclass(frozen=True)
class Workload:
    key: str
    model: str                  # a key of MODELS
    requests: int
    prompt_len: int | None      # None: random lengths 8-32, as bench/engine_throughput.py
    new_tokens: int
    kind: str                   # "batch" (tok/s), "tpot" (s per token) or "prefill"


# (layers, hidden, heads) of a random Llama, vocab 32k, MLP 4 x hidden; None: embedded tiny
MODELS = {"tiny": None, "llama4": (4, 256, 8), "llama100m": (12, 768, 12)}
WORKLOADS = [
    Workload("tiny", "tiny", 32, None, 64, "batch"),
    Workload("llama4", "llama4", 32, None, 64, "batch"),
    Workload("llama100m", "llama100m", 16, 128, 64, "batch"),
    Workload("single", "llama100m", 1, 128, 64, "tpot"),
    Workload("prefill", "llama100m", 16, 128, 1, "prefill"),
]


@dataclass
class Cell:
    """One engine (label, dtype) on one workload: seconds per round, or why none."""
    label: str
    dtype: str
    info: str = ""
    seconds: list[float] = field(default_factory=list)   # tpot: seconds per output token
    outputs: list[list[int]] | None = None               # first timed round's new tokens
    error: str | None = None

    @property
    def median(self) -> float | None:
        return statistics.median(self.seconds) if self.seconds and not self.error else None


# ---- engines: run(prompts, new_tokens) -> (seconds, new token ids per prompt) ------------

class LlmosRunner:
    def __init__(self, path: Path, dtype: str):
        self.engine = Engine.from_pretrained(str(path), dtype=dtype, kv_memory="1G",
                                             enable_prefix_caching=False)
        self.info = f"llmos, {dtype}"

    def run(self, prompts, new_tokens):
        start = time.perf_counter()
        outs = self.engine.generate(prompts, max_tokens=new_tokens, ignore_eos=True)
        return time.perf_counter() - start, [list(c.token_ids) for c in outs]

    def close(self):
        self.engine = None


class HfRunner:
    """transformers `generate` on one static batch, left padded (one prompt: no padding)."""

    def __init__(self, path: Path, dtype: str):
        from transformers import AutoModelForCausalLM, __version__
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).eval()
        self.model.generation_config.eos_token_id = None    # decode exactly new_tokens
        self.info = f"transformers {__version__}, {dtype}"

    def run(self, prompts, new_tokens):
        width = max(map(len, prompts))
        ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        start = time.perf_counter()
        with torch.inference_mode():
            out = self.model.generate(ids, attention_mask=mask, do_sample=False,
                                      max_new_tokens=new_tokens, pad_token_id=0)
        return time.perf_counter() - start, out[:, width:].tolist()

    def close(self):
        self.model = None


class PeerRunner:
    def __init__(self, name: str, path: Path, dtype: str, work: Path, threads: int,
                 max_seqs: int, max_len: int, model_key: str):
        python = PEERS_DIR / name / "bin" / "python"
        if not python.exists():
            raise PeerError(f"not installed ({python.relative_to(ROOT)}): run `make peers`")
        logs = PEERS_DIR / "logs"
        logs.mkdir(exist_ok=True)
        log = logs / f"{name}-{model_key}-{SHORT[dtype]}.log"
        log.write_text("")
        work.mkdir(parents=True, exist_ok=True)
        env = {"OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1",
               "TOKENIZERS_PARALLELISM": "false"}
        self.peer = Peer(python, RUNNERS / PEERS[name][1], log, env)
        try:
            self.info = self.peer.load(LoadRequest(str(path), str(work), dtype, threads,
                                                   max_seqs, max_len))
        except PeerError:
            self.peer.close()
            raise

    def run(self, prompts, new_tokens):
        return self.peer.run(prompts, new_tokens)

    def close(self):
        self.peer.close()


def open_engines(model_key: str, path: Path, dtypes: list[str], peers: list[str],
                 wls: list[Workload], tmp: Path, threads: int) -> list[tuple[Cell, object]]:
    """(cell template, runner or None) for every engine and dtype; a runner that cannot
    load leaves its reason in the cell."""
    max_seqs = max(w.requests for w in wls)
    max_len = max((w.prompt_len or 32) + w.new_tokens + 1 for w in wls)
    out = []
    for dtype in dtypes:
        makers = [("llmos", lambda: LlmosRunner(path, dtype))]
        if "transformers" in peers:
            makers.append(("transformers", lambda: HfRunner(path, dtype)))
        for name in (p for p in PEERS if p in peers):
            makers.append((PEERS[name][0], lambda n=name: PeerRunner(
                n, path, dtype, tmp / n / model_key, threads, max_seqs, max_len, model_key)))
        for label, make in makers:
            cell, start = Cell(label, dtype), time.perf_counter()
            try:
                runner = make()
                cell.info = runner.info
                console.print(f"{model_key}: loaded {cell.info} in {time.perf_counter() - start:.0f} s")
            except Exception as exc:     # noqa: BLE001 — one engine's failure is a table cell
                runner, cell.error = None, _one_line(exc)
                console.print(f"  [yellow]{label} {SHORT[dtype]}: {escape(cell.error)}[/yellow]")
            out.append((cell, runner))
    return out


def _one_line(exc: BaseException) -> str:
    return (f"{exc}" if isinstance(exc, PeerError) else f"{type(exc).__name__}: {exc}").splitlines()[0][:160]


# ---- measuring ----------------------------------------------------------------------------

def make_prompts(wl: Workload, vocab: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    lens = [wl.prompt_len or rng.randrange(8, 33) for _ in range(wl.requests)]
    return [[rng.randrange(10, vocab) for _ in range(n)] for n in lens]


def run_once(wl: Workload, runner, prompts) -> tuple[float, list[list[int]]]:
    """Seconds of one run (tpot: seconds per output token, the 1-token run subtracted so
    that the prompt's prefill is not counted) and the new tokens."""
    if wl.kind != "tpot":
        seconds, outs = runner.run(prompts, wl.new_tokens)
    else:
        first, _ = runner.run(prompts, 1)
        total, outs = runner.run(prompts, wl.new_tokens + 1)
        seconds, outs = (total - first) / wl.new_tokens, [o[:wl.new_tokens] for o in outs]
    if [len(o) for o in outs] != [wl.new_tokens] * len(prompts):
        raise RuntimeError(f"returned {sorted({len(o) for o in outs})} new tokens, not {wl.new_tokens}")
    return seconds, outs


def measure(wl: Workload, engines: list[tuple[Cell, object]], prompts, rounds: int) -> list[Cell]:
    """Warm every engine up, then `rounds` rounds of every engine once, order rotated."""
    cells = [Cell(c.label, c.dtype, c.info, error=c.error) for c, _ in engines]
    live = [(cell, r) for cell, (_, r) in zip(cells, engines) if r is not None]
    for cell, runner in live:
        _guard(cell, lambda: runner.run(prompts, min(2, wl.new_tokens)))
    for rnd in range(rounds):
        k = rnd % max(1, len(live))
        for cell, runner in live[k:] + live[:k]:
            if cell.error:
                continue
            res = _guard(cell, lambda: run_once(wl, runner, prompts))
            if res is None:
                continue
            cell.seconds.append(res[0])
            cell.outputs = cell.outputs or res[1]
            console.print(f"  {wl.key:<9} round {rnd + 1}/{rounds}  {cell.label} "
                          f"{SHORT[cell.dtype]:<4} {_fmt_run(wl, res[0])}")
    return cells


def _guard(cell: Cell, fn):
    try:
        return fn()
    except Exception as exc:         # noqa: BLE001 — a failed run is a table cell, not a crash
        cell.error = _one_line(exc)
        console.print(f"  [yellow]{cell.label} {SHORT[cell.dtype]}: {escape(cell.error)}[/yellow]")
        return None


def _fmt_run(wl: Workload, seconds: float) -> str:
    if wl.kind == "tpot":
        return f"{1000 * seconds:8.2f} ms/token"
    return f"{seconds:8.2f} s  {tokens(wl) / seconds:8.0f} {unit(wl)}"


def tokens(wl: Workload) -> int:
    """What a run's rate counts: new tokens, or prompt tokens for prefill."""
    return wl.requests * (wl.prompt_len if wl.kind == "prefill" else wl.new_tokens)


def unit(wl: Workload) -> str:
    return {"batch": "tok/s", "prefill": "prompt tok/s", "tpot": "ms/token"}[wl.kind]


# ---- model sizes, peaks, roofline ---------------------------------------------------------

def linear_params(config: dict) -> tuple[int, int]:
    """(parameters of the layers' linear weights, of the LM head)."""
    d, ff, L = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    hd = config.get("head_dim") or d // config["num_attention_heads"]
    q = config["num_attention_heads"] * hd
    kv = config["num_key_value_heads"] * hd
    return L * (d * q + 2 * d * kv + q * d + 3 * d * ff), d * config["vocab_size"]


@dataclass
class Peaks:
    """What this machine reached in this run: GEMM FLOP/s per dtype, and memory bytes/s;
    `how` says which method gave each."""
    gemm: dict[str, float]
    bandwidth: float
    how: dict[str, str]


def measure_peaks(dtypes: list[str], before: Peaks | None = None) -> Peaks:
    """The peaks now, or the better of now and `before` for each (other work on the box
    only ever lowers what a measurement reaches)."""
    gemm, how = {}, {}
    for dtype in dtypes:
        gemm[dtype], how[dtype] = gemm_peak(getattr(torch, dtype))
    bw, how["bandwidth"] = bandwidth()
    now = Peaks(gemm, bw, how)
    if before is None:
        return now
    pick = {d: now if now.gemm[d] >= before.gemm[d] else before for d in dtypes}
    bw_from = now if now.bandwidth >= before.bandwidth else before
    return Peaks({d: pick[d].gemm[d] for d in dtypes}, bw_from.bandwidth,
                 {**{d: pick[d].how[d] for d in dtypes}, "bandwidth": bw_from.how["bandwidth"]})


def gemm_peak(dtype: torch.dtype, largest: int = 2048) -> tuple[float, str]:
    """(FLOP/s, how) of the better of oneDNN's packed linear and F.linear on n x n x n,
    n = `largest`, or less where one product would take over 0.5 s (emulated bf16)."""
    n = 256
    while n < largest and best_of(lambda: F.linear(torch.ones(n, n, dtype=dtype),
                                                   torch.ones(n, n, dtype=dtype)), 1) < 0.0625:
        n *= 2
    x, w = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    rates = {"F.linear": 2 * n ** 3 / best_of(lambda: F.linear(x, w))}
    try:
        packed = torch.ops.mkldnn._reorder_linear_weight(w, None)
        rates["oneDNN"] = 2 * n ** 3 / best_of(
            lambda: torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], ""))
    except RuntimeError as exc:         # oneDNN refuses bf16 on a CPU without AVX-512
        rates_note = f"; oneDNN: {str(exc).splitlines()[0][:60]}"
    else:
        rates_note = ""
    return max(rates.values()), f"n={n}: " + ", ".join(
        f"{k} {v / 1e9:.1f}" for k, v in rates.items()) + rates_note


def bandwidth(gib: float = 1.0) -> tuple[float, str]:
    """(bytes/s, how) of the better of a copy (read + write) and a sum of gib GiB."""
    a = torch.ones(int(gib * 2 ** 30) // 4)
    b = torch.empty_like(a)
    rates = {"copy": 2 * a.nbytes / best_of(lambda: b.copy_(a)),
             "sum": a.nbytes / best_of(lambda: a.sum())}
    return max(rates.values()), ", ".join(f"{k} {v / 1e9:.1f}" for k, v in rates.items())


def best_of(fn, reps: int = 5) -> float:
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


@dataclass
class Result:
    """One workload: its cells, prompts and model size (linear params of layers, head)."""
    wl: Workload
    cells: list[Cell]
    prompts: list[list[int]]
    params: tuple[int, int]

    def flops_bytes(self, dtype: str) -> tuple[float, float]:
        """(FLOPs, weight bytes read) of one run; for tpot, of one output token."""
        layers, head = self.params
        weights = (layers + head) * (4 if dtype == "float32" else 2)
        if self.wl.kind == "tpot":
            return 2.0 * (layers + head), float(weights)
        processed = sum(map(len, self.prompts)) + self.wl.requests * (self.wl.new_tokens - 1)
        return (2.0 * layers * processed + 2.0 * head * self.wl.requests * self.wl.new_tokens,
                float(weights * self.wl.new_tokens))

    def cell(self, label: str, dtype: str = "float32") -> Cell | None:
        return next((c for c in self.cells if c.label == label and c.dtype == dtype), None)

    def rate(self, c: Cell) -> float | None:
        """Higher is better: tok/s, prompt tok/s, or tokens/s of the one request."""
        if c is None or c.median is None:
            return None
        return tokens(self.wl) / c.median if self.wl.kind != "tpot" else 1 / c.median

    def figure(self, c: Cell) -> str:
        return f"{1000 * c.median:.2f} ms" if self.wl.kind == "tpot" else f"{self.rate(c):.0f}"


# ---- report -------------------------------------------------------------------------------

def agreement(cell: Cell, ref: Cell | None) -> str:
    if cell.outputs is None or ref is None or ref.outputs is None:
        return "-"
    same = sum(a == b for a, b in zip(cell.outputs, ref.outputs))
    return f"{100 * same / len(ref.outputs):.0f}%"


def results_table(results: list[Result], peaks: Peaks, rounds: int) -> tuple[Table, list[str]]:
    """The table, and the notes its cells point to (why an engine has no figure)."""
    notes: list[str] = []
    table = Table(title=f"Median of {rounds} interleaved rounds; tok/s (single: ms per output "
                        "token); roofline: share of this run's GEMM peak and bandwidth")
    for col in ("workload", "engine", "tok/s", "spread", "llmos fp32 / this", "same as llmos",
                "same as HF", "GFLOP/s (of peak)", "GB/s (of bw)"):
        table.add_column(col, justify="right", no_wrap=col in ("workload", "engine"))
    for res in results:
        ref_llmos, ref_hf = res.cell("llmos"), res.cell("transformers")
        base = res.rate(ref_llmos)
        for c in res.cells:
            name = f"{c.label} {SHORT[c.dtype]}"
            if c.median is None:
                notes.append(f"({len(notes) + 1}) {res.wl.key}, {name}: {c.error or 'no result'}")
                table.add_row(res.wl.key, name, f"[yellow]note {len(notes)}[/yellow]")
                continue
            flops, nbytes = res.flops_bytes(c.dtype)
            gflops, gbs = flops / c.median / 1e9, nbytes / c.median / 1e9
            peak = peaks.gemm.get(c.dtype)
            spread = (max(c.seconds) - min(c.seconds)) / c.median
            table.add_row(
                res.wl.key, name, res.figure(c), f"{100 * spread:.0f}%",
                f"{base / res.rate(c):.2f}x" if base else "-",
                agreement(c, ref_llmos), agreement(c, ref_hf),
                f"{gflops:.1f}" + (f" ({100 * gflops * 1e9 / peak:.0f}%)" if peak else ""),
                f"{gbs:.1f} ({100 * gbs * 1e9 / peaks.bandwidth:.0f}%)")
        table.add_section()
    return table, notes


def goals_table(results: list[Result], dtypes: list[str], peaks: Peaks) -> Table:
    table = Table(title=f"Goals: llmos / best peer >= 1.0; single: tpot <= "
                        f"{GOAL_TPOT_OVER_FLOOR}x the bandwidth floor; prefill >= "
                        f"{100 * GOAL_PREFILL_SHARE:.0f}% of the GEMM peak")
    for col in ("workload", "dtype", "llmos", "best peer", "llmos / best", "goal"):
        table.add_column(col, justify="right")
    for res in results:
        for dtype in dtypes:
            mine = res.cell("llmos", dtype)
            if mine is None or mine.median is None:
                continue
            peers = [c for c in res.cells if c.label != "llmos" and c.dtype == dtype and c.median]
            best = max(peers, key=res.rate, default=None)
            ratio = res.rate(mine) / res.rate(best) if best else None
            table.add_row(res.wl.key, SHORT[dtype], res.figure(mine),
                          f"{best.label} {res.figure(best)}" if best else "none ran",
                          f"{ratio:.2f}" if ratio else "-", goal(None if ratio is None else ratio >= 1))
            if res.wl.kind == "tpot":
                floor = res.flops_bytes(dtype)[1] / peaks.bandwidth
                table.add_row("", "", "tpot / floor", f"floor {1000 * floor:.2f} ms",
                              f"{mine.median / floor:.2f}",
                              goal(mine.median / floor <= GOAL_TPOT_OVER_FLOOR))
            if res.wl.kind == "prefill" and dtype in peaks.gemm:
                share = res.flops_bytes(dtype)[0] / mine.median / peaks.gemm[dtype]
                table.add_row("", "", "of GEMM peak", f"peak {peaks.gemm[dtype] / 1e9:.1f} GFLOP/s",
                              f"{100 * share:.0f}%", goal(share >= GOAL_PREFILL_SHARE))
    return table


# ---- main ---------------------------------------------------------------------------------

def checkpoint(model_key: str, tmp: Path) -> Path:
    if MODELS[model_key] is None:
        return resolve_model("tiny")
    from tests.checkpoints import make_checkpoint
    layers, hidden, heads = MODELS[model_key]
    return make_checkpoint("llama", tmp / model_key, vocab_size=32000, hidden_size=hidden,
                           intermediate_size=4 * hidden, num_hidden_layers=layers,
                           num_attention_heads=heads, num_key_value_heads=heads,
                           max_position_embeddings=2048, rope_scaling=None)


def pick_dtypes(mode: str) -> list[str]:
    from llmos.drivers.cpu import bf16_support
    ok, why = bf16_support()
    if mode == "force" or (mode == "auto" and ok):
        return ["float32", "bfloat16"]
    if mode == "auto":
        console.print(f"bf16 rows skipped: {why}, so they would time the emulation rather than "
                      "the engines (--bf16 force runs them anyway, slowly)")
    return ["float32"]


def run_model(model_key: str, wls: list[Workload], args, dtypes, tmp: Path) -> list[Result]:
    path = checkpoint(model_key, tmp)
    config = json.loads((path / "config.json").read_text())
    engines = open_engines(model_key, path, dtypes, args.peers, wls, tmp, args.threads)
    try:
        out = []
        for wl in wls:
            prompts = make_prompts(wl, config["vocab_size"])
            cells = measure(wl, engines, prompts, args.rounds)
            out.append(Result(wl, cells, prompts, linear_params(config)))
        return out
    finally:
        for _, runner in engines:
            if runner is not None:
                runner.close()


def show_peaks(when: str, peaks: Peaks) -> Peaks:
    for dtype, rate in peaks.gemm.items():
        console.print(f"GEMM peak {SHORT[dtype]} ({when}): {rate / 1e9:.1f} GFLOP/s ({peaks.how[dtype]})")
    console.print(f"memory bandwidth ({when}): {peaks.bandwidth / 1e9:.1f} GB/s "
                  f"({peaks.how['bandwidth']})")
    return peaks


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workloads", default=",".join(w.key for w in WORKLOADS))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--peers", default="transformers," + ",".join(PEERS))
    ap.add_argument("--bf16", choices=("auto", "force", "skip"), default="auto")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--json", type=Path, help="write every round's figures here")
    args = ap.parse_args()
    args.peers = args.peers.split(",")
    if unknown := set(args.peers) - {"transformers", *PEERS}:
        ap.error(f"unknown peers {sorted(unknown)}; known: transformers, {', '.join(PEERS)}")
    if unknown := set(args.workloads.split(",")) - {w.key for w in WORKLOADS}:
        ap.error(f"unknown workloads {sorted(unknown)}; known: {', '.join(w.key for w in WORKLOADS)}")
    chosen = [w for w in WORKLOADS if w.key in args.workloads.split(",")]
    torch.set_num_threads(args.threads)
    console.print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                  f"{args.threads} threads per engine, torch {torch.__version__}; {load_line()}")
    if os.getloadavg()[0] > 0.5 * os.cpu_count():
        console.print("[yellow]other work is running: threads that wait on each other at every op "
                      "suffer most from it, so figures will be noisy (--threads 1 is steadier)[/yellow]")
    dtypes = pick_dtypes(args.bf16)
    peaks = show_peaks("at the start", measure_peaks(dtypes))
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for model_key in dict.fromkeys(w.model for w in chosen):
            results += run_model(model_key, [w for w in chosen if w.model == model_key],
                                 args, dtypes, Path(tmp))
    peaks = show_peaks("best of start and end", measure_peaks(dtypes, peaks))
    table, notes = results_table(results, peaks, args.rounds)
    console.print(table)
    for note in notes:
        console.print(note, markup=False)
    console.print(goals_table(results, dtypes, peaks))
    console.print(f"after the run: {load_line()}")
    if args.json:
        args.json.write_text(json.dumps({"peaks": asdict(peaks), "threads": args.threads,
                                         "rounds": args.rounds,
                                         "results": [asdict(r) for r in results]}, indent=1))


if __name__ == "__main__":
    main()
