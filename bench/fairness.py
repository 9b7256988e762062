"""Fairness between kernel processes under the scheduling policies: a light process beside
a flood, and two saturating processes of different nice.

    .venv/bin/python bench/fairness.py [--kv-memory 4M] [--flood 64] [--flood-tokens 128]
                                       [--light-calls 20] [--window 15] [--quick]

(a) Latency of a light process under a flood. One process (one connection, a pool of
--flood threads) keeps --flood generate calls in flight, each --flood-tokens long
(ignore_eos), resubmitting as each ends; a light process issues --light-calls short calls
(16 prompt tokens, 8 generated) one after another. Its p50 and p99 latency are measured
alone (a kernel with no flood), then under the flood for fifo, fair and las. Each policy
runs on a fresh kernel (booted with the default policy and switched with `k.sched(name)`
before any work, so the switch is exercised and no policy inherits another's counters).
Why the pool is small and the flood's KV limit lifted: the kernel seats 256 sequences per
batch, so 64 flood calls alone would all run at once and the light call would simply join
the batch under any policy. With --kv-memory 4M (128 blocks of 16 tokens on tiny) the
flood's calls (each grows to ~10 blocks) cannot all hold KV at once, so KV is what they
contend for. A process's default kv_blocks limit is 75% of the pool, which by itself
leaves the light process 32 free blocks whatever the policy; so the flood's limit is
lifted (`setrlimit(kv_blocks=None)`, by the owner) and the light call competes for KV and
seats: under fifo it waits behind the queue, under fair/las it should not. The row
"fifo:limited" keeps the flood at the default limit, to show what the limit alone does.
fifo can take long per call, so each light run stops after --budget s (calls done shown).
`step ms` is the engine's mean step time during the light run: a light call that never
waits still takes 9 steps (prefill + 8 decodes) in the flood's batch, which on a CPU is
several times slower per step than a batch of one, so `9 x step` is a floor no policy can
beat. Goal: light-under-flood p50 / alone p50 <= 2x for fair and las.

(b) Weighted sharing. Two processes each keep --pair calls in flight (same lengths as
the flood); one at nice 0, one at nice 5 (`k.nice(5)`). After both are backlogged for
--warmup s, the `service` of each (ps: prompt + generated tokens the engine computed for
it) is read over --window s. The service ratio nice0/nice5 is printed against the weight
ratio 1.25**5 = 3.05 for fair, las and priority (priority is a strict order with aging,
not a share: its ratio says how much the nice 5 process still gets). Same small pool, so
the two compete for KV, not only for batch seats.

Every kernel is stopped and its home removed. Nothing is asserted.
"""
from __future__ import annotations

import argparse
import random
import sys
import threading
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchkit import goal, kernel, load_line, percentile  # noqa: E402
from llmos.userland import SyscallError, connect  # noqa: E402

console = Console(width=140)
VOCAB = (10, 400)             # token ids drawn from here (tiny's vocabulary is 423)
WEIGHT_RATIO = 1.25 ** 5


class Flood:
    """One kernel process keeping `n` generate calls in flight until stop()."""

    def __init__(self, home, n: int, max_tokens: int, seed: int, nice: int | None = None,
                 prompt_len: int = 32, unlimited_kv: bool = False):
        self.k = connect(home, timeout=600)
        if nice is not None:
            self.k.nice(nice)
        if unlimited_kv:
            self.k.setrlimit(kv_blocks=None)
        self.pid, self.max_tokens, self.prompt_len = self.k.pid, max_tokens, prompt_len
        self.stop_flag = threading.Event()
        self.done = 0
        self.errors: dict[str, int] = {}
        self.threads = [threading.Thread(target=self._worker, args=(seed * 1000 + i,),
                                         daemon=True) for i in range(n)]
        for th in self.threads:
            th.start()

    def _worker(self, seed: int) -> None:
        rng = random.Random(seed)
        while not self.stop_flag.is_set():
            prompt = [rng.randrange(*VOCAB) for _ in range(self.prompt_len)]
            try:
                self.k.generate(token_ids=prompt, max_tokens=self.max_tokens, ignore_eos=True)
                self.done += 1
            except SyscallError as e:
                if self.stop_flag.is_set():
                    return
                self.errors[e.code] = self.errors.get(e.code, 0) + 1
                time.sleep(0.05)

    def stop(self) -> None:
        """Stop resubmitting and leave: the kernel drops the calls still in flight."""
        self.stop_flag.set()
        self.k.close()
        for th in self.threads:
            th.join(5)


