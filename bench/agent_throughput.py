"""32 agent processes generating through the kernel against the in-process engine.

    .venv/bin/python bench/agent_throughput.py [--agents 32] [--new-tokens 64]

Both runs serve the same work: one request per agent, the same random prompts of the
embedded model, exactly --new-tokens each. The kernel run boots a real kernel and spawns
real agent processes; they connect, then wait at a barrier (a FIFO) so that process
start-up is not counted, and each reports when its generate call started and ended.
Tokens/s of the kernel run is all tokens over (last end - first start).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import select
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from llmos.kernel import Engine  # noqa: E402
from llmos.syscalls.home import Home  # noqa: E402
from llmos.userland import connect  # noqa: E402

console = Console(width=110)
AGENT = textwrap.dedent("""
    import json, os, sys, time
    from llmos.userland import connect
    k = connect()
    print("ready", flush=True)
    fd = os.open(sys.argv[1], os.O_RDONLY)
    os.read(fd, 1)                                     # the barrier
    start = time.time()
    done = k.generate(token_ids=json.loads(sys.argv[2]), max_tokens=int(sys.argv[3]),
                      ignore_eos=True)
    print(json.dumps({"start": start, "end": time.time(), "n": len(done.token_ids)}), flush=True)
""")


def prompts(n: int, vocab: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(10, vocab) for _ in range(rng.randrange(8, 33))] for _ in range(n)]


def in_process(work: list[list[int]], new_tokens: int) -> float:
    engine = Engine.from_pretrained("tiny", kv_memory="256M")
    engine.generate(work[:2], max_tokens=4, ignore_eos=True)          # warm-up
    start = time.perf_counter()
    engine.generate(work, max_tokens=new_tokens, ignore_eos=True)
    return len(work) * new_tokens / (time.perf_counter() - start)


def through_kernel(work: list[list[int]], new_tokens: int) -> float:
    tmp = Path(tempfile.mkdtemp(prefix="llmos-bench-"))
    home = Home(tmp / "home")
    kernel = subprocess.Popen([sys.executable, "-m", "llmos.kernel", "--home",
                               str(home.path), "--kv-memory", "256M"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        ready, _, _ = select.select([kernel.stdout], [], [], 120)
        if not ready or "listening" not in kernel.stdout.readline():
            raise SystemExit("the kernel did not boot")
        fifo = tmp / "barrier"
        os.mkfifo(fifo)
        with connect(home.path, timeout=300) as k:
            k.generate(token_ids=work[0], max_tokens=4, ignore_eos=True)    # warm-up
            pids = [k.spawn([sys.executable, "-c", AGENT, str(fifo), json.dumps(p),
                             str(new_tokens)], name=f"agent{i}") for i, p in enumerate(work)]
            deadline = time.monotonic() + 300
            while not all(_log(k, p).startswith("ready") for p in pids):
                if time.monotonic() > deadline:
                    raise SystemExit("agents did not connect")
                time.sleep(0.05)
            fd = os.open(fifo, os.O_WRONLY)
            os.write(fd, b"x" * len(pids))
            os.close(fd)
            statuses = [k.wait(p, timeout=300) for p in pids]
            if any(statuses):
                raise SystemExit(f"agents failed: {statuses}")
            spans = [json.loads(_log(k, p).splitlines()[-1]) for p in pids]
            info = k.sysinfo()
            console.print(f"  kernel engine: {info.steps} steps, {info.computed_tokens} tokens "
                          f"computed, {info.generated_tokens} generated")
    finally:
        kernel.terminate()
        kernel.wait(60)
    assert all(s["n"] == new_tokens for s in spans)
    wall = max(s["end"] for s in spans) - min(s["start"] for s in spans)
    spread = max(s["start"] for s in spans) - min(s["start"] for s in spans)
    console.print(f"  agents' calls started within {spread * 1000:.0f} ms of each other; "
                  f"wall {wall * 1000:.0f} ms")
    return len(work) * new_tokens / wall


def _log(k, pid: int) -> str:
    try:
        return k.log_path(pid).read_text()
    except OSError:
        return ""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--agents", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    args = ap.parse_args()
    vocab = Engine.from_pretrained("tiny", num_blocks=1).config.vocab_size
    work = prompts(args.agents, vocab)
    console.print("in-process engine ...")
    engine_tps = in_process(work, args.new_tokens)
    console.print(f"kernel + {args.agents} agent processes ...")
    kernel_tps = through_kernel(work, args.new_tokens)
    table = Table(title=f"{args.agents} requests x {args.new_tokens} new tokens on tiny, tokens/s")
    for col in ("in-process engine", f"kernel, {args.agents} agent processes", "ratio"):
        table.add_column(col, justify="right")
    table.add_row(f"{engine_tps:.0f}", f"{kernel_tps:.0f}", f"{kernel_tps / engine_tps:.2f}x")
    console.print(table)


if __name__ == "__main__":
    main()