def light_run(home, calls: int, budget: float, seed: int) -> list[float]:
    """Latencies (s) of up to `calls` short calls one after another, within budget s."""
    rng = random.Random(seed)
    lat = []
    with connect(home, timeout=max(budget, 30) + 60) as k:
        k.generate(token_ids=[11, 12, 13], max_tokens=1)        # its first call pays set-up
        deadline = time.monotonic() + budget
        for _ in range(calls):
            prompt = [rng.randrange(*VOCAB) for _ in range(16)]
            t = time.monotonic()
            k.generate(token_ids=prompt, max_tokens=8, ignore_eos=True)
            lat.append(time.monotonic() - t)
            if time.monotonic() > deadline:
                break
    return lat


def wait_backlogged(k, pids: set[int], want: int, timeout: float = 30) -> None:
    """Until every pid has `want` calls in flight (or timeout)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        rows = {r.pid: r for r in k.ps()}
        if all(p in rows and rows[p].calls >= want for p in pids):
            return
        time.sleep(0.1)


def part_a(args) -> dict:
    console.print("[bold](a) light process beside a flood[/bold]")
    flags = ["--kv-memory", args.kv_memory]
    res = {}
    with kernel(*flags, label="alone", threads=args.threads) as (home, _):
        with connect(home, timeout=60) as k0:
            before, t = k0.sysinfo(), time.monotonic()
            lat = light_run(home, args.light_calls, args.budget, seed=1)
            wall, after = time.monotonic() - t, k0.sysinfo()
    res["alone"] = dict(lat=lat, flood_done=0, errors={},
                        step=wall / max(1, after.steps - before.steps))
    console.print(f"  alone: {len(lat)} calls, p50 {percentile(lat, 50) * 1000:.0f} ms, "
                  f"p99 {percentile(lat, 99) * 1000:.0f} ms")
    for name in args.policies_a:
        policy, _, limited = name.partition(":")
        with kernel(*flags, label=policy, threads=args.threads) as (home, _):
            with connect(home, timeout=60) as k0:
                info = k0.sched(policy)
                if info.policy != policy:
                    console.print(f"  [red]k.sched({policy!r}) answered {info}[/red]")
                flood = Flood(home, args.flood, args.flood_tokens, seed=2,
                              unlimited_kv=not limited)
                try:
                    wait_backlogged(k0, {flood.pid}, args.flood)
                    time.sleep(args.warmup)
                    before = k0.sysinfo()
                    t = time.monotonic()
                    lat = light_run(home, args.light_calls, args.budget, seed=1)
                    wall = time.monotonic() - t
                    after = k0.sysinfo()
                finally:
                    flood.stop()
        tps = (after.generated_tokens - before.generated_tokens) / wall
        step = wall / max(1, after.steps - before.steps)
        res[name] = dict(lat=lat, flood_done=flood.done, errors=flood.errors, tps=tps,
                         step=step, preempt=after.preemptions - before.preemptions)
        console.print(f"  {name}: {len(lat)} light calls in {wall:.1f}s, p50 "
                      f"{percentile(lat, 50) * 1000:.0f} ms, "
                      f"p99 {percentile(lat, 99) * 1000:.0f} ms; "
                      f"engine {tps:.0f} tok/s, {step * 1000:.1f} ms/step, "
                      f"{res[name]['preempt']} preemptions, flood calls done {flood.done}, "
                      f"flood errors {flood.errors or 0}")
    return res


def part_b(args) -> dict:
    console.print("[bold](b) nice 0 vs nice 5, both saturating[/bold]")
    res = {}
    for policy in args.policies_b:
        with kernel("--kv-memory", args.kv_memory, "--sched", policy, label=policy,
                    threads=args.threads) as (home, _):
            with connect(home, timeout=60) as k0:
                a = Flood(home, args.pair, args.flood_tokens, seed=3)
                b = Flood(home, args.pair, args.flood_tokens, seed=4, nice=5)
                try:
                    wait_backlogged(k0, {a.pid, b.pid}, args.pair)
                    time.sleep(args.warmup)
                    r0 = {r.pid: r for r in k0.ps()}
                    time.sleep(args.window)
                    r1 = {r.pid: r for r in k0.ps()}
                    backlogged = all(r1[p].calls >= args.pair // 2 for p in (a.pid, b.pid))
                finally:
                    a.stop()
                    b.stop()
        sa = r1[a.pid].service - r0[a.pid].service
        sb = r1[b.pid].service - r0[b.pid].service
        res[policy] = dict(sa=sa, sb=sb, ratio=sa / sb if sb else float("inf"),
                           nice=(r1[a.pid].nice, r1[b.pid].nice), backlogged=backlogged,
                           errors={**a.errors, **b.errors})
        console.print(f"  {policy}: service nice {r1[a.pid].nice} {sa}, nice {r1[b.pid].nice} {sb} "
                      f"over {args.window:.0f}s: ratio {res[policy]['ratio']:.2f} "
                      f"(weights {WEIGHT_RATIO:.2f}); both still backlogged: {backlogged}; "
                      f"errors {res[policy]['errors'] or 0}")
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--kv-memory", default="4M", help="KV pool of each kernel (default 4M)")
    ap.add_argument("--flood", type=int, default=64, help="flood calls in flight")
    ap.add_argument("--flood-tokens", type=int, default=128, help="max_tokens of a flood call")
    ap.add_argument("--light-calls", type=int, default=20)
    ap.add_argument("--budget", type=float, default=40.0,
                    help="s a policy's light run may take at most (fifo needs it)")
    ap.add_argument("--pair", type=int, default=32, help="calls in flight of each in (b)")
    ap.add_argument("--warmup", type=float, default=3.0, help="s of backlog before measuring")
    ap.add_argument("--window", type=float, default=15.0, help="s over which (b) reads service")
    ap.add_argument("--policies-a", default="fifo,fair,las,fifo:limited",
                    help="policies of (a); NAME:limited keeps the flood's default kv_blocks limit")
    ap.add_argument("--policies-b", default="fair,las,priority")
    ap.add_argument("--part", choices=("a", "b", "ab"), default="ab")
    ap.add_argument("--threads", type=int, default=1,
                    help="OMP_NUM_THREADS of each kernel (0: torch's default; see benchkit.py)")
    ap.add_argument("--quick", action="store_true", help="a ~1 min smoke run")
    args = ap.parse_args()
    args.threads = args.threads or None
    if args.quick:
        args.light_calls, args.budget, args.window, args.warmup = 6, 10.0, 5.0, 1.5
        args.policies_a = "fifo,las" if args.policies_a == ap.get_default("policies_a") \
            else args.policies_a
        args.policies_b = "fair" if args.policies_b == ap.get_default("policies_b") \
            else args.policies_b
    args.policies_a = args.policies_a.split(",")
    args.policies_b = args.policies_b.split(",")
    console.print(f"machine: {load_line()}", highlight=False)
    a = part_a(args) if "a" in args.part else {}
    b = part_b(args) if "b" in args.part else {}
    console.print(f"machine: {load_line()}", highlight=False)

    if a:
        alone = percentile(a["alone"]["lat"], 50)
        t = Table(title=f"(a) light process: {args.light_calls} calls of 8 tokens, flood "
                        f"{args.flood} x {args.flood_tokens} tokens in flight, --kv-memory "
                        f"{args.kv_memory}; latency ms")
        for col in ("run", "calls", "p50", "p99", "p50 / alone p50", "p99 / alone p99",
                    "step ms", "9 x step", "engine tok/s", "preempt", "goal <= 2x (fair, las)"):
            t.add_column(col, justify="right")
        for name, r in a.items():
            p50, p99 = percentile(r["lat"], 50), percentile(r["lat"], 99)
            ratio = p50 / alone
            t.add_row(name if name == "alone" else f"{name} + flood", str(len(r["lat"])),
                      f"{p50 * 1000:.0f}", f"{p99 * 1000:.0f}", f"{ratio:.2f}x",
                      f"{p99 / percentile(a['alone']['lat'], 99):.2f}x",
                      f"{r['step'] * 1000:.1f}", f"{9 * r['step'] * 1000:.0f}",
                      f"{r['tps']:.0f}" if "tps" in r else "-", str(r.get("preempt", "-")),
                      goal(ratio <= 2) if name in ("fair", "las") else "")
        console.print(t)
    if b:
        t = Table(title=f"(b) two processes, {args.pair} calls in flight each, nice 0 vs "
                        f"nice 5: service over {args.window:.0f}s")
        for col in ("policy", "service nice 0", "service nice 5", "ratio", "weight ratio",
                    "ratio / weights", "both backlogged"):
            t.add_column(col, justify="right")
        for name, r in b.items():
            t.add_row(name, str(r["sa"]), str(r["sb"]), f"{r['ratio']:.2f}",
                      f"{WEIGHT_RATIO:.2f}", f"{r['ratio'] / WEIGHT_RATIO:.2f}",
                      str(r["backlogged"]))
        console.print(t)


if __name__ == "__main__":
    main()
